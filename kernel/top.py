"""`llmos top`: a live terminal view of the stack, refreshed in place — the services and
their health, queued and running tasks, CPU, memory and GPUs; `--once` prints one frame.

It only reads: ListServices and ListTasks from the kernel, and Snapshot from the hardware
service the kernel lists (dialled directly, since the kernel does not relay the hardware
contract). A part that cannot be read is shown with the reason instead of ending the view,
so `top` stays useful while a service restarts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os

import grpc
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from llmos.kernel.registry import HEALTH_NAMES, KIND_NAMES
from llmos.services.channels import open_channel
from llmos.services.config import Settings
from llmos.services.errors import InvalidArgument
from llmos.services.hardware.checks import human_bytes
from llmos.v1 import common_pb2, hardware_pb2, hardware_pb2_grpc, kernel_pb2, kernel_pb2_grpc

CALL_TIMEOUT_S = 3.0
TASK_PAGE = 100  # counted exactly up to this many per state; more shows as "100+"
TASK_ROWS = 10
MIN_INTERVAL_S = 0.2
HEALTH_STYLES = {"SERVING": "green", "NOT_SERVING": "yellow", "UNREACHABLE": "red"}


@dataclasses.dataclass
class TaskCount:
    tasks: list[kernel_pb2.Task]
    more: bool

    def __str__(self) -> str:
        return f"{len(self.tasks)}{'+' if self.more else ''}"


@dataclasses.dataclass
class Frame:
    """Everything one refresh read, and why a part is missing when it is."""

    kernel: str
    taken_at: datetime.datetime
    services: list[kernel_pb2.ServiceInfo] | None = None
    queued: TaskCount | None = None
    running: TaskCount | None = None
    snapshot: hardware_pb2.HardwareSnapshot | None = None
    errors: dict[str, str] = dataclasses.field(default_factory=dict)


class Reader:
    """Reads frames over channels kept open between refreshes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, target: str) -> grpc.aio.Channel:
        if target not in self._channels:
            self._channels[target] = open_channel(target, self.settings.max_message_bytes)
        return self._channels[target]

    async def _tasks(self, state: common_pb2.TaskState.ValueType) -> TaskCount:
        stub = kernel_pb2_grpc.KernelServiceStub(self._channel(self.settings.kernel_target))
        reply = await stub.ListTasks(
            kernel_pb2.ListTasksRequest(state=state, page_size=TASK_PAGE), timeout=CALL_TIMEOUT_S
        )
        return TaskCount(list(reply.tasks), bool(reply.next_page_token))

    async def _snapshot(
        self, services: list[kernel_pb2.ServiceInfo]
    ) -> hardware_pb2.HardwareSnapshot:
        hardware = [s for s in services if s.kind == common_pb2.SERVICE_KIND_HARDWARE]
        hardware.sort(key=lambda s: s.health != common_pb2.SERVICE_HEALTH_SERVING)
        if not hardware:
            raise LookupError("no hardware service is registered with the kernel")
        stub = hardware_pb2_grpc.HardwareServiceStub(self._channel(hardware[0].address))
        reply = await stub.Snapshot(
            hardware_pb2.HardwareServiceSnapshotRequest(), timeout=CALL_TIMEOUT_S
        )
        return reply.snapshot

    async def read(self) -> Frame:
        frame = Frame(self.settings.kernel_target, datetime.datetime.now())
        kernel = kernel_pb2_grpc.KernelServiceStub(self._channel(self.settings.kernel_target))
        try:
            reply = await kernel.ListServices(
                kernel_pb2.ListServicesRequest(), timeout=CALL_TIMEOUT_S
            )
            frame.services = list(reply.services)
        except grpc.aio.AioRpcError as error:
            frame.errors["services"] = f"the kernel is not reachable: {error.details()}"
            return frame
        try:
            frame.queued = await self._tasks(common_pb2.TASK_STATE_QUEUED)
            frame.running = await self._tasks(common_pb2.TASK_STATE_RUNNING)
        except grpc.aio.AioRpcError as error:
            frame.errors["tasks"] = f"ListTasks failed: {error.code().name}: {error.details()}"
        try:
            frame.snapshot = await self._snapshot(frame.services)
        except LookupError as error:
            frame.errors["hardware"] = str(error)
        except grpc.aio.AioRpcError as error:
            frame.errors["hardware"] = f"Snapshot failed: {error.code().name}: {error.details()}"
        return frame

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


# ---------------------------------------------------------------- rendering


def _bar(percent: float) -> ProgressBar:
    return ProgressBar(total=100.0, completed=percent, width=20)


def _services(frame: Frame) -> RenderableType:
    if frame.services is None:
        return Text(f"services: {frame.errors['services']}", style="red")
    by_pid = {p.pid: p for p in frame.snapshot.processes} if frame.snapshot else {}
    table = Table(title="services", title_justify="left", expand=False)
    for column in ("SERVICE", "KIND", "ADDRESS", "PID", "HEALTH"):
        table.add_column(column)
    table.add_column("RSS", justify="right")
    table.add_column("CPU%", justify="right")
    for service in sorted(frame.services, key=lambda s: s.name):
        health = HEALTH_NAMES.get(service.health, "UNSPECIFIED")
        process = by_pid.get(service.pid)
        table.add_row(
            service.name,
            KIND_NAMES.get(service.kind, "?"),
            service.address,
            str(service.pid or "-"),
            Text(health, style=HEALTH_STYLES.get(health, "")),
            human_bytes(process.rss_bytes) if process else "-",
            f"{process.cpu_percent:.1f}" if process else "-",
        )
    return table


