"""Redis restarting under load: the kernel reconnects, and accepted tasks survive.

A Redis server of the test's own runs with the project's configuration
(deploy/redis/redis.conf: append-only file, fsync every second) on a free port, so it can
be restarted without touching the machine's shared server. A kernel on it is given work;
the server is shut down and started again on the same files while that work runs; every
task accepted before, during and after must still succeed exactly once.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from kerneltools import assert_each_succeeded_once, start_kernel, submit_all, wait_until_finished
from stacktools import REPO, free_port_block

from llmos.v1 import kernel_pb2_grpc

TASKS = 80


class RedisServer:
    """redis-server with deploy/redis/redis.conf, its files in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port_block(1)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (scripts/test.sh installs it)"
        config = REPO / "deploy" / "redis" / "redis.conf"
        argv = [binary, str(config), "--port", str(self.port), "--dir", str(self.directory)]
        with (self.directory / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        """A clean shutdown (SIGTERM): Redis writes the AOF out and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


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
