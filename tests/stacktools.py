"""Starting and reaching the real stack from tests: `llmos up` on free ports, and its CLI.

Imported by conftest.py (fixtures) and by tests for the `Stack` type; tests/ is on the
import path through pytest's `pythonpath` setting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmos.kernel.stack import STACK
from llmos.services.config import METRICS_PORT_OFFSET
from llmos.v1 import common_pb2, kernel_pb2, kernel_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
STACK_SIZE = 6  # kernel + runtime, safety, privacy, explain, hardware


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(size: int) -> int:
    """A base port such that base .. base+size-1 are all free on 127.0.0.1, and so are the
    metrics ports the processes on them take by default (each + METRICS_PORT_OFFSET)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        ports = [base + i for i in range(size)]
        ports += [port + METRICS_PORT_OFFSET for port in ports]
        if max(ports) < 65535 and all(_bindable(port) for port in ports):
            return base
    raise RuntimeError("no block of free ports found")


@dataclasses.dataclass
class Stack:
    """A running `llmos up` and the ways tests reach it."""

    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_path: Path
    host: str = "127.0.0.1"

    @property
    def kernel_address(self) -> str:
        return f"{self.host}:{self.port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.kernel_address)

    def kernel(self, channel: grpc.Channel) -> kernel_pb2_grpc.KernelServiceStub:
        return kernel_pb2_grpc.KernelServiceStub(channel)

    def services(self) -> dict[str, kernel_pb2.ServiceInfo]:
        with self.channel() as channel:
            reply = self.kernel(channel).ListServices(kernel_pb2.ListServicesRequest(), timeout=5)
        return {service.name: service for service in reply.services}

    def runtime_batch(self) -> int:
        """Sequences in the runtime's running batch now (ListModels reports the engine)."""
        with self.channel() as channel:
            reply = self.kernel(channel).ListModels(kernel_pb2.ListModelsRequest(), timeout=10)
        return sum(model.running_sequences + model.queued_sequences for model in reply.models)

    def wait_runtime_idle(self, timeout_s: float = 5.0) -> float:
        """Seconds until the runtime's batch is empty; fails the test after `timeout_s`."""
        started = time.monotonic()
        while self.runtime_batch():
            if time.monotonic() - started > timeout_s:
                pytest.fail(f"the runtime still runs sequences after {timeout_s}s")
            time.sleep(0.05)
        return time.monotonic() - started

    def llmos(
        self, *args: str, stdin: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the `llmos` CLI against this stack."""
        return subprocess.run(
            [sys.executable, "-m", "llmos.kernel.cli", *args, "--port", str(self.port)],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def every_process_serving(self) -> bool:
        """Whether the kernel answers and lists every other process of the stack SERVING:
        one gRPC call, so it can be asked often while the stack starts."""
        try:
            services = self.services()
        except grpc.RpcError:
            return False
        return all(
            spec.name in services
            and services[spec.name].health == common_pb2.SERVICE_HEALTH_SERVING
            for spec in STACK
            if spec.name != "kernel"
        )

    def wait_healthy(self, timeout_s: float) -> float:
        """Seconds until `llmos status` exits 0; fails the test after `timeout_s`.

        `llmos status` is asked only once the kernel lists every process SERVING: each run of
        it is a new Python process, and polling with it took CPU from the processes starting
        on a two-core machine."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                pytest.fail(f"llmos up exited with {self.process.returncode}; see {self.log_path}")
            if self.every_process_serving() and self.llmos("status", timeout=10).returncode == 0:
                return time.monotonic() - started
            time.sleep(0.2)
        pytest.fail(f"stack not healthy after {timeout_s}s; see {self.log_path}")


def stack_data_dir(model_data_dir: Path, parent: Path) -> Path:
    """A data directory of its own (each kernel locks its task store) that shares the
    converted models, so no stack converts them again."""
    data_dir = parent / "data"
    data_dir.mkdir(exist_ok=True)
    models = data_dir / "models"
    if not models.exists():
        models.symlink_to((model_data_dir / "models").resolve(), target_is_directory=True)
    return data_dir


def start_stack(
    model_data_dir: Path, log_path: Path, *extra: str, env: dict[str, str] | None = None
) -> Stack:
    """`llmos up` on a free port block, in `log_path`'s folder, sharing the test models.

    `env` adds to (or overrides) the environment, e.g. `LLMOS_RUNTIME_ENGINE=echo`; a
    policy file can be written to `stack_data_dir(...)/llmos.toml` before the call.
    """
    data_dir = stack_data_dir(model_data_dir, log_path.parent)
    port = free_port_block(STACK_SIZE)
    env = {**os.environ, "LLMOS_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llmos.kernel.cli",
                "up",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return Stack(process=process, port=port, data_dir=data_dir, log_path=log_path)


def terminate(process: subprocess.Popen[bytes], timeout_s: float) -> int:
    """SIGTERM `process` if it still runs, wait up to `timeout_s`, then SIGKILL; its exit
    status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def stop_stack(stack: Stack) -> int:
    """SIGTERM the supervisor and wait for it; returns its exit status."""
    return terminate(stack.process, 60)


@dataclasses.dataclass
class Served:
    """Some processes of the stack run alone with `llmos serve NAME` on one port block: a
    stack in which the services left out are *down* (never registered), with no supervisor
    to bring them back."""

    workdir: Path
    env: dict[str, str]
    port: int = dataclasses.field(default_factory=lambda: free_port_block(STACK_SIZE))
    children: dict[str, subprocess.Popen[bytes]] = dataclasses.field(default_factory=dict)

    @property
    def stack(self) -> Stack:
        """A `Stack` view on the kernel, for its helpers (channel, kernel, llmos)."""
        return Stack(self.children["kernel"], self.port, self.workdir / "data", self.log("kernel"))

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start(self, name: str) -> None:
        argv = [sys.executable, "-m", "llmos.kernel.cli", "serve", name, "--port", str(self.port)]
        env = {**os.environ, "LLMOS_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1", **self.env}
        with self.log(name).open("wb") as log:
            self.children[name] = subprocess.Popen(
                [*argv, "--data-dir", str(self.workdir / "data")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def wait_registered(self, *names: str, timeout_s: float = 60) -> None:
        """Until the kernel answers and lists each of `names` SERVING."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, child in self.children.items():
                if child.poll() is not None:
                    pytest.fail(f"{name} exited with {child.returncode}; see {self.log(name)}")
            try:
                services = self.stack.services()
            except grpc.RpcError:
                services = {}
            if all(
                name in services and services[name].health == common_pb2.SERVICE_HEALTH_SERVING
                for name in names
            ):
                return
            time.sleep(0.2)
        pytest.fail(f"{names} not serving within {timeout_s}s; logs in {self.workdir}")

    def stop(self) -> None:
        for child in reversed(self.children.values()):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children.values():
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


@contextlib.contextmanager
def runtime_alone(
    data_dir: Path, log_path: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str, int]]:
    """`llmos serve runtime` on its own (no kernel listens on its port block), until its
    gRPC health says SERVING; yields the process, its address and its metrics port, and
    SIGTERMs it at the end."""
    port = free_port_block(2)  # the runtime takes port + 1
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llmos.kernel.cli", "serve", "runtime", "--port", str(port),
             "--data-dir", str(data_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
    address = f"127.0.0.1:{port + 1}"
    try:
        started = time.monotonic()
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    if (
                        health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        break
                except grpc.RpcError:
                    pass
                assert process.poll() is None, f"the runtime exited during start-up: {log_path}"
                assert time.monotonic() - started < 120, "the runtime did not become SERVING"
                time.sleep(0.3)
        yield process, address, port + 1 + METRICS_PORT_OFFSET
    finally:
        terminate(process, 30)
