"""The service registry: who is running where, and whether the kernel can reach them now.

Services register themselves (a lease they renew); for each one the kernel keeps a
channel and a grpc.health.v1 Watch stream, so it learns within moments that a service
went NOT_SERVING or disappeared (the stream breaks), not at the next request. A service
whose lease runs out is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import itertools
import logging
import time

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmos.services.channels import open_channel
from llmos.services.errors import InvalidArgument, Unavailable
from llmos.v1 import common_pb2, kernel_pb2

log = logging.getLogger(__name__)

HEALTH_FROM_PROTO = {
    health_pb2.HealthCheckResponse.SERVING: common_pb2.SERVICE_HEALTH_SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING: common_pb2.SERVICE_HEALTH_NOT_SERVING,
}
KIND_NAMES = {
    value: name.removeprefix("SERVICE_KIND_").lower()
    for name, value in common_pb2.ServiceKind.items()
}
HEALTH_NAMES = {
    value: name.removeprefix("SERVICE_HEALTH_") for name, value in common_pb2.ServiceHealth.items()
}


@dataclasses.dataclass
class Entry:
    """One registered service instance and the kernel's live view of it."""

    info: kernel_pb2.ServiceInfo
    channel: grpc.aio.Channel
    lease_expires: float
    watcher: asyncio.Task[None] | None = None

    @property
    def serving(self) -> bool:
        return self.info.health == common_pb2.SERVICE_HEALTH_SERVING


class Registry:
    """Registered services by name, with health watched over gRPC."""

    def __init__(self, lease_s: int, max_message_bytes: int) -> None:
        self.lease_s = lease_s
        self.max_message_bytes = max_message_bytes
        self._entries: dict[str, Entry] = {}
        self._round_robin = itertools.count()
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_expired(), name="registry-sweeper")

    async def register(self, request: kernel_pb2.RegisterServiceRequest) -> int:
        """Add or renew a service; returns the lease in seconds."""
        if not request.name or not request.address:
            raise InvalidArgument(
                "RegisterService needs a name and an address", reason="BAD_SERVICE"
            )
        if request.kind == common_pb2.SERVICE_KIND_UNSPECIFIED:
            raise InvalidArgument("RegisterService needs a kind", reason="BAD_SERVICE")
        expires = time.monotonic() + self.lease_s
        entry = self._entries.get(request.name)
        if (
            entry is not None
            and entry.info.address == request.address
            and entry.info.pid == request.pid
        ):
            entry.lease_expires = expires
            return self.lease_s
        if entry is not None:
            await self._drop(request.name)
        registered_at = Timestamp()
        registered_at.GetCurrentTime()
        info = kernel_pb2.ServiceInfo(
            kind=request.kind,
            name=request.name,
            address=request.address,
            pid=request.pid,
            version=request.version,
            metrics_address=request.metrics_address,
            health=common_pb2.SERVICE_HEALTH_UNSPECIFIED,
            registered_at=registered_at,
        )
        entry = Entry(info, open_channel(request.address, self.max_message_bytes), expires)
        # A fresh context: the watcher outlives this call and must not log its request id.
        entry.watcher = asyncio.create_task(
            self._watch(entry), name=f"health-{request.name}", context=contextvars.Context()
        )
        self._entries[request.name] = entry
        log.info(
            "registered %s %s at %s (pid %d)",
            KIND_NAMES.get(request.kind, "?"),
            request.name,
            request.address,
            request.pid,
        )
        return self.lease_s

    async def deregister(self, name: str) -> None:
        if name in self._entries:
            log.info("deregistered %s", name)
            await self._drop(name)

    def services(self) -> list[kernel_pb2.ServiceInfo]:
        return [entry.info for entry in sorted(self._entries.values(), key=lambda e: e.info.name)]

    def serving(self, kind: common_pb2.ServiceKind.ValueType) -> bool:
        """Whether any instance of `kind` is registered and SERVING."""
        return any(e.info.kind == kind and e.serving for e in self._entries.values())

    def pick(self, kind: common_pb2.ServiceKind.ValueType) -> Entry:
        """A serving instance of `kind` (round robin), or UNAVAILABLE saying what is wrong."""
        candidates = [e for e in self._entries.values() if e.info.kind == kind]
        serving = [e for e in candidates if e.serving]
        if not serving:
            kind_name = KIND_NAMES.get(kind, "service")
            seen = ", ".join(
                f"{e.info.name}@{e.info.address} is {HEALTH_NAMES[e.info.health]}"
                for e in candidates
            )
            raise Unavailable(
                f"no {kind_name} service is serving"
                + (f" ({seen})" if seen else " (none registered)")
                + "; check `llmos status`",
                reason="SERVICE_UNAVAILABLE",
                metadata={"kind": kind_name},
            )
        return serving[next(self._round_robin) % len(serving)]

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for name in list(self._entries):
            await self._drop(name)

    async def _drop(self, name: str) -> None:
        entry = self._entries.pop(name)
        if entry.watcher is not None:
            entry.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await entry.watcher
        await entry.channel.close()

    async def _watch(self, entry: Entry) -> None:
        """Follow the service's health stream; reconnect while it is registered."""
        stub = health_pb2_grpc.HealthStub(entry.channel)
        while True:
            try:
                async for reply in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                    self._set_health(
                        entry,
                        HEALTH_FROM_PROTO.get(reply.status, common_pb2.SERVICE_HEALTH_NOT_SERVING),
                    )
            except grpc.aio.AioRpcError:
                pass
            self._set_health(entry, common_pb2.SERVICE_HEALTH_UNREACHABLE)
            await asyncio.sleep(0.5)

    @staticmethod
    def _set_health(entry: Entry, health: common_pb2.ServiceHealth.ValueType) -> None:
        if entry.info.health != health:
            log.info(
                "%s is now %s",
                entry.info.name,
                HEALTH_NAMES[health],
            )
            entry.info.health = health

    async def _sweep_expired(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for name, entry in list(self._entries.items()):
                if entry.lease_expires < now:
                    log.warning("%s stopped renewing its registration; dropped", name)
                    await self._drop(name)
