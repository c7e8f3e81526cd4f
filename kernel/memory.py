"""The kernel's view of memory: the host's headroom, which gates admission, and the
runtime's KV-cache decisions, which go into traces.

**Headroom** is the hardware service's available host memory minus what live
reservations hold on "cpu": what is free for new work without taking memory someone has
claimed. The kernel follows it with one `Watch` stream (a snapshot every
`WATCH_INTERVAL_S`) and keeps the last figure, so admission reads a cached number: no
gRPC call per request. With `kernel_min_free_mb` set, `Headroom.check` refuses new work
(`Generate`, `Submit`) while the headroom is below it, with RESOURCE_EXHAUSTED /
HOST_MEMORY_LOW, the figures in its metadata and a retry-after hint. Work already queued
runs on: it was admitted, and refusing it later would only waste what it has done.

Without a hardware service (none registered, unreachable, or silent for `STALE_S`) the
headroom is unknown and nothing is gated: memory accounting is optional, as it is for
the runtime. That is logged once when it happens, and again only after the headroom was
known in between. Each task's admit trace step carries the headroom the kernel saw when
it admitted the task (`Headroom.evidence`).

**KV decisions**: the runtime's last `Generate` message says how the sequence got its
KV-cache memory (`KvAdmission`); `kv_evidence` turns it into the runtime:generate trace
step's evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from types import MappingProxyType

import grpc

from llmos.kernel import metrics as kernel_metrics
from llmos.kernel.registry import Registry
from llmos.kernel.scheduler import Priority
from llmos.services.errors import InvalidArgument, ResourceExhausted, Unavailable
from llmos.services.hardware.checks import human_bytes
from llmos.services.timing import duration
from llmos.v1 import common_pb2, hardware_pb2, hardware_pb2_grpc, runtime_pb2

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0
# No snapshot for this long: the figure is too old to refuse work on.
STALE_S = 5.0
# Between attempts to find and follow a hardware service.
RETRY_S = 1.0
# What a refused client is told to wait: the headroom is read again within a second, but
# memory comes back as work finishes or reservations end, which takes longer.
RETRY_AFTER_MS = 2000


class Headroom:
    """The host's free memory as the hardware service last reported it, and the floor
    below which the kernel refuses new work."""

    def __init__(self, registry: Registry, floor_bytes: int) -> None:
        if floor_bytes < 0:
            raise InvalidArgument(
                f"kernel_min_free_mb is {floor_bytes // 2**20}; use 0 (no floor) or the MiB "
                "of host memory that must stay free for the kernel to accept new work",
                reason="BAD_SETTING",
            )
        self.registry = registry
        self.floor_bytes = floor_bytes
        # Available minus reserved host memory; None while unknown.
        self.free_bytes: int | None = None
        self.available_bytes = 0
        self.reserved_bytes = 0
        self.unknown = "the hardware service has not been asked yet"
        self.evidence: Mapping[str, str] = self._unknown_evidence()
        self._below = False
        self._logged_unknown = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="headroom")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def check(self, priority: Priority) -> None:
        """Refuse new work of class `priority` while the headroom is below the floor: O(1),
        on the cached figure. Unknown headroom, or no floor, refuses nothing."""
        free = self.free_bytes
        if self.floor_bytes <= 0 or free is None or free >= self.floor_bytes:
            return
        kernel_metrics.admission_refused(priority, "HOST_MEMORY_LOW")
        raise ResourceExhausted(
            f"host memory is low: {human_bytes(max(free, 0))} is free "
            f"({human_bytes(self.available_bytes)} available minus "
            f"{human_bytes(self.reserved_bytes)} reserved), below the kernel's floor of "
            f"{human_bytes(self.floor_bytes)} (kernel_min_free_mb); retry later",
            reason="HOST_MEMORY_LOW",
            metadata={
                "retry_after_ms": str(RETRY_AFTER_MS),
                "free_bytes": str(free),
                "floor_bytes": str(self.floor_bytes),
                "available_bytes": str(self.available_bytes),
                "reserved_bytes": str(self.reserved_bytes),
            },
        )

    # -- following the hardware service -------------------------------------------------

    async def _follow(self) -> None:
        while True:
            try:
                entry = self.registry.pick(common_pb2.SERVICE_KIND_HARDWARE)
            except Unavailable:
                self._lose("no hardware service is serving")
                await asyncio.sleep(RETRY_S)
                continue
            where = f"hardware at {entry.info.address}"
            call = hardware_pb2_grpc.HardwareServiceStub(entry.channel).Watch(
                hardware_pb2.HardwareServiceWatchRequest(interval=duration(WATCH_INTERVAL_S))
            )
            try:
                while True:
                    async with asyncio.timeout(STALE_S):
                        reply = await call.read()
                    if not isinstance(reply, hardware_pb2.HardwareServiceWatchResponse):
                        self._lose(f"Watch on {where} ended")
                        break
                    self._seen(reply.snapshot.memory, where)
            except TimeoutError:
                self._lose(f"no snapshot from {where} for {STALE_S:.0f} s")
            except grpc.aio.AioRpcError as error:
                self._lose(f"Watch on {where} failed with {error.code().name}: {error.details()}")
            finally:
                call.cancel()
            await asyncio.sleep(RETRY_S)

    def _seen(self, memory: hardware_pb2.MemoryStats, where: str) -> None:
        free = memory.available_bytes - memory.reserved_bytes
        if self.free_bytes is None:
            gate = (
                f"new work is refused below {human_bytes(self.floor_bytes)}"
                if self.floor_bytes > 0
                else "nothing is gated (kernel_min_free_mb = 0)"
            )
            log.info("host memory from %s: %s free; %s", where, human_bytes(max(free, 0)), gate)
        self.free_bytes = free
        self.available_bytes = memory.available_bytes
        self.reserved_bytes = memory.reserved_bytes
        self._logged_unknown = False
        self.evidence = MappingProxyType(
            {
                "host_memory_free_bytes": str(free),
                "host_memory_floor_bytes": str(self.floor_bytes),
            }
        )
        below = self.floor_bytes > 0 and free < self.floor_bytes
        if below != self._below:
            self._below = below
            if below:
                log.warning(
                    "host memory is low: %s free, below kernel_min_free_mb (%s): refusing new work",
                    human_bytes(max(free, 0)),
                    human_bytes(self.floor_bytes),
                )
            else:
                log.info("host memory: %s free again: accepting new work", human_bytes(free))

    def _lose(self, why: str) -> None:
        self.free_bytes = None
        self.unknown = why
        self._below = False
        self.evidence = self._unknown_evidence()
        if not self._logged_unknown:
            self._logged_unknown = True
            if self.floor_bytes > 0:
                log.warning("admission is not gated by host memory: %s", why)
            else:
                log.info("host memory headroom unknown: %s", why)

    def _unknown_evidence(self) -> Mapping[str, str]:
        return MappingProxyType(
            {
                "host_memory_unknown": self.unknown,
                "host_memory_floor_bytes": str(self.floor_bytes),
            }
        )


def kv_evidence(kv: runtime_pb2.KvAdmission) -> dict[str, str]:
    """The runtime's memory decision for a sequence, as trace-step evidence."""
    wait_ms = kv.memory_wait.seconds * 1000 + kv.memory_wait.nanos / 1e6
    return {
        "kv_decision": kv.decision,
        "kv_batch_bytes": str(kv.batch_bytes),
        "kv_reserved_bytes": str(kv.reserved_bytes),
        "kv_memory_wait_ms": f"{wait_ms:.0f}",
        "kv_reason": kv.reason,
    }
