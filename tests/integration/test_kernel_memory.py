"""The kernel's admission uses the host's memory headroom (kernel/memory.py), on real
processes: a kernel, the hardware service and the echo runtime, each `llmos serve`d on its
own port block, so no model is needed. The pipeline's service stages are off (safety and
privacy are not started).

- with a floor above anything the host has, every new task is refused RESOURCE_EXHAUSTED /
  HOST_MEMORY_LOW, with the figures and a retry-after hint, before anything is stored, and
  the refusal is counted on the kernel's /metrics;
- with a floor the host clears, work runs and the admit trace step shows the headroom;
- without a hardware service nothing is gated, and the kernel says so once.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from stacktools import Served, Stack

from llmos.services.config import METRICS_PORT_OFFSET
from llmos.services.errors import error_info
from llmos.v1 import common_pb2, kernel_pb2

NO_STAGES = {"LLMOS_POLICY_STAGES": "", "LLMOS_POLICY_MANDATORY": ""}
HUGE_FLOOR_MB = 2**40  # a floor no host clears: 1 EiB


def serve(workdir: Path, floor_mb: int, *, hardware: bool, metrics: bool = False) -> Served:
    env = {
        "LLMOS_RUNTIME_ENGINE": "echo",
        "LLMOS_KERNEL_MIN_FREE_MB": str(floor_mb),
        "LLMOS_METRICS_PORT": "0" if metrics else "-1",
        **NO_STAGES,
    }
    running = Served(workdir, env)
    running.start("kernel")
    names = ["runtime", "hardware"] if hardware else ["runtime"]
    for name in names:
        running.start(name)
    running.wait_registered(*names)
    return running


def kernel_log(served: Served, logger: str = "llmos.kernel.memory") -> list[str]:
    lines = []
    for line in served.log("kernel").read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("logger") == logger:
                lines.append(str(record.get("msg")))
    return lines


def wait_for_headroom(served: Served) -> None:
    """Until the kernel has read a snapshot from the hardware service."""
    deadline = time.monotonic() + 30
    while not any(line.startswith("host memory from hardware") for line in kernel_log(served)):
        assert time.monotonic() < deadline, kernel_log(served)
        time.sleep(0.1)


def generate(stack: Stack, prompt: str = "hello memory") -> list[kernel_pb2.GenerateResponse]:
    with stack.channel() as channel:
        request = kernel_pb2.GenerateRequest(prompt=prompt)
        return list(stack.kernel(channel).Generate(request, timeout=30))


def admit_step(stack: Stack, task_id: str) -> common_pb2.TraceStep:
    with stack.channel() as channel:
        reply = stack.kernel(channel).GetTrace(
            kernel_pb2.GetTraceRequest(task_id=task_id), timeout=10
        )
    (step,) = [s for s in reply.steps if s.stage == "admit"]
    return step


def refused_by_floor(stack: Stack) -> float:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{stack.port + METRICS_PORT_OFFSET}/metrics", timeout=10
    ) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "llmos_kernel_admissions_refused_total"
        and sample.labels["reason"] == "HOST_MEMORY_LOW"
    )


@pytest.fixture(scope="module")
def high_floor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    running = serve(
        tmp_path_factory.mktemp("high-floor"), HUGE_FLOOR_MB, hardware=True, metrics=True
    )
    try:
        wait_for_headroom(running)
        yield running
    finally:
        running.stop()


def test_below_the_floor_new_work_is_refused_with_the_figures(high_floor: Served) -> None:
    stack = high_floor.stack
    before = refused_by_floor(stack)
    with pytest.raises(grpc.RpcError) as caught:
        generate(stack)
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    info = error_info(error)
    assert info is not None and info.reason == "HOST_MEMORY_LOW"
    assert info.metadata["floor_bytes"] == str(HUGE_FLOOR_MB * 2**20)
    assert int(info.metadata["retry_after_ms"]) > 0
    free = int(info.metadata["free_bytes"])
    available = int(info.metadata["available_bytes"])
    assert free == available - int(info.metadata["reserved_bytes"])
    # The hardware service's figure, read within the last second or so: the host's.
    assert 0 < available <= psutil.virtual_memory().total
    assert "host memory is low" in error.details()
    assert "kernel_min_free_mb" in error.details()

    with stack.channel() as channel:
        kernel = stack.kernel(channel)
        with pytest.raises(grpc.RpcError) as submitted:
            kernel.Submit(
                kernel_pb2.SubmitRequest(request=kernel_pb2.GenerateRequest(prompt="later")),
                timeout=10,
            )
        tasks = kernel.ListTasks(kernel_pb2.ListTasksRequest(), timeout=10)
    assert submitted.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert list(tasks.tasks) == [], "refused before anything was stored"
    assert refused_by_floor(stack) - before == 2
    assert any("refusing new work" in line for line in kernel_log(high_floor))


def test_bad_input_is_still_invalid_argument_below_the_floor(high_floor: Served) -> None:
    """Validation comes first: a client learns what is wrong with its request even when
    the host is short of memory."""
    with high_floor.stack.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        list(high_floor.stack.kernel(channel).Generate(kernel_pb2.GenerateRequest(), timeout=10))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_above_the_floor_work_runs_and_the_admit_step_shows_the_headroom(
    tmp_path: Path,
) -> None:
    running = serve(tmp_path, 1, hardware=True)
    try:
        wait_for_headroom(running)
        pieces = generate(running.stack)
        assert "".join(p.text for p in pieces) == "hello memory"
        step = admit_step(running.stack, pieces[0].task_id)
    finally:
        running.stop()
    assert step.evidence["host_memory_floor_bytes"] == str(2**20)
    free = int(step.evidence["host_memory_free_bytes"])
    assert 2**20 <= free <= psutil.virtual_memory().total
    assert "host_memory_unknown" not in step.evidence


def test_without_a_hardware_service_admission_is_not_gated_and_says_so_once(
    tmp_path: Path,
) -> None:
    running = serve(tmp_path, HUGE_FLOOR_MB, hardware=False)
    try:
        first = generate(running.stack)
        time.sleep(2.5)  # the kernel keeps looking for a hardware service meanwhile
        generate(running.stack)
        step = admit_step(running.stack, first[0].task_id)
        lines = kernel_log(running)
    finally:
        running.stop()
    assert step.evidence["host_memory_unknown"] == "no hardware service is serving"
    assert "host_memory_free_bytes" not in step.evidence
    assert lines == ["admission is not gated by host memory: no hardware service is serving"]
