"""The kernel's registry as the hardware service needs it: each service's name and pid.

Read through the kernel's ListServices and kept for a second, so a Watch at 100 ms does
not ask the kernel ten times a second. A kernel that cannot be reached leaves the last
list in place (logged once per outage) and is asked again only after `RETRY_S`, so
snapshots stay quick while it is down: a snapshot without processes is still useful.
"""

from __future__ import annotations

import logging
import time

import grpc

from llmos.services.channels import open_channel
from llmos.services.config import Settings
from llmos.v1 import kernel_pb2, kernel_pb2_grpc

log = logging.getLogger(__name__)

CACHE_S = 1.0
RETRY_S = 5.0


class RegisteredServices:
    def __init__(self, settings: Settings) -> None:
        self._target = settings.kernel_target
        self._max_message_bytes = settings.max_message_bytes
        # Opened on first use: an aio channel belongs to the event loop it was made in,
        # and the service object is built before `serve` starts the loop.
        self._channel: grpc.aio.Channel | None = None
        self._services: list[kernel_pb2.ServiceInfo] = []
        self._next_read_at = float("-inf")
        self._failing = False

    async def list(self, *, fresh: bool = False) -> list[kernel_pb2.ServiceInfo]:
        """The services as the kernel last listed them; `fresh` asks it now, unless it failed
        to answer within the last RETRY_S."""
        if time.monotonic() < self._next_read_at and not (fresh and not self._failing):
            return self._services
        if self._channel is None:
            self._channel = open_channel(self._target, self._max_message_bytes)
        stub = kernel_pb2_grpc.KernelServiceStub(self._channel)
        try:
            reply = await stub.ListServices(kernel_pb2.ListServicesRequest(), timeout=1)
        except grpc.aio.AioRpcError as error:
            self._next_read_at = time.monotonic() + RETRY_S
            if not self._failing:
                log.warning(
                    "cannot list the services at the kernel %s: %s (processes left out of "
                    "snapshots until it answers)",
                    self._target,
                    error.details(),
                )
            self._failing = True
            return self._services
        if self._failing:
            log.info("the kernel at %s answers again", self._target)
        self._failing = False
        self._services = list(reply.services)
        self._next_read_at = time.monotonic() + CACHE_S
        return self._services

    async def pid_of(self, name: str) -> int | None:
        """The pid service `name` registered with, asking the kernel now (None: no such
        service, or it gave no pid)."""
        for service in await self.list(fresh=True):
            if service.name == name and service.pid > 0:
                return int(service.pid)
        return None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