def _age(task: kernel_pb2.Task, now: datetime.datetime) -> str:
    created = task.created_at.ToDatetime(tzinfo=datetime.UTC)
    seconds = max(0.0, (now.astimezone(datetime.UTC) - created).total_seconds())
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def _tasks(frame: Frame) -> RenderableType:
    if frame.queued is None or frame.running is None:
        return Text(f"tasks: {frame.errors.get('tasks', 'not read')}", style="red")
    heading = Text(f"tasks: {frame.running} running, {frame.queued} queued")
    rows = [*frame.running.tasks, *frame.queued.tasks][:TASK_ROWS]
    if not rows:
        return heading
    table = Table(expand=False, box=None)
    for column in ("TASK", "TENANT", "STATE", "TOKENS", "AGE"):
        table.add_column(column)
    for task in rows:
        table.add_row(
            task.task_id,
            task.tenant,
            common_pb2.TaskState.Name(task.state).removeprefix("TASK_STATE_"),
            str(task.usage.completion_tokens),
            _age(task, frame.taken_at),
        )
    return Group(heading, table)


def _cpu(cpu: hardware_pb2.CpuStats) -> RenderableType:
    load = " ".join(f"{value:.2f}" for value in cpu.load_average)
    table = Table.grid(padding=(0, 1))
    table.add_row(f"CPU  {cpu.percent:5.1f}%", _bar(cpu.percent), f"{cpu.cores} cores, load {load}")
    for index, percent in enumerate(cpu.per_core_percent):
        table.add_row(f"cpu{index:<3}{percent:5.1f}%", _bar(percent), "")
    return table


def _memory(memory: hardware_pb2.MemoryStats) -> RenderableType:
    used = memory.total_bytes - memory.available_bytes
    percent = 100.0 * used / memory.total_bytes if memory.total_bytes else 0.0
    table = Table.grid(padding=(0, 1))
    table.add_row(
        f"MEM  {percent:5.1f}%",
        _bar(percent),
        f"{human_bytes(memory.available_bytes)} available of {human_bytes(memory.total_bytes)}, "
        f"{human_bytes(memory.reserved_bytes)} reserved",
    )
    return table


def _gpus(snapshot: hardware_pb2.HardwareSnapshot) -> RenderableType:
    if not snapshot.gpus:
        return Text(f"GPUs: none ({snapshot.gpu_unavailable_reason})")
    table = Table(title="GPUs", title_justify="left", expand=False)
    for column in ("GPU", "NAME", "MEMORY USED", "RESERVED", "UTIL%", "TEMP", "POWER"):
        table.add_column(column)
    for gpu in snapshot.gpus:
        table.add_row(
            f"gpu:{gpu.index}",
            gpu.name,
            f"{human_bytes(gpu.memory_used_bytes)} / {human_bytes(gpu.memory_total_bytes)}",
            human_bytes(gpu.memory_reserved_bytes),
            f"{gpu.utilization_percent:.0f}",
            f"{gpu.temperature_celsius:.0f} C",
            f"{gpu.power_watts:.0f} W",
        )
    return table


def render(frame: Frame) -> RenderableType:
    parts: list[RenderableType] = [
        Text(
            f"llmos top — kernel {frame.kernel} — {frame.taken_at:%Y-%m-%d %H:%M:%S}", style="bold"
        ),
        _services(frame),
    ]
    if frame.services is not None:
        parts.append(_tasks(frame))
        if frame.snapshot is None:
            parts.append(Text(f"hardware: {frame.errors.get('hardware', 'not read')}", style="red"))
        else:
            parts += [
                _cpu(frame.snapshot.cpu),
                _memory(frame.snapshot.memory),
                _gpus(frame.snapshot),
            ]
    return Group(*parts)


# ---------------------------------------------------------------- the command


def _console() -> Console:
    """Piped output (scripts, `--once | grep`) gets 120 columns unless COLUMNS says otherwise,
    so addresses and task ids are not cut at rich's default of 80."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=120)
    return console


async def _run(settings: Settings, once: bool, interval: float) -> int:
    reader = Reader(settings)
    console = _console()
    try:
        frame = await reader.read()
        if once:
            console.print(render(frame))
            return 0 if frame.services is not None else 1
        with Live(render(frame), console=console, auto_refresh=False, screen=False) as live:
            while True:
                await asyncio.sleep(interval)
                live.update(render(await reader.read()), refresh=True)
    finally:
        await reader.close()


def top(settings: Settings, *, once: bool, interval: float) -> int:
    """Run the view until Ctrl-C (exit 0), or print one frame (exit 1: no kernel)."""
    if interval < MIN_INTERVAL_S:
        raise InvalidArgument(
            f"--interval must be at least {MIN_INTERVAL_S} s, got {interval}",
            reason="BAD_INTERVAL",
        )
    try:
        return asyncio.run(_run(settings, once, interval))
    except KeyboardInterrupt:
        return 0
