"""HardwareService over gRPC: snapshots of the host, and reservations of device memory.

`Snapshot` and `Watch` read the CPU and memory (psutil), the GPUs (NVML, or the reason
there are none) and the processes of the services the kernel lists. `Reserve` and
`Release` keep the ledger (`ledger.py`); a sweep every `SWEEP_S` ends reservations whose
TTL passed or whose holder's process ended, and every call sweeps first, so a caller
never sees a reservation that has already ended. Reservations live in this process's
memory: a restarted hardware service starts with none, and holders renewing one get
NOT_FOUND and reserve again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from llmos.services.config import Settings
from llmos.services.errors import InvalidArgument
from llmos.services.hardware.checks import (
    CPU,
    Device,
    check_bytes,
    check_holder,
    check_reservation_id,
    check_ttl,
    holder_pid,
    human_bytes,
    parse_device,
    watch_interval,
)
from llmos.services.hardware.host import HostReader
from llmos.services.hardware.ledger import Capacity, Holder, Ledger
from llmos.services.hardware.nvml import GpuReader, import_pynvml
from llmos.services.hardware.processes import ProcessTable, is_alive, started_at
from llmos.services.hardware.registered import RegisteredServices
from llmos.services.rpc_types import Context
from llmos.services.timing import now_timestamp, timestamp_at
from llmos.v1 import common_pb2, hardware_pb2, hardware_pb2_grpc

log = logging.getLogger(__name__)

SWEEP_S = 0.5
# CPU figures are measured between readings; reading this often keeps them current for a
# first Snapshot (a lone `llmos top --once`), instead of measuring from the last caller.
WARM_S = 1.0


def _seconds(value: Any) -> float:
    return float(value.ToNanoseconds()) / 1e9


class Machine:
    """The readers of this host, used from worker threads (psutil and NVML block)."""

    def __init__(self, load_nvml: Callable[[], Any]) -> None:
        self.host = HostReader()
        self.gpus = GpuReader(load_nvml)
        self.processes = ProcessTable()

    def read(
        self, services: list[tuple[str, int]]
    ) -> tuple[
        hardware_pb2.CpuStats,
        Capacity,
        list[hardware_pb2.GpuStats],
        str,
        list[hardware_pb2.ProcessStats],
    ]:
        gpus, reason = self.gpus.read()
        return self.host.cpu(), self.host.memory(), gpus, reason, self.processes.read(services)


class HardwareServicer(hardware_pb2_grpc.HardwareServiceServicer):
    """The gRPC face of the machine readers and the reservation ledger."""

    def __init__(self, machine: Machine, registered: RegisteredServices) -> None:
        self.machine = machine
        self.registered = registered
        self.ledger = Ledger()

    # ------------------------------------------------------------ snapshots

    async def _services(self) -> list[tuple[str, int]]:
        return [(s.name, int(s.pid)) for s in await self.registered.list()]

    async def warm(self) -> None:
        """Take the CPU readings (host and processes) without building a snapshot."""
        services = await self._services()
        await asyncio.to_thread(self.machine.host.cpu)
        await asyncio.to_thread(self.machine.processes.read, services)

    async def snapshot(self) -> hardware_pb2.HardwareSnapshot:
        services = await self._services()
        cpu, memory, gpus, reason, processes = await asyncio.to_thread(self.machine.read, services)
        now = time.time()
        self.sweep(now)
        snapshot = hardware_pb2.HardwareSnapshot(
            taken_at=now_timestamp(),
            cpu=cpu,
            memory=hardware_pb2.MemoryStats(
                total_bytes=memory.total_bytes,
                available_bytes=memory.available_bytes,
                reserved_bytes=self.ledger.reserved(CPU, now),
            ),
            gpus=gpus,
            gpu_unavailable_reason=reason,
            processes=processes,
        )
        for gpu in snapshot.gpus:
            gpu.memory_reserved_bytes = self.ledger.reserved(Device("gpu", gpu.index), now)
        return snapshot

    async def Snapshot(
        self, request: hardware_pb2.HardwareServiceSnapshotRequest, context: Context
    ) -> hardware_pb2.HardwareServiceSnapshotResponse:
        return hardware_pb2.HardwareServiceSnapshotResponse(snapshot=await self.snapshot())

    async def Watch(
        self, request: hardware_pb2.HardwareServiceWatchRequest, context: Context
    ) -> AsyncIterator[hardware_pb2.HardwareServiceWatchResponse]:
        interval = watch_interval(request.HasField("interval"), _seconds(request.interval))
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            yield hardware_pb2.HardwareServiceWatchResponse(snapshot=await self.snapshot())
            # Keep to the requested cadence; a slow reading delays the next, never bunches.
            due = max(due + interval, loop.time())
            await asyncio.sleep(due - loop.time())

    # ------------------------------------------------------------ reservations

    def sweep(self, now: float) -> None:
        """End the reservations whose TTL passed or whose holder's process ended."""
        for ended in [*self.ledger.end_expired(now), *self.ledger.end_orphaned(is_alive)]:
            held = ended.reservation
            log.info(
                "reservation %s ended: %s (%s of %s for %r)",
                held.id,
                ended.why,
                human_bytes(held.bytes),
                held.device,
                held.holder.name,
            )

    async def _capacity(self, device: Device) -> Capacity:
        if device.kind == "cpu":
            return await asyncio.to_thread(self.machine.host.memory)
        capacity = await asyncio.to_thread(self.machine.gpus.capacity, device.index)
        if capacity is not None:
            return capacity
        gpus = self.machine.gpus
        have = (
            f"this host has gpu:0 to gpu:{gpus.count - 1}"
            if gpus.count
            else f"this host lists no GPU ({gpus.reason})"
        )
        raise InvalidArgument(
            f"device {device} is unknown: {have}; 'cpu' reserves host memory",
            reason="UNKNOWN_DEVICE",
            metadata={"device": str(device)},
        )

    async def _holder(self, name: str) -> Holder:
        """A "pid:N" holder must name a running process; a registered service's name is
        tied to the pid it registered with, when that process runs on this host."""
        pid = holder_pid(name)
        if pid is not None:
            created = await asyncio.to_thread(started_at, pid)
            if created is None:
                raise InvalidArgument(
                    f"holder {name!r}: no process {pid} runs on the hardware service's host; "
                    "name a running process, or a holder without 'pid:'",
                    reason="HOLDER_NOT_RUNNING",
                )
            return Holder(name, pid, created)
        pid = await self.registered.pid_of(name)
        created = None if pid is None else await asyncio.to_thread(started_at, pid)
        return Holder(name) if created is None else Holder(name, pid, created)

    async def Reserve(
        self, request: hardware_pb2.HardwareServiceReserveRequest, context: Context
    ) -> hardware_pb2.HardwareServiceReserveResponse:
        holder_name = check_holder(request.holder)
        ttl_s = check_ttl(request.HasField("ttl"), _seconds(request.ttl))
        if request.reservation_id:
            now = time.time()
            self.sweep(now)
            reservation = self.ledger.renew(
                request.reservation_id,
                holder_name,
                ttl_s,
                now,
                device=parse_device(request.device) if request.device else None,
                size=request.bytes or None,
            )
            log.debug("reservation %s renewed for %.0f s", reservation.id, ttl_s)
        else:
            device = parse_device(request.device)
            capacity = await self._capacity(device)
            size = check_bytes(request.bytes, device, capacity.total_bytes)
            holder = await self._holder(holder_name)
            now = time.time()
            self.sweep(now)
            reservation = self.ledger.reserve(
                device, size, holder, ttl_s=ttl_s, capacity=capacity, now=now
            )
            watched = f"process {holder.pid}" if holder.pid is not None else "no process"
            log.info(
                "reserved %s of %s for %r as %s (ttl %.0f s, watching %s)",
                human_bytes(size),
                device,
                holder_name,
                reservation.id,
                ttl_s,
                watched,
            )
        return hardware_pb2.HardwareServiceReserveResponse(
            reservation_id=reservation.id, expires_at=timestamp_at(reservation.expires_at)
        )

    async def Release(
        self, request: hardware_pb2.HardwareServiceReleaseRequest, context: Context
    ) -> hardware_pb2.HardwareServiceReleaseResponse:
        reservation_id = check_reservation_id(request.reservation_id)
        holder_name = check_holder(request.holder)
        now = time.time()
        self.sweep(now)
        released = self.ledger.release(reservation_id, holder_name, now)
        log.info(
            "released %s (%s of %s for %r)",
            released.id,
            human_bytes(released.bytes),
            released.device,
            holder_name,
        )
        return hardware_pb2.HardwareServiceReleaseResponse()


