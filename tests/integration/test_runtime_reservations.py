"""The runtime reserves host memory through the hardware service before it loads a model,
releases it when it unloads, and loads without one when no hardware service serves.

Real processes over real gRPC: the session's `llmos up` stack, and a kernel with a runtime
and no hardware service.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from stacktools import DEFAULT_MODEL, STACK_SIZE, Stack, free_port_block, stack_data_dir

from llmos.v1 import hardware_pb2, hardware_pb2_grpc, kernel_pb2, runtime_pb2, runtime_pb2_grpc

pytestmark = pytest.mark.model  # the real default model, converted once per session


def reserved_bytes(stack: Stack) -> int:
    with grpc.insecure_channel(stack.services()["hardware"].address) as channel:
        reply = hardware_pb2_grpc.HardwareServiceStub(channel).Snapshot(
            hardware_pb2.HardwareServiceSnapshotRequest(), timeout=10
        )
    return int(reply.snapshot.memory.reserved_bytes)


def weight_file_bytes(data_dir: Path) -> int:
    return sum(
        p.stat().st_size for p in (data_dir / "models" / DEFAULT_MODEL).glob("*.safetensors")
    )


def log_lines(path: Path, logger: str) -> list[str]:
    lines = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("logger") == logger:
                lines.append(str(record.get("msg")))
    return lines


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s}s")
        time.sleep(0.2)


def test_the_runtime_reserves_its_model_and_releases_it_on_unload(stack: Stack) -> None:
    weights = weight_file_bytes(stack.data_dir)
    assert weights > 100 * 2**20
    assert reserved_bytes(stack) == weights, "the default model's weights are reserved"
    decisions = log_lines(stack.log_path, "llmos.services.runtime.reservations")
    assert any(
        f"reserved {weights // 2**20} MiB of host memory for {DEFAULT_MODEL}" in line
        for line in decisions
    ), decisions

    runtime = stack.services()["runtime"].address
    with grpc.insecure_channel(runtime) as channel:
        stub = runtime_pb2_grpc.RuntimeServiceStub(channel)
        try:
            stub.UnloadModel(
                runtime_pb2.RuntimeServiceUnloadModelRequest(name=DEFAULT_MODEL), timeout=60
            )
            assert reserved_bytes(stack) == 0, "unloading releases the reservation"
        finally:
            stub.LoadModel(
                runtime_pb2.RuntimeServiceLoadModelRequest(name=DEFAULT_MODEL), timeout=120
            )
    assert reserved_bytes(stack) == weights, "loading again reserves again"
    with stack.channel() as channel:
        pieces = list(
            stack.kernel(channel).Generate(kernel_pb2.GenerateRequest(prompt="Hi"), timeout=60)
        )
    assert pieces[-1].usage.completion_tokens > 0


def test_without_a_hardware_service_the_runtime_loads_anyway_and_logs_it(
    model_data_dir: Path, tmp_path: Path
) -> None:
    port = free_port_block(STACK_SIZE)
    data_dir = stack_data_dir(model_data_dir, tmp_path)
    env = {**os.environ, "LLMOS_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}
    children = []
    try:
        for name in ("kernel", "runtime"):
            with (tmp_path / f"{name}.log").open("wb") as log:
                children.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "llmos.kernel.cli",
                            "serve",
                            name,
                            "--port",
                            str(port),
                            "--data-dir",
                            str(data_dir),
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
            time.sleep(1.0)  # the kernel first, as `llmos up` starts them

        kernel = Stack(children[0], port, data_dir, tmp_path / "kernel.log")

        def runtime_registered() -> bool:
            assert all(child.poll() is None for child in children), f"see {tmp_path}"
            with contextlib.suppress(grpc.RpcError):
                return "runtime" in kernel.services()
            return False

        wait_for(runtime_registered, 180, "the runtime registering")
        decisions = log_lines(tmp_path / "runtime.log", "llmos.services.runtime.reservations")
        assert decisions == [
            f"loading {DEFAULT_MODEL} without a host-memory reservation: "
            "no hardware service is serving"
        ]
    finally:
        for child in reversed(children):
            child.send_signal(signal.SIGTERM)
        for child in children:
            child.wait(timeout=60)
