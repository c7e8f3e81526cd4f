"""`llmos up`'s supervisor with real processes: health-gated start in order, restart of a
crashed child, the restart-intensity limit, reverse-order stop, and no orphans.

Most tests run a small `Supervisor` of light children (`llmos serve kernel|safety|privacy`,
no language model; safety loads the encoder the session exported once) in the test's own
event loop, so they can look inside it. Two tests run the whole stack with the CLI
(`llmos up`) as a separate process, one at a time, to check what only a separate
supervisor process can show: SIGTERM to it, and SIGKILL of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stacktools import STACK_SIZE, Stack, free_port_block, stack_data_dir, start_stack, stop_stack

from llmos.kernel.stack import BY_NAME, STACK
from llmos.kernel.supervisor import Child, RestartIntensity, Supervisor, child_argv
from llmos.v1 import kernel_pb2, kernel_pb2_grpc

SUPERVISOR_LOGGER = "llmos.kernel.supervisor"
SERVING = health_pb2.HealthCheckResponse.SERVING


# ---------------------------------------------------------------- helpers


def alive(process: psutil.Process) -> bool:
    """Whether this very process (pid and start time) still runs; a zombie counts as gone."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def health(address: str) -> int | None:
    """The grpc.health.v1 status at `address`, or None when it does not answer."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1.0
            )
        except grpc.aio.AioRpcError:
            return None
    return int(reply.status)


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout_s: float, what: str, interval_s: float = 0.1
) -> float:
    """Seconds until `check()` holds; fails the test with `what` after `timeout_s`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(interval_s)
    pytest.fail(f"{what}: not within {timeout_s:.0f}s")


class Light:
    """Light children of a stack on a free block of ports (kernel at `base`)."""

    def __init__(self, base: int, data_dir: Path) -> None:
        self.base = base
        self.data_dir = data_dir
        self.kernel_address = f"127.0.0.1:{base}"
        self.seen: list[psutil.Process] = []

    def child(self, name: str, *, address: str | None = None) -> Child:
        return Child(
            id=name,
            argv=child_argv(name, "--port", str(self.base), "--data-dir", str(self.data_dir)),
            address=address or f"127.0.0.1:{self.base + BY_NAME[name].port_offset}",
            shutdown_timeout_s=10.0,
        )

    def track(self, supervisor: Supervisor) -> dict[str, psutil.Process]:
        """The supervisor's current child processes; remembered for the final clean-up."""
        current = {}
        for name, process in supervisor.processes.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                found = psutil.Process(process.pid)
                current[name] = found
                if all(found.pid != p.pid for p in self.seen):
                    self.seen.append(found)
        return current


@pytest.fixture
def light(shared_data_dir: Path, tmp_path: Path) -> Iterator[Light]:
    # The session's models folder: safety loads the encoder exported there, not a new export.
    children = Light(free_port_block(STACK_SIZE), stack_data_dir(shared_data_dir, tmp_path))
    yield children
    for process in children.seen:  # whatever a failed test left behind
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


@pytest.fixture
def supervisor_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=SUPERVISOR_LOGGER)
    return caplog


@contextlib.asynccontextmanager
async def supervising(supervisor: Supervisor) -> AsyncIterator[asyncio.Task[int]]:
    """Run `supervisor.run()` in this loop; stop it on the way out if the test did not."""
    task = asyncio.create_task(supervisor.run())
    try:
        yield task
    finally:
        if not task.done():
            supervisor.request_stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 60)


def supervisor_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == SUPERVISOR_LOGGER]


def times_seen_healthy(caplog: pytest.LogCaptureFixture, child_id: str) -> int:
    """How often the supervisor itself has seen this child become healthy (its log says so)."""
    return sum(m.startswith(f"{child_id} is healthy at ") for m in supervisor_messages(caplog))


