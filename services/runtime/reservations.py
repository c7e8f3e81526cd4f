"""Host memory the runtime reserves through the hardware service before it loads a model.

The estimate is the size of the model's weight files. The hardware service is optional:
when none is registered with the kernel, or it cannot be reached, the runtime loads anyway;
when it refuses (RESOURCE_EXHAUSTED: the host has not that much memory free) the load is
refused with its message, before any memory is touched. Either way the decision is in
the runtime's log.

A reservation lasts while its model is loaded: the holder is this process ("pid:N"), so
it ends by itself if the runtime dies without releasing it, and a background task renews
it at a third of its TTL. A hardware service that forgot it (restarted) answers the
renewal NOT_FOUND, and the runtime reserves again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import grpc

from llmos.services.channels import open_channel
from llmos.services.config import Settings
from llmos.services.errors import from_rpc_error
from llmos.services.timing import duration
from llmos.v1 import common_pb2, hardware_pb2, hardware_pb2_grpc, kernel_pb2, kernel_pb2_grpc

log = logging.getLogger(__name__)

TTL_S = 60.0
CALL_TIMEOUT_S = 3.0


def weight_bytes(model_dir: Path) -> int:
    """The reservation's estimate: the model's weight files on disk (float32 safetensors
    load at about their file size)."""
    return sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))


class HostMemory:
    """This runtime's reservations of host memory, one per loaded model."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.holder = f"pid:{os.getpid()}"
        self.held: dict[str, tuple[str, str, int]] = {}  # model -> address, id, bytes
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._renewing: asyncio.Task[None] | None = None

    def _channel(self, target: str) -> grpc.aio.Channel:
        if target not in self._channels:
            self._channels[target] = open_channel(target, self.settings.max_message_bytes)
        return self._channels[target]

    async def _hardware_address(self) -> str | None:
        """The address of a serving hardware service, as the kernel lists it; None (logged)
        when there is none to ask."""
        stub = kernel_pb2_grpc.KernelServiceStub(self._channel(self.settings.kernel_target))
        try:
            reply = await stub.ListServices(
                kernel_pb2.ListServicesRequest(), timeout=CALL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            log.warning(
                "the kernel at %s cannot be asked for a hardware service (%s)",
                self.settings.kernel_target,
                error.details(),
            )
            return None
        for service in reply.services:
            if (
                service.kind == common_pb2.SERVICE_KIND_HARDWARE
                and service.health == common_pb2.SERVICE_HEALTH_SERVING
            ):
                return str(service.address)
        return None

    async def _reserve(self, address: str, size: int, renew: str = "") -> str:
        stub = hardware_pb2_grpc.HardwareServiceStub(self._channel(address))
        reply = await stub.Reserve(
            hardware_pb2.HardwareServiceReserveRequest(
                device="cpu",
                bytes=size,
                holder=self.holder,
                ttl=duration(TTL_S),
                reservation_id=renew,
            ),
            timeout=CALL_TIMEOUT_S,
        )
        return str(reply.reservation_id)

    async def reserve(self, model: str, size: int) -> None:
        """Reserve `size` bytes for `model`, or refuse the load when the hardware service
        says they are not free; load without a reservation when there is no one to ask."""
        address = await self._hardware_address()
        if address is None:
            log.warning(
                "loading %s without a host-memory reservation: no hardware service is serving",
                model,
            )
            return
        try:
            reservation = await self._reserve(address, size)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                log.warning(
                    "not loading %s: the hardware service refused: %s", model, error.details()
                )
                raise from_rpc_error(error, f"Reserve on hardware at {address}") from None
            log.warning(
                "loading %s without a host-memory reservation: Reserve on hardware at %s "
                "failed with %s: %s",
                model,
                address,
                error.code().name,
                error.details(),
            )
            return
        self.held[model] = (address, reservation, size)
        log.info(
            "reserved %d MiB of host memory for %s at the hardware service %s (%s)",
            size // 2**20,
            model,
            address,
            reservation,
        )
        if self._renewing is None:
            self._renewing = asyncio.create_task(self._renew_forever(), name="renew-reservations")

    async def release(self, model: str) -> None:
        held = self.held.pop(model, None)
        if held is None:
            return
        address, reservation, _ = held
        stub = hardware_pb2_grpc.HardwareServiceStub(self._channel(address))
        try:
            await stub.Release(
                hardware_pb2.HardwareServiceReleaseRequest(
                    reservation_id=reservation, holder=self.holder
                ),
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as error:
            # It ends by itself at its TTL, or when this process does.
            log.warning("releasing %s for %s failed: %s", reservation, model, error.details())
            return
        log.info("released the host-memory reservation %s of %s", reservation, model)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(TTL_S / 3)
            for model, (address, reservation, size) in list(self.held.items()):
                try:
                    renewed = await self._reserve(address, size, renew=reservation)
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.NOT_FOUND:
                        log.warning(
                            "renewing %s for %s failed: %s", reservation, model, error.details()
                        )
                        continue
                    try:  # the hardware service forgot it (restarted): reserve again
                        renewed = await self._reserve(address, size)
                    except grpc.aio.AioRpcError as again:
                        log.warning("%s keeps no reservation: %s", model, again.details())
                        self.held.pop(model, None)
                        continue
                if model in self.held:
                    self.held[model] = (address, renewed, size)

    async def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
        for model in list(self.held):
            await self.release(model)
        for channel in self._channels.values():
            await channel.close()