class HardwareService:
    """The hardware process: ready once NVML has been tried (found or not)."""

    kind = common_pb2.SERVICE_KIND_HARDWARE

    def __init__(self, settings: Settings, load_nvml: Callable[[], Any] = import_pynvml) -> None:
        self.machine = Machine(load_nvml)
        self.registered = RegisteredServices(settings)
        self.servicer = HardwareServicer(self.machine, self.registered)
        self._tasks: list[asyncio.Task[None]] = []

    def add_to_server(self, server: grpc.aio.Server) -> list[str]:
        hardware_pb2_grpc.add_HardwareServiceServicer_to_server(self.servicer, server)
        return [hardware_pb2.DESCRIPTOR.services_by_name["HardwareService"].full_name]

    @staticmethod
    async def _every(seconds: float, work: Callable[[], Awaitable[None]], what: str) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await work()
            except Exception:  # the next round may succeed; a dead loop never would
                log.exception("%s failed", what)

    async def _sweep(self) -> None:
        self.servicer.sweep(time.time())

    async def start(self) -> None:
        await asyncio.to_thread(self.machine.gpus.open)
        self._tasks = [
            asyncio.create_task(self._every(SWEEP_S, self._sweep, "the reservation sweep")),
            asyncio.create_task(self._every(WARM_S, self.servicer.warm, "the CPU reading")),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(self.machine.gpus.close)
        await self.registered.close()