async def wait_all_serving(
    light: Light,
    supervisor: Supervisor,
    task: asyncio.Task[int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every child answers SERVING, and the supervisor has finished starting them all."""

    async def all_serving() -> bool:
        if task.done():
            pytest.fail(f"the supervisor ended early with {task.result()}")
        if not any(m.startswith("all ") for m in supervisor_messages(caplog)):
            return False
        light.track(supervisor)
        statuses = [await health(child.address) for child in supervisor.children]
        return all(status == SERVING for status in statuses)

    await eventually(all_serving, 60, "every child SERVING")


async def kill_and_wait_for_restart(
    light: Light,
    supervisor: Supervisor,
    task: asyncio.Task[int],
    caplog: pytest.LogCaptureFixture,
    child: Child,
) -> tuple[int, int]:
    """SIGKILL `child`; return (old pid, new pid) once a new process of it is SERVING.

    "SERVING" both to our own health check and in the supervisor's view (its log), so that
    a next kill hits a supervising supervisor, not one still waiting for the restart.
    """
    old_pid = supervisor.processes[child.id].pid
    seen_healthy = times_seen_healthy(caplog, child.id)
    os.kill(old_pid, signal.SIGKILL)

    async def restarted() -> bool:
        if task.done():
            return True  # reported below
        process = supervisor.processes[child.id]
        return (
            process.pid != old_pid
            and times_seen_healthy(caplog, child.id) > seen_healthy
            and await health(child.address) == SERVING
        )

    await eventually(restarted, 60, f"{child.id} restarted after SIGKILL")
    assert not task.done(), f"the supervisor ended with {task.result()} instead of restarting"
    light.track(supervisor)
    return old_pid, supervisor.processes[child.id].pid


# ---------------------------------------------------------------- in-process supervisor


async def test_children_start_in_order_each_only_after_the_previous_is_serving(
    light: Light, supervisor_log: pytest.LogCaptureFixture
) -> None:
    children = [light.child("kernel"), light.child("safety"), light.child("privacy")]
    supervisor = Supervisor(children, RestartIntensity(5, 60), ready_timeout_s=60)
    appeared: list[str] = []
    # For each child: the health of every earlier child at the moment this one was spawned.
    earlier_health: dict[str, dict[str, int | None]] = {}
    async with supervising(supervisor) as task:
        deadline = time.monotonic() + 60
        while len(appeared) < len(children) and time.monotonic() < deadline:
            assert not task.done(), f"the supervisor ended early with {task.result()}"
            for index, child in enumerate(children):
                if child.id in supervisor.processes and child.id not in appeared:
                    appeared.append(child.id)
                    earlier_health[child.id] = {
                        c.id: await health(c.address) for c in children[:index]
                    }
            await asyncio.sleep(0.005)
        await wait_all_serving(light, supervisor, task, supervisor_log)
        processes = light.track(supervisor)
        supervisor.request_stop()
        assert await asyncio.wait_for(task, 60) == 0

    assert appeared == ["kernel", "safety", "privacy"]
    for child_id, statuses in earlier_health.items():
        assert all(s == SERVING for s in statuses.values()), (
            f"{child_id} was started before an earlier child was SERVING: {statuses}"
        )
    # The processes were created in that order too (by the kernel's clock).
    created = [processes[child.id].create_time() for child in children]
    assert created == sorted(created)
    # The supervisor's own account agrees: each child started, then healthy, then the next.
    messages = supervisor_messages(supervisor_log)
    order = [
        m.split()[0] if " is healthy at " in m else m.split()[1]
        for m in messages
        if m.startswith("started ") or " is healthy at " in m
    ]
    assert order == ["kernel", "kernel", "safety", "safety", "privacy", "privacy"], messages


async def test_a_child_that_never_serves_blocks_the_next_and_the_supervisor_gives_up(
    light: Light, supervisor_log: pytest.LogCaptureFixture
) -> None:
    # Nothing listens where the supervisor looks for safety, so it never reports SERVING.
    wrong = f"127.0.0.1:{light.base + 5}"
    children = [light.child("safety", address=wrong), light.child("privacy")]
    supervisor = Supervisor(children, RestartIntensity(5, 60), ready_timeout_s=4)
    started = time.monotonic()
    async with supervising(supervisor) as task:

        async def spawned() -> bool:
            return "safety" in supervisor.processes

        await eventually(spawned, 30, "safety spawned")
        safety = light.track(supervisor)["safety"]
        assert await asyncio.wait_for(task, 60) == 1
    elapsed = time.monotonic() - started

    assert "privacy" not in supervisor.processes, "privacy started before safety was SERVING"
    assert 4 <= elapsed < 30
    assert not alive(safety), "the supervisor gave up but left safety running"
    assert any(
        m.startswith("giving up") and "safety" in m and "SERVING" in m
        for m in supervisor_messages(supervisor_log)
    ), supervisor_messages(supervisor_log)


async def test_a_killed_child_is_restarted_and_serves_again(
    light: Light, supervisor_log: pytest.LogCaptureFixture
) -> None:
    kernel, safety = light.child("kernel"), light.child("safety")
    supervisor = Supervisor([kernel, safety], RestartIntensity(5, 60), ready_timeout_s=60)
    async with supervising(supervisor) as task:
        await wait_all_serving(light, supervisor, task, supervisor_log)
        kernel_pid = supervisor.processes["kernel"].pid
        old_pid, new_pid = await kill_and_wait_for_restart(
            light, supervisor, task, supervisor_log, safety
        )

        assert new_pid != old_pid
        assert not alive(next(p for p in light.seen if p.pid == old_pid))
        assert supervisor.processes["kernel"].pid == kernel_pid, "only the crashed child restarts"

        # The new process registered itself with the kernel under its new pid.
        async def registered_again() -> bool:
            async with grpc.aio.insecure_channel(light.kernel_address) as channel:
                reply = await kernel_pb2_grpc.KernelServiceStub(channel).ListServices(
                    kernel_pb2.ListServicesRequest(), timeout=5
                )
            return any(s.name == "safety" and s.pid == new_pid for s in reply.services)

        await eventually(registered_again, 20, "the restarted safety registered")
        supervisor.request_stop()
        assert await asyncio.wait_for(task, 60) == 0


async def test_restart_intensity_exceeded_gives_up_and_stops_everything(
    light: Light, supervisor_log: pytest.LogCaptureFixture
) -> None:
    kernel, safety = light.child("kernel"), light.child("safety")
    supervisor = Supervisor([kernel, safety], RestartIntensity(2, 60), ready_timeout_s=60)
    async with supervising(supervisor) as task:
        await wait_all_serving(light, supervisor, task, supervisor_log)
        for _ in range(2):  # two restarts are within the intensity
            await kill_and_wait_for_restart(light, supervisor, task, supervisor_log, safety)
        os.kill(supervisor.processes["safety"].pid, signal.SIGKILL)  # the third is not
        started = time.monotonic()
        status = await asyncio.wait_for(task, 60)
        stopped_in = time.monotonic() - started

    assert status == 1
    assert stopped_in < 15
    assert len(light.seen) == 4, "kernel plus three safety processes"
    assert [p.pid for p in light.seen if alive(p)] == [], "children outlived the give-up"
    messages = supervisor_messages(supervisor_log)
    assert sum(m.endswith("; restarting it") for m in messages) == 2, messages
    give_up = [m for m in messages if m.startswith("giving up")]
    assert len(give_up) == 1 and "safety" in give_up[0] and "2 times" in give_up[0], messages


async def test_stop_request_stops_children_in_reverse_order_gracefully(
    light: Light, supervisor_log: pytest.LogCaptureFixture
) -> None:
    children = [light.child("kernel"), light.child("safety"), light.child("privacy")]
    supervisor = Supervisor(children, RestartIntensity(5, 60), ready_timeout_s=60)
    exits: list[tuple[str, int]] = []
    async with supervising(supervisor) as task:
        await wait_all_serving(light, supervisor, task, supervisor_log)
        processes = light.track(supervisor)

        async def record_exit(child_id: str) -> None:
            exits.append((child_id, await supervisor.processes[child_id].wait()))

        watchers = [asyncio.create_task(record_exit(child.id)) for child in children]
        await asyncio.sleep(0.2)
        assert exits == [], "a child exited before the stop was requested"
        supervisor.request_stop()
        assert await asyncio.wait_for(task, 60) == 0
        await asyncio.wait_for(asyncio.gather(*watchers), 5)

    # Each child was stopped (and gone) before the one started before it was told to stop.
    assert [child_id for child_id, _ in exits] == ["privacy", "safety", "kernel"]
    # SIGTERM sufficed: each shut down gracefully (status 0), none needed SIGKILL.
    assert [status for _, status in exits] == [0, 0, 0]
    assert [p.pid for p in processes.values() if alive(p)] == []
    messages = supervisor_messages(supervisor_log)
    stopping = [m.split()[1] for m in messages if m.startswith("stopping ")]
    assert stopping == ["privacy", "safety", "kernel"], messages
    assert not any("killing it" in m for m in messages), messages


# ---------------------------------------------------------------- `llmos up` as a process


# Children of the `full_stack` of the running test, found by `stack_children`.
SEEN_CHILDREN: list[psutil.Process] = []


@pytest.fixture
def full_stack(shared_data_dir: Path, tmp_path: Path) -> Iterator[Stack]:
    """A second whole stack (the session's `stack` may be running too), stopped on the way out.

    Every service of `llmos up` runs, the runtime with its echo engine: these tests are
    about the supervisor and its six children, not the model, and loading the model would
    add seconds to each start and each stop."""
    SEEN_CHILDREN.clear()
    running = start_stack(
        shared_data_dir, tmp_path / "llmos-up.log", env={"LLMOS_RUNTIME_ENGINE": "echo"}
    )
    try:
        yield running
    finally:
        with contextlib.suppress(Exception):
            stop_stack(running)
        for process in SEEN_CHILDREN:  # whatever a failed test left behind
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def stack_children(stack: Stack) -> dict[str, psutil.Process]:
    """The supervisor's child processes by name (`serve NAME`), checked against the registry."""
    by_name = {}
    for process in psutil.Process(stack.process.pid).children():
        argv = process.cmdline()
        by_name[argv[argv.index("serve") + 1]] = process
        SEEN_CHILDREN.append(process)
    assert sorted(by_name) == sorted(spec.name for spec in STACK)
    registered = stack.services()
    for name, info in registered.items():
        assert by_name[name].pid == info.pid, f"{name}: registered pid is not the child's"
    return by_name


def wait_all_gone(processes: dict[str, psutil.Process], timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if not any(alive(p) for p in processes.values()):
            return time.monotonic() - started
        time.sleep(0.1)
    left = {name: p.pid for name, p in processes.items() if alive(p)}
    pytest.fail(f"still running {timeout_s:.0f}s later: {left}")


def test_sigterm_to_llmos_up_stops_the_stack_in_reverse_order(full_stack: Stack) -> None:
    full_stack.wait_healthy(timeout_s=120)
    children = stack_children(full_stack)

    full_stack.process.send_signal(signal.SIGTERM)
    status = full_stack.process.wait(timeout=90)

    assert status == 0
    assert [name for name, p in children.items() if alive(p)] == []
    records = []
    for line in full_stack.log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    supervisor = [r["msg"] for r in records if r.get("service") == "supervisor"]
    stopping = [m.split()[1] for m in supervisor if m.startswith("stopping ")]
    assert stopping == [spec.name for spec in reversed(STACK)], supervisor
    assert not any("killing it" in m for m in supervisor), supervisor


def test_llmos_up_killed_with_sigkill_leaves_no_orphans(full_stack: Stack) -> None:
    full_stack.wait_healthy(timeout_s=120)
    children = stack_children(full_stack)
    assert all(alive(p) for p in children.values())

    full_stack.process.send_signal(signal.SIGKILL)
    full_stack.process.wait(timeout=10)
    gone_in = wait_all_gone(children, timeout_s=15)

    assert gone_in < 15
    # Nothing answers on the stack's ports any more.
    assert full_stack.llmos("status").returncode == 1


# ---------------------------------------------------------------- stops and crashes at odd times


async def test_a_stop_requested_while_a_child_is_starting_is_honoured_at_once(
    light: Light, supervisor_log: pytest.LogCaptureFixture
) -> None:
    # Like SIGTERM to `llmos up` while the runtime still loads its model: safety never
    # reports SERVING here, and the stop must not wait for its ready timeout.
    wrong = f"127.0.0.1:{light.base + 5}"
    children = [light.child("safety", address=wrong), light.child("privacy")]
    supervisor = Supervisor(children, RestartIntensity(5, 60), ready_timeout_s=20)
    async with supervising(supervisor) as task:

        async def spawned() -> bool:
            return "safety" in supervisor.processes

        await eventually(spawned, 30, "safety spawned")
        safety = light.track(supervisor)["safety"]
        await asyncio.sleep(0.5)
        supervisor.request_stop()
        started = time.monotonic()
        status = await asyncio.wait_for(task, 60)
        stopped_in = time.monotonic() - started

    assert stopped_in < 10, f"the stop took {stopped_in:.1f}s: it waited for the ready timeout"
    assert status == 0, "a requested stop is not a failure"
    assert "privacy" not in supervisor.processes
    assert not alive(safety)
    assert not any(m.startswith("giving up") for m in supervisor_messages(supervisor_log))


async def test_a_child_that_crashes_again_while_restarting_is_restarted_within_the_intensity(
    light: Light, supervisor_log: pytest.LogCaptureFixture
) -> None:
    kernel, safety = light.child("kernel"), light.child("safety")
    supervisor = Supervisor([kernel, safety], RestartIntensity(5, 60), ready_timeout_s=60)
    async with supervising(supervisor) as task:
        await wait_all_serving(light, supervisor, task, supervisor_log)
        first_pid = supervisor.processes["safety"].pid
        os.kill(first_pid, signal.SIGKILL)

        async def respawned() -> bool:
            return task.done() or supervisor.processes["safety"].pid != first_pid

        await eventually(respawned, 30, "safety respawned", interval_s=0.005)
        assert not task.done(), f"the supervisor ended with {task.result()}"
        second_pid = supervisor.processes["safety"].pid
        light.track(supervisor)
        # The restarted process dies too, before it is ready (a crash during start-up):
        # one more restart, still well within 5 in 60s.
        os.kill(second_pid, signal.SIGKILL)

        async def serving_again() -> bool:
            if task.done():
                return True
            process = supervisor.processes["safety"]
            return (
                process.pid not in (first_pid, second_pid)
                and await health(safety.address) == SERVING
            )

        await eventually(serving_again, 60, "safety serving after its second crash")
        assert not task.done(), (
            f"the supervisor gave up (status {task.result()}) with 3 of 5 restarts left: "
            f"{supervisor_messages(supervisor_log)}"
        )
        supervisor.request_stop()
        assert await asyncio.wait_for(task, 60) == 0


# A supervisor in a process of its own, as `llmos up` runs at a terminal.
SUPERVISOR_SCRIPT = """
import asyncio, sys
from llmos.kernel.supervisor import Child, RestartIntensity, Supervisor, child_argv
from llmos.kernel.stack import BY_NAME
from llmos.services.logs import configure_logging

base, data_dir = int(sys.argv[1]), sys.argv[2]
configure_logging("supervisor", "info", "json")
children = [
    Child(
        name,
        child_argv(name, "--port", str(base), "--data-dir", data_dir),
        f"127.0.0.1:{base + BY_NAME[name].port_offset}",
        10.0,
    )
    for name in ("kernel", "safety", "privacy")
]
sys.exit(asyncio.run(Supervisor(children, RestartIntensity(5, 60), 60).run()))
"""


def test_ctrl_c_at_a_terminal_stops_children_in_reverse_order(light: Light, tmp_path: Path) -> None:
    log_path = tmp_path / "supervisor.log"
    with log_path.open("wb") as log:
        # Its own session: the test sends SIGINT to that whole process group, as a terminal
        # does on Ctrl-C, without hitting pytest.
        process = subprocess.Popen(
            [sys.executable, "-c", SUPERVISOR_SCRIPT, str(light.base), str(light.data_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def supervisor_lines() -> list[str]:
            lines = []
            for line in log_path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("service") == "supervisor":
                        lines.append(record["msg"])
            return lines

        deadline = time.monotonic() + 60
        while not any(m.startswith("all 3 processes") for m in supervisor_lines()):
            assert process.poll() is None, supervisor_lines()
            assert time.monotonic() < deadline, f"not all healthy in 60s: {supervisor_lines()}"
            time.sleep(0.1)
        children = {}
        for child in psutil.Process(process.pid).children():
            argv = child.cmdline()
            children[argv[argv.index("serve") + 1]] = child
        light.seen.extend(children.values())
        assert sorted(children) == ["kernel", "privacy", "safety"]

        os.killpg(process.pid, signal.SIGINT)
        sent = time.monotonic()
        gone_at: dict[str, float] = {}
        while len(gone_at) < len(children) and time.monotonic() - sent < 30:
            for name, child in children.items():
                if name not in gone_at and not alive(child):
                    gone_at[name] = time.monotonic() - sent
            time.sleep(0.01)
        status = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    order = sorted(gone_at, key=gone_at.__getitem__)
    assert status == 0
    assert len(gone_at) == 3, f"still running: {set(children) - set(gone_at)}"
    assert order == ["privacy", "safety", "kernel"], (
        f"exit order {order} (seconds after Ctrl-C: {gone_at}); supervisor: {supervisor_lines()}"
    )
