"""Several kernels on one Redis: accepted work survives a kernel killed with SIGKILL.

Two real kernel processes share one key prefix on the test Redis (tests/kerneltools.py),
each with its own echo runtime. 200 tasks are submitted to both; once a fifth have
finished, the first kernel is SIGKILLed. The second must take over what the first held
(XAUTOCLAIM after `kernel_claim_idle_s`) and every task must succeed exactly once.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from kerneltools import (
    assert_each_succeeded_once,
    start_kernel,
    submit_all,
    wait_until_finished,
)
from redistools import delete_prefix, fresh_prefix

from llmos.v1 import kernel_pb2_grpc

TASKS = 200


@pytest.fixture
def prefix() -> Iterator[str]:
    value = fresh_prefix("kernels")
    yield value
    delete_prefix(value)


def test_two_kernels_finish_every_task_once_when_one_is_killed(tmp_path: Path, prefix: str) -> None:
    first = start_kernel(tmp_path, "first", prefix)
    second = start_kernel(tmp_path, "second", prefix)
    try:
        with (
            grpc.insecure_channel(first.address) as to_first,
            grpc.insecure_channel(second.address) as to_second,
        ):
            prompts = submit_all(kernel_pb2_grpc.KernelServiceStub(to_first), range(0, TASKS, 2))
            survivor = kernel_pb2_grpc.KernelServiceStub(to_second)
            prompts |= submit_all(survivor, range(1, TASKS, 2))
            task_ids = list(prompts)

            done_at_kill = wait_until_finished(survivor, task_ids, TASKS // 5, timeout_s=60)
            first.kernel.send_signal(signal.SIGKILL)
            first.kernel.wait()
            wait_until_finished(survivor, task_ids, TASKS, timeout_s=120)

            assert done_at_kill < TASKS, "the kill came after everything had finished"
            assert_each_succeeded_once(survivor, prompts)
        log = second.log.read_text()
        assert "took over task" in log, "the second kernel took over none of the first's work"
    finally:
        first.stop()
        second.stop()
