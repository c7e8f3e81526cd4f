"""Redis restarting under load: the kernel reconnects, and accepted tasks survive.

A Redis server of the test's own runs with the project's configuration
(deploy/redis/redis.conf: append-only file, fsync every second) on a free port, so it can
be restarted without touching the machine's shared server. A kernel on it is given work;
the server is shut down and started again on the same files while that work runs; every
task accepted before, during and after must still succeed exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from kerneltools import assert_each_succeeded_once, start_kernel, submit_all, wait_until_finished
from redistools import RedisServer

from llmos.v1 import kernel_pb2_grpc

TASKS = 80


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
