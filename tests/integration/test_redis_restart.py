"""Redis restarting under load: the kernel reconnects, and accepted tasks survive.

A Redis server of the test's own runs with the project's configuration
(deploy/redis/redis.conf: append-only file, fsync every second) on a free port, so it can
be restarted without touching the machine's shared server. A kernel on it is given work;
the server is shut down and started again on the same files while that work runs; every
task accepted before, during and after must still succeed exactly once.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from kerneltools import (
    Kernel,
    assert_each_succeeded_once,
    start_kernel,
    submit_all,
    wait_until_finished,
)
from redistools import RedisServer

from llmos.v1 import common_pb2, kernel_pb2, kernel_pb2_grpc

TASKS = 80
# The kernel's Redis retries in the long-outage test (`redis_retry_s`): the outage outlasts
# them three times over, so every write of a task's end is refused.
RETRY_S = 1.0
OUTAGE_S = 4.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    started = RedisServer(directory)
    started.start()
    yield started
    started.stop()


def test_tasks_survive_a_redis_restart_under_load(tmp_path: Path, server: RedisServer) -> None:
    kernel = start_kernel(tmp_path, "kernel", "llmos:", redis_url=server.url)
    try:
        with grpc.insecure_channel(kernel.address) as channel:
            stub = kernel_pb2_grpc.KernelServiceStub(channel)
            prompts = submit_all(stub, range(TASKS))
            wait_until_finished(stub, list(prompts), TASKS // 8, timeout_s=60)

            server.stop()
            time.sleep(0.5)  # the kernel's calls fail and retry meanwhile
            server.start()
            prompts |= submit_all(stub, range(TASKS, TASKS + 10))

            wait_until_finished(stub, list(prompts), len(prompts), timeout_s=120)
            assert_each_succeeded_once(stub, prompts)
        assert kernel.kernel.poll() is None, "the kernel exited"
        assert any(server.directory.glob("appendonlydir/*.aof")), "no append-only file kept"
    finally:
        kernel.stop()


@pytest.fixture
def impatient_kernel(tmp_path: Path, server: RedisServer) -> Iterator[Kernel]:
    """A kernel on `server` that retries a Redis command for RETRY_S only
    (`redis_retry_s`), so that an OUTAGE_S outage refuses its writes; it must still be
    serving when the test is done."""
    kernel = start_kernel(
        tmp_path, "kernel", "llmos:", redis_url=server.url,
        env={"LLMOS_REDIS_RETRY_S": str(RETRY_S)},
    )  # fmt: skip
    try:
        yield kernel
        assert kernel.kernel.poll() is None, "the kernel exited"
    finally:
        kernel.stop()


@contextlib.contextmanager
def runtime_frozen(kernel: Kernel) -> Iterator[None]:
    """The kernel's runtime SIGSTOPped: a task it was given stays RUNNING meanwhile."""
    kernel.runtime.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        kernel.runtime.send_signal(signal.SIGCONT)


def test_a_task_whose_end_is_refused_by_a_long_outage_runs_again(
    impatient_kernel: Kernel, server: RedisServer
) -> None:
    """Redis down for longer than the kernel retries while a task ends: its SUCCEEDED,
    then its FAILED, then its trace steps are refused (UNAVAILABLE). The kernel lets the
    task's queue entry go without acknowledging it; once Redis is back the entry lapses
    (`kernel_claim_idle_s`), the kernel takes it over and runs the task again to
    SUCCEEDED. The entry used to stay held and renewed, the task RUNNING for ever."""
    with grpc.insecure_channel(impatient_kernel.address) as channel:
        stub = kernel_pb2_grpc.KernelServiceStub(channel)
        with runtime_frozen(impatient_kernel):
            prompts = submit_all(stub, range(1))
            (task_id,) = prompts
            wait_for_state(stub, task_id, common_pb2.TASK_STATE_RUNNING)
            server.stop()
        time.sleep(OUTAGE_S)  # the task ends meanwhile, and nothing of it is stored
        server.start()

        wait_until_finished(stub, [task_id], 1, timeout_s=60)
        assert_each_succeeded_once(stub, prompts)
        watched = stub.WatchTask(kernel_pb2.WatchTaskRequest(task_id=task_id), timeout=10)
        states = [event.state for event in watched if not event.text]
        assert states.count(common_pb2.TASK_STATE_QUEUED) == 2, f"not queued again: {states}"


def test_a_streamed_task_whose_end_is_refused_is_failed_once_redis_is_back(
    impatient_kernel: Kernel, server: RedisServer
) -> None:
    """The same outage under a streamed Generate: its client's stream ends UNAVAILABLE,
    and the task, which no kernel can run again (its stream is gone), is FAILED with the
    reason once Redis is back, and its entry on the kernel's attached stream removed. It
    used to stay RUNNING until its kernel stopped."""
    with grpc.insecure_channel(impatient_kernel.address) as channel:
        stub = kernel_pb2_grpc.KernelServiceStub(channel)
        with runtime_frozen(impatient_kernel):
            stream = stub.Generate(kernel_pb2.GenerateRequest(prompt="held"), timeout=60)
            task_id = next(stream).task_id  # sent once the task is stored
            wait_for_state(stub, task_id, common_pb2.TASK_STATE_RUNNING)
            server.stop()
        with pytest.raises(grpc.RpcError) as ended:
            for _ in stream:  # the output comes; the end is refused
                pass
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value.details()
        server.start()

        wait_for_state(stub, task_id, common_pb2.TASK_STATE_FAILED)
        task = stub.GetTask(kernel_pb2.GetTaskRequest(task_id=task_id), timeout=10).task
        assert "redis_retry_s" in task.error, task.error
        assert attached_entries(server.url) == 0, "its attached entry is still there"


def attached_entries(url: str) -> int:
    """Entries on every kernel's attached stream (streamed tasks not yet ended)."""
    client = redis.Redis.from_url(url)
    try:
        return sum(int(client.xlen(key)) for key in client.scan_iter(match="llmos:attached:*"))
    finally:
        client.close()


def wait_for_state(
    stub: kernel_pb2_grpc.KernelServiceStub, task_id: str, state: int, timeout_s: float = 20
) -> None:
    deadline = time.monotonic() + timeout_s
    request = kernel_pb2.GetTaskRequest(task_id=task_id)
    while stub.GetTask(request, timeout=10).task.state != state:
        assert time.monotonic() < deadline, f"task {task_id} never became {state}"
        time.sleep(0.05)
