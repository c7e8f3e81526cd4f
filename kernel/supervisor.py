"""`llmos up`: start the kernel and every service as child processes and keep them running.

Modelled on Erlang/OTP's supervisor: each child is declared as data (`Child`); children
start one at a time in order, each health-gated (the next starts only once this one reports
SERVING over grpc.health.v1); a child that exits is restarted, unless that would exceed the
restart intensity (at most `max_restarts` within `restart_window_s`), in which case the
supervisor gives up loudly and stops everything. On SIGINT/SIGTERM children stop in
reverse order: SIGTERM, then SIGKILL after their shutdown timeout. Children get
PR_SET_PDEATHSIG, so even a supervisor killed with SIGKILL leaves no orphans.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmos.services.channels import open_channel

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
# Loaded here, in the parent: between fork and exec a child must not load libraries
# (the parent's gRPC threads may hold the loader's lock).
_LIBC = ctypes.CDLL(None, use_errno=True)


# Set by the supervisor for each child; `llmos serve` reads (and removes) it at start.
PARENT_PID_ENV = "LLMOS_SUPERVISOR_PID"


def exit_with_parent_from_env() -> None:
    """Arm the parent-death signal for the supervisor named in PARENT_PID_ENV, if any; the
    variable is removed so that this process's own children do not inherit it."""
    parent = os.environ.pop(PARENT_PID_ENV, "")
    if parent.isdigit():
        exit_with_parent(int(parent))


def exit_with_parent(parent_pid: int) -> None:
    """Called by a child itself, first thing after exec: SIGTERM it when `parent_pid` dies.

    Children arm this themselves rather than through a `preexec_fn`: a parent whose gRPC
    threads are running (the supervisor, the kernel) must spawn without running Python
    between fork and exec, or gRPC's fork handlers abort the child at start ("epoll_wait
    error: Bad file descriptor", status -6)."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


@dataclasses.dataclass(frozen=True)
class Child:
    """One supervised process."""

    id: str
    argv: tuple[str, ...]
    address: str
    shutdown_timeout_s: float = 10.0


class RestartIntensity:
    """At most `max_restarts` within `window_s` seconds (pure logic, clock passed in)."""

    def __init__(self, max_restarts: int, window_s: float) -> None:
        self.max_restarts = max_restarts
        self.window_s = window_s
        self._restarts: collections.deque[float] = collections.deque()

    def allow(self, now: float) -> bool:
        """Record a restart at `now` if it stays within the intensity; say whether it may happen."""
        while self._restarts and now - self._restarts[0] > self.window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts:
            return False
        self._restarts.append(now)
        return True


def port_is_free(address: str) -> bool:
    """Whether host:port can be bound now (SO_REUSEADDR, as gRPC binds)."""
    host, _, port = address.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except OSError:
            return False
    return True


class ChildFailed(Exception):
    """A child did not become healthy, or crashed more often than the intensity allows."""


class _StopRequested(Exception):
    """A stop was requested while a child was starting."""


async def wait_serving(address: str, process: asyncio.subprocess.Process, timeout_s: float) -> None:
    """Return once `address` reports SERVING; fail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    channel = open_channel(address)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise ChildFailed(f"exited with status {process.returncode} before it was ready")
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.2)
        raise ChildFailed(f"not SERVING at {address} after {timeout_s:.0f}s")
    finally:
        await channel.close()


class Supervisor:
    """Runs the children until told to stop or until one crashes too often."""

    def __init__(
        self, children: list[Child], intensity: RestartIntensity, ready_timeout_s: float
    ) -> None:
        self.children = children
        self.intensity = intensity
        self.ready_timeout_s = ready_timeout_s
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def _spawn(self, child: Child) -> asyncio.subprocess.Process:
        # No preexec_fn: Python run between fork and exec in a process with live gRPC
        # threads (the supervisor polls health over gRPC) let gRPC's fork handlers abort
        # children at start (status -6, "epoll_wait error: Bad file descriptor"). The child
        # arms its parent-death signal itself, first thing, from PARENT_PID_ENV.
        process = await asyncio.create_subprocess_exec(
            *child.argv,
            env={**os.environ, PARENT_PID_ENV: str(os.getpid())},
            stdin=asyncio.subprocess.DEVNULL,
            # Not in the terminal's foreground group: Ctrl-C reaches only the supervisor,
            # which then stops the children in reverse order.
            process_group=0,
        )
        self.processes[child.id] = process
        log.info("started %s (pid %d)", child.id, process.pid)
        return process

    async def _start_healthy(self, child: Child) -> None:
        # Otherwise another process on the port would answer the health check for it.
        if not port_is_free(child.address):
            raise ChildFailed(
                f"{child.id} cannot start: {child.address} is already in use by another "
                "process (another `llmos up`?); stop it or choose another --port"
            )
        process = await self._spawn(child)
        # A stop requested meanwhile (Ctrl-C while the model loads) must not wait for it.
        ready = asyncio.create_task(wait_serving(child.address, process, self.ready_timeout_s))
        stopping = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not ready.done():
                ready.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ready
        if ready.cancelled():
            raise _StopRequested
        error = ready.exception()
        if error is not None:
            raise ChildFailed(f"{child.id} {error}") from error
        log.info("%s is healthy at %s", child.id, child.address)

    async def run(self) -> int:
        """Start everything, supervise, stop everything. 0 on a requested stop, 1 on give-up."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            for child in self.children:
                if self._stop.is_set():
                    return 0
                await self._start_healthy(child)
            log.info("all %d processes are healthy", len(self.children))
            return await self._supervise()
        except _StopRequested:
            return 0
        except ChildFailed as error:
            log.error("giving up: %s", error)
            return 1
        finally:
            await self.stop_all()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _supervise(self) -> int:
        stopping = asyncio.create_task(self._stop.wait())
        try:
            while True:
                exits = {
                    asyncio.create_task(self.processes[child.id].wait()): child
                    for child in self.children
                }
                done, _ = await asyncio.wait(
                    {stopping, *exits}, return_when=asyncio.FIRST_COMPLETED
                )
                for task in exits:
                    task.cancel()
                if stopping in done:
                    return 0
                for task in done:
                    await self._restart(exits[task], f"exited with status {task.result()}")
        finally:
            stopping.cancel()

    async def _restart(self, child: Child, reason: str) -> None:
        """Restart `child`; a restart that fails before SERVING counts and is tried again."""
        while True:
            if not self.intensity.allow(time.monotonic()):
                raise ChildFailed(
                    f"{child.id} {reason} and has been restarted "
                    f"{self.intensity.max_restarts} times within "
                    f"{self.intensity.window_s:.0f}s; not restarting it again"
                )
            log.warning("%s %s; restarting it", child.id, reason)
            try:
                await self._start_healthy(child)
                return
            except ChildFailed as error:
                reason = str(error).removeprefix(f"{child.id} ")

    async def stop_all(self) -> None:
        """Stop children in reverse start order: SIGTERM, wait, then SIGKILL."""
        for child in reversed(self.children):
            process = self.processes.get(child.id)
            if process is None or process.returncode is not None:
                continue
            log.info("stopping %s (pid %d)", child.id, process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), child.shutdown_timeout_s)
            except TimeoutError:
                log.warning(
                    "%s did not stop in %.0fs; killing it", child.id, child.shutdown_timeout_s
                )
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()


def child_argv(name: str, *options: str) -> tuple[str, ...]:
    """The command that runs one process of the stack with this interpreter."""
    return (sys.executable, "-m", "llmos.kernel.cli", "serve", name, *options)
