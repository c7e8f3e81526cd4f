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
from google.protobuf.duration_pb2 import Duration
from stacktools import DEFAULT_MODEL, STACK_SIZE, Stack, free_port_block, stack_data_dir

from llmos.services.errors import error_info
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
    # Float32 weights are held twice: the model's and the lean pass's oneDNN copy.
    weights = 2 * weight_file_bytes(stack.data_dir)
    assert weights > 100 * 2**20
    # The KV cache's reservation of an earlier test's requests ends about 2 s after them.
    stack.wait_runtime_idle(timeout_s=60)
    wait_for(lambda: reserved_bytes(stack) == weights, 15, "only the weights being reserved")
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

    def serve(name: str) -> None:
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

    try:
        for name in ("kernel", "runtime"):
            serve(name)
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
            "no hardware service is serving",
            f"the KV cache of {DEFAULT_MODEL} grows without a host-memory reservation: no "
            "hardware service is serving; admitting within runtime_kv_budget_mb (1.0 GiB) alone",
        ]

        # Generate still runs; its last message says the KV cache was not reserved.
        def kv_admission() -> runtime_pb2.KvAdmission:
            with grpc.insecure_channel(kernel.services()["runtime"].address) as channel:
                pieces = list(
                    runtime_pb2_grpc.RuntimeServiceStub(channel).Generate(
                        runtime_pb2.RuntimeServiceGenerateRequest(prompt="Hi"), timeout=120
                    )
                )
            return pieces[-1].kv_admission

        kv = kv_admission()
        assert kv.decision == "unreserved"
        assert kv.reserved_bytes == 0 and kv.batch_bytes > 0
        assert "no hardware service is serving" in kv.reason

        # A hardware service that starts later is found (the runtime looks every 15 s),
        # and from then on the KV cache is reserved there.
        serve("hardware")
        wait_for(
            lambda: any(
                line.startswith(f"the KV cache of {DEFAULT_MODEL} is reserved at the hardware")
                for line in log_lines(
                    tmp_path / "runtime.log", "llmos.services.runtime.reservations"
                )
            ),
            60,
            "the runtime finding the hardware service",
        )
        kv = kv_admission()
        assert kv.decision == "reserved"
        assert kv.reserved_bytes >= kv.batch_bytes > 0
    finally:
        for child in reversed(children):
            child.send_signal(signal.SIGTERM)
        for child in children:
            child.wait(timeout=60)


def test_a_load_the_hardware_service_refuses_is_refused_before_any_memory_is_used(
    stack: Stack, tmp_path: Path
) -> None:
    """Another model (the same weights under another name) does not fit once nearly all
    free memory is held by someone else: LoadModel answers the hardware service's
    RESOURCE_EXHAUSTED, hop named, and nothing is loaded."""
    other = tmp_path / "SmolLM2-other"
    other.symlink_to(
        (stack.data_dir / "models" / DEFAULT_MODEL).resolve(), target_is_directory=True
    )
    with grpc.insecure_channel(stack.services()["hardware"].address) as channel:
        hardware = hardware_pb2_grpc.HardwareServiceStub(channel)

        def reserve(size: int) -> hardware_pb2.HardwareServiceReserveResponse:
            request = hardware_pb2.HardwareServiceReserveRequest(
                device="cpu", bytes=size, holder="test-hog", ttl=Duration(seconds=120)
            )
            return hardware.Reserve(request, timeout=10)

        # Ask for everything to learn what is free, then hold all but 10 MiB of it.
        total = hardware.Snapshot(
            hardware_pb2.HardwareServiceSnapshotRequest(), timeout=10
        ).snapshot.memory.total_bytes
        with pytest.raises(grpc.RpcError) as caught:
            reserve(total)
        info = error_info(caught.value)
        assert info is not None
        hog = reserve(int(info.metadata["free_bytes"]) - 10 * 2**20)
        runtime = stack.services()["runtime"].address
        try:
            with grpc.insecure_channel(runtime) as runtime_channel:
                stub = runtime_pb2_grpc.RuntimeServiceStub(runtime_channel)
                with pytest.raises(grpc.RpcError) as refused:
                    stub.LoadModel(
                        runtime_pb2.RuntimeServiceLoadModelRequest(name=str(other)), timeout=60
                    )
                models = stub.ListModels(runtime_pb2.RuntimeServiceListModelsRequest(), timeout=10)
        finally:
            hardware.Release(
                hardware_pb2.HardwareServiceReleaseRequest(
                    reservation_id=hog.reservation_id, holder="test-hog"
                ),
                timeout=10,
            )
    error = refused.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert error_info(error).reason == "INSUFFICIENT_MEMORY"
    assert error.details().startswith("Reserve on hardware at ")
    assert "is free" in error.details()
    assert [m.name for m in models.models] == [DEFAULT_MODEL], "nothing else was loaded"


def test_a_restarted_hardware_service_gets_the_runtimes_reservation_back(stack: Stack) -> None:
    """Reservations live in the hardware process: after it restarts, the runtime's next
    renewal finds its reservation gone (NOT_FOUND) and reserves again."""
    weights = 2 * weight_file_bytes(stack.data_dir)  # float32: the oneDNN copy too
    killed = stack.services()["hardware"].pid
    os.kill(killed, signal.SIGKILL)

    def restarted() -> bool:
        with contextlib.suppress(grpc.RpcError, KeyError):
            hardware = stack.services()["hardware"]
            return hardware.pid != killed and reserved_bytes(stack) >= 0
        return False

    wait_for(restarted, 60, "the supervisor restarting the hardware service")
    # The runtime renews every TTL_S / 3 = 20 s: within two rounds it has reserved again.
    wait_for(lambda: reserved_bytes(stack) == weights, 60, "the runtime reserving again")
