"""Kernels on the Redis task store, as real processes, for tests of the Redis paths.

`start_kernel` runs `llmos serve kernel` with the Redis store and its own echo runtime
(`llmos serve runtime`, registered with it); kernels given the same key prefix share tasks
and the work queue (and the at-rest key file `<workdir>/keys.json`, which they must share).
Safety and privacy are not started, so the kernels run a default pipeline policy with no
service stages (`[policy] stages` and `mandatory` empty).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from redistools import REDIS_URL
from stacktools import free_port_block

from llmos.services.keyring import KeyRing, write_file
from llmos.v1 import common_pb2, kernel_pb2, kernel_pb2_grpc

CLAIM_IDLE_S = 1.5
FINAL = {
    common_pb2.TASK_STATE_SUCCEEDED,
    common_pb2.TASK_STATE_FAILED,
    common_pb2.TASK_STATE_CANCELLED,
    common_pb2.TASK_STATE_REFUSED,
}


@dataclasses.dataclass
class Kernel:
    """A kernel process and its runtime process."""

    port: int
    kernel: subprocess.Popen[bytes]
    runtime: subprocess.Popen[bytes]
    log: Path
    argv: list[str]
    env: dict[str, str]

    def restart_kernel(self) -> None:
        """Start the kernel process again, as it was; return once its runtime re-registered
        (at the runtime's next lease renewal)."""
        with self.log.open("ab") as out:
            self.kernel = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env
            )
        wait_for_runtime(self)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        for process in (self.runtime, self.kernel):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in (self.runtime, self.kernel):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start_kernel(
    workdir: Path,
    name: str,
    prefix: str,
    redis_url: str = REDIS_URL,
    store: str = "redis",
    *,
    env: dict[str, str] | None = None,
) -> Kernel:
    """A kernel with the `store` task store ("redis", or "sqlite" under workdir/name) and
    its echo runtime, once the runtime is serving; `env` adds or overrides settings."""
    extra = env or {}
    # Kernels sharing a store must share its at-rest keys: one key file per work directory.
    key_file = workdir / "keys.json"
    if not key_file.exists():
        write_file(key_file, KeyRing.generate())
    port = free_port_block(2)
    env = {
        **os.environ,
        "LLMOS_TASK_STORE": store,
        "LLMOS_REDIS_URL": redis_url,
        "LLMOS_REDIS_PREFIX": prefix,
        "LLMOS_KERNEL_CLAIM_IDLE_S": str(CLAIM_IDLE_S),
        "LLMOS_POLICY_STAGES": "",
        "LLMOS_POLICY_MANDATORY": "",
        # Few tasks at a time per kernel, so the kill finds work held and work waiting.
        "LLMOS_KERNEL_RUNTIME_CONCURRENCY": "4",
        "LLMOS_RUNTIME_ENGINE": "echo",
        "LLMOS_METRICS_PORT": "-1",
        "LLMOS_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
        "LLMOS_PRIVACY_KEY_FILE": str(key_file),
        **extra,
    }
    data_dir = workdir / name
    data_dir.mkdir()
    log = workdir / f"{name}.log"
    argv = [sys.executable, "-m", "llmos.kernel.cli", "serve"]
    common = ["--port", str(port), "--data-dir", str(data_dir)]
    kernel_argv = [*argv, "kernel", *common]
    with log.open("ab") as out:
        kernel = subprocess.Popen(kernel_argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        runtime = subprocess.Popen(
            [*argv, "runtime", *common], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    started = Kernel(port, kernel, runtime, log, kernel_argv, env)
    try:
        wait_for_runtime(started)
    except BaseException:
        started.stop()
        raise
    return started


def wait_for_runtime(kernel: Kernel, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(kernel.address) as channel:
        stub = kernel_pb2_grpc.KernelServiceStub(channel)
        while time.monotonic() < deadline:
            if kernel.kernel.poll() is not None:
                pytest.fail(f"the kernel exited; see {kernel.log}")
            try:
                services = stub.ListServices(kernel_pb2.ListServicesRequest(), timeout=2).services
                # Registered is not enough: the kernel routes only to a runtime it has
                # seen SERVING (health UNSPECIFIED until its first check).
                if any(
                    s.kind == common_pb2.SERVICE_KIND_RUNTIME
                    and s.health == common_pb2.SERVICE_HEALTH_SERVING
                    for s in services
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    pytest.fail(f"no runtime registered with {kernel.address}; see {kernel.log}")


WORDS = 300


def prompt_for(index: int) -> str:
    """A prompt the echo runtime streams back in WORDS pieces, unique per task."""
    return f"task-{index} " + " ".join(f"w{index}.{n}" for n in range(WORDS - 1))


def finished(stub: kernel_pb2_grpc.KernelServiceStub, task_ids: list[str]) -> int:
    """How many of `task_ids` are in a final state (one ListTasks page per state)."""
    wanted, count = set(task_ids), 0
    for state in FINAL:
        request = kernel_pb2.ListTasksRequest(state=state, page_size=1000)
        tasks = stub.ListTasks(request, timeout=10).tasks
        count += sum(task.task_id in wanted for task in tasks)
    return count


def submit_all(stub: kernel_pb2_grpc.KernelServiceStub, indexes: range) -> dict[str, str]:
    """Submit one echo task per index, all at once; task id -> the prompt it must echo."""
    calls = [(prompt_for(i), stub.Submit.future(submit_request(i), timeout=60)) for i in indexes]
    return {call.result().task_id: prompt for prompt, call in calls}


def submit_request(index: int) -> kernel_pb2.SubmitRequest:
    return kernel_pb2.SubmitRequest(
        request=kernel_pb2.GenerateRequest(
            prompt=prompt_for(index),
            sampling=common_pb2.SamplingParams(max_tokens=WORDS + 10),
        )
    )


def wait_until_finished(
    stub: kernel_pb2_grpc.KernelServiceStub, task_ids: list[str], at_least: int, timeout_s: float
) -> int:
    """Poll until `at_least` of `task_ids` are final; how many are. Fails on timeout."""
    deadline = time.monotonic() + timeout_s
    while (count := finished(stub, task_ids)) < at_least:
        assert time.monotonic() < deadline, f"only {count} of {at_least} tasks finished"
        time.sleep(0.1)
    return count


def assert_each_succeeded_once(
    stub: kernel_pb2_grpc.KernelServiceStub, prompts: dict[str, str]
) -> None:
    """Every task SUCCEEDED exactly once (one final event) with its prompt echoed once."""
    for task_id, prompt in prompts.items():
        got = stub.GetTask(kernel_pb2.GetTaskRequest(task_id=task_id), timeout=10)
        assert got.task.state == common_pb2.TASK_STATE_SUCCEEDED, got.task
        assert got.output == prompt, f"{task_id}: output is not its prompt, once"
        events = list(stub.WatchTask(kernel_pb2.WatchTaskRequest(task_id=task_id), timeout=10))
        finals = [e for e in events if e.state in FINAL]
        assert len(finals) == 1, f"{task_id} has {len(finals)} final events"
