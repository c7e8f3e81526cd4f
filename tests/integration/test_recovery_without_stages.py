"""A kernel whose policy runs no service stages recovers its tasks after a SIGKILL.

Recovered tasks wait for the services some policy needs before they run again; with no
service stages that is the runtime alone, so they must run once it has re-registered,
not wait forever for a safety or privacy service this deployment never starts.
"""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
from kerneltools import assert_each_succeeded_once, start_kernel, submit_all, wait_until_finished

from llmos.v1 import kernel_pb2_grpc

TASKS = 40


def test_tasks_run_again_after_the_kernel_is_killed(tmp_path: Path) -> None:
    kernel = start_kernel(tmp_path, "kernel", "", store="sqlite")
    try:
        with grpc.insecure_channel(kernel.address) as channel:
            stub = kernel_pb2_grpc.KernelServiceStub(channel)
            prompts = submit_all(stub, range(TASKS))
            done_at_kill = wait_until_finished(stub, list(prompts), TASKS // 8, timeout_s=60)
            kernel.kernel.send_signal(signal.SIGKILL)
            kernel.kernel.wait()

            kernel.restart_kernel()
            wait_until_finished(stub, list(prompts), TASKS, timeout_s=90)

            assert done_at_kill < TASKS, "the kill came after everything had finished"
            assert_each_succeeded_once(stub, prompts)
        assert "recovered tasks" in kernel.log.read_text()
    finally:
        kernel.stop()
