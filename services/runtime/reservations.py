"""Host memory the runtime reserves through the hardware service: a model's weights before
it loads (`HostMemory`), and each model's KV cache before it grows (`KvReservations`).

The estimate is the size of the model's weight files. The hardware service is optional:
when none is registered with the kernel, or it cannot be reached, the runtime loads anyway;
when it refuses (RESOURCE_EXHAUSTED: the host has not that much memory free) the load is
refused with its message, before any memory is touched. Either way the decision is in
the runtime's log.

A reservation lasts while its model is loaded: the holder is this process ("pid:N"), so
it ends by itself if the runtime dies without releasing it, and a background task renews
it at a third of its TTL. A hardware service that forgot it (restarted) answers the
renewal NOT_FOUND, and the runtime reserves again.

The KV cache grows with the batch, so its memory is reserved in steps
(`runtime_kv_reserve_step_mb`) by `KvReservations`, one per loaded model, on the event
loop: it reads what the engine's batch thread wants (`kv_memory.KvMemory`), reserves the
next step *before* raising the engine's grant, and releases a step only after the batch
thread lowered the grant at a step boundary, once the batch has held less for
`RELEASE_AFTER_S`. The batch thread never waits on these calls: a newcomer that does not
fit the grant waits in the queue meanwhile. When the hardware service refuses, the
newcomer waits while running sequences may leave it room, and is refused
(RESOURCE_EXHAUSTED naming the memory) when nothing runs. Without a hardware service the
cache grows within `runtime_kv_budget_mb` alone, logged, and the runtime looks for one
again every `LOOKUP_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import grpc

from llmos.services.channels import open_channel
from llmos.services.config import Settings
from llmos.services.errors import InvalidArgument, ResourceExhausted, error_info, from_rpc_error
from llmos.services.hardware.checks import human_bytes
from llmos.services.runtime.kv_memory import Demand, KvMemory
from llmos.services.timing import duration
from llmos.v1 import common_pb2, hardware_pb2, hardware_pb2_grpc, kernel_pb2, kernel_pb2_grpc

log = logging.getLogger(__name__)

TTL_S = 60.0
CALL_TIMEOUT_S = 3.0
# The KV reservations' loop looks at its engine this often, besides being woken by it.
TICK_S = 0.5
# A KV step is released once the batch has needed less for this long (a burst that pauses
# for a moment keeps its memory).
RELEASE_AFTER_S = 2.0
# A refused KV step is asked for again at most this often while a sequence waits for it.
RETRY_S = 1.0
# An engine without a hardware service looks for one again this often.
LOOKUP_S = 15.0
# After a renewal round that could not reach the hardware service, the next comes after
# this, doubling with each failed round up to the usual TTL_S / 3: a blip is bridged well
# before the reservations' TTL runs out, and a long outage is not asked every second.
RENEW_RETRY_S = 1.0


def renewal_wait_s(failed_rounds: int) -> float:
    """Seconds before the next renewal round, after `failed_rounds` failed in a row."""
    if failed_rounds <= 0:
        return TTL_S / 3
    return min(TTL_S / 3, RENEW_RETRY_S * (1 << min(failed_rounds - 1, 16)))


def weight_bytes(model_dir: Path, weights: str = "float32", *, batched: bool = True) -> int:
    """The reservation's estimate: the model's weight files on disk (float32 safetensors
    load at about their file size), twice over when a Llama model is held as float32 for
    batched decoding, since the lean Llama pass then keeps a oneDNN-reordered copy
    (llama_forward.py; a Llama variant that pass declines is overestimated)."""
    on_disk = sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))
    packed = weights == "float32" and batched and _architecture(model_dir) == "LlamaForCausalLM"
    return 2 * on_disk if packed else on_disk


def _architecture(model_dir: Path) -> str:
    """The model class its config.json names ("" when it names none or cannot be read)."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    names = config.get("architectures") if isinstance(config, dict) else None
    return str(names[0]) if isinstance(names, list) and names else ""


class HostMemory:
    """This runtime's reservations of host memory, one per loaded model."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.holder = f"pid:{os.getpid()}"
        self.held: dict[str, tuple[str, str, int]] = {}  # model -> address, id, bytes
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._renewing: asyncio.Task[None] | None = None
        # The last answer to "which hardware service?", and when it was asked.
        self._address: str | None = None
        self._asked_at = -math.inf

    def _channel(self, target: str) -> grpc.aio.Channel:
        if target not in self._channels:
            self._channels[target] = open_channel(target, self.settings.max_message_bytes)
        return self._channels[target]

    async def hardware_address(self, max_age_s: float) -> str | None:
        """`_hardware_address()`, reusing an answer younger than `max_age_s`."""
        if time.monotonic() - self._asked_at >= max_age_s:
            self._address = await self._hardware_address()
            self._asked_at = time.monotonic()
        return self._address

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

    async def release_reservation(self, address: str, reservation: str) -> None:
        stub = hardware_pb2_grpc.HardwareServiceStub(self._channel(address))
        await stub.Release(
            hardware_pb2.HardwareServiceReleaseRequest(
                reservation_id=reservation, holder=self.holder
            ),
            timeout=CALL_TIMEOUT_S,
        )

    async def reserve_bytes(self, address: str, size: int, renew: str = "") -> str:
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
        address = await self.hardware_address(max_age_s=0)
        if address is None:
            log.warning(
                "loading %s without a host-memory reservation: no hardware service is serving",
                model,
            )
            return
        try:
            reservation = await self.reserve_bytes(address, size)
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
        try:
            await self.release_reservation(address, reservation)
        except grpc.aio.AioRpcError as error:
            # It ends by itself at its TTL, or when this process does.
            log.warning("releasing %s for %s failed: %s", reservation, model, error.details())
            return
        log.info("released the host-memory reservation %s of %s", reservation, model)

    async def _renew_forever(self) -> None:
        failed_rounds = 0
        while True:
            await asyncio.sleep(renewal_wait_s(failed_rounds))
            failed = False
            for model, (address, reservation, size) in list(self.held.items()):
                try:
                    renewed = await self.reserve_bytes(address, size, renew=reservation)
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.NOT_FOUND:
                        log.warning(
                            "renewing %s for %s failed: %s", reservation, model, error.details()
                        )
                        failed = True
                        continue
                    try:  # the hardware service forgot it (restarted): reserve again
                        renewed = await self.reserve_bytes(address, size)
                    except grpc.aio.AioRpcError as again:
                        log.warning("%s keeps no reservation: %s", model, again.details())
                        self.held.pop(model, None)
                        continue
                if model in self.held:
                    self.held[model] = (address, renewed, size)
            failed_rounds = failed_rounds + 1 if failed else 0

    async def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
        for model in list(self.held):
            await self.release(model)
        for channel in self._channels.values():
            await channel.close()


@dataclasses.dataclass(frozen=True)
class Step:
    """One reservation of KV-cache memory at the hardware service."""

    address: str
    reservation: str
    size: int


def round_up(size: int, step: int) -> int:
    return -(-size // step) * step


def kv_step_bytes(settings: Settings) -> int:
    """`runtime_kv_reserve_step_mb` in bytes, checked when the runtime starts."""
    if settings.runtime_kv_reserve_step_mb < 1:
        raise InvalidArgument(
            f"runtime_kv_reserve_step_mb is {settings.runtime_kv_reserve_step_mb}; it must be "
            "at least 1 (MiB)",
            reason="BAD_SETTING",
        )
    return settings.runtime_kv_reserve_step_mb * 2**20


class KvReservations:
    """Keeps one engine's KV grant backed by reservations at the hardware service, in steps
    (see the module's docstring). Holds a list of reservations, newest last: growth adds
    one, shrinking releases the newest ones."""

    def __init__(self, memory: KvMemory, host: HostMemory, step_bytes: int) -> None:
        self.memory = memory
        self.host = host
        self.step_bytes = step_bytes
        self.steps: list[Step] = []
        self.address: str | None = None
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._surplus_since: float | None = None
        self._refused_at = -math.inf
        self._renewed_at = time.monotonic()
        self._failed_renewals = 0  # renewal rounds that failed in a row (`renewal_wait_s`)
        self._looked_at = -math.inf
        self._unmanaged_why = ""

    @property
    def held(self) -> int:
        return sum(step.size for step in self.steps)

    @property
    def model(self) -> str:
        return self.memory.model

    async def start(self) -> None:
        """Find the hardware service (the answer the weights' reservation just got, if
        any) and begin following the engine."""
        loop = asyncio.get_running_loop()

        def wake() -> None:  # from the batch thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to do
                loop.call_soon_threadsafe(self._wakeup.set)

        self.memory.wake = wake
        self._looked_at = time.monotonic()
        address = await self.host.hardware_address(max_age_s=10.0)
        if address is None:
            self._unmanaged("no hardware service is serving")
        else:
            self._manage(address)
        self._task = asyncio.create_task(self._follow(), name=f"kv-reservations-{self.model}")

    async def close(self) -> None:
        """Stop following the engine (closed first) and release every step."""
        self.memory.wake = lambda: None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self.steps:
            await self._release(self.steps[-1])

    def _manage(self, address: str) -> None:
        self.address = address
        log.info(
            "the KV cache of %s is reserved at the hardware service %s in steps of %s",
            self.model,
            address,
            human_bytes(self.step_bytes),
        )
        self.memory.grant(self.held)

    def _unmanaged(self, why: str) -> None:
        # The same cause again (a Reserve that keeps failing the same way each time the
        # runtime looks again) is not worth a warning every LOOKUP_S.
        level = logging.DEBUG if why == self._unmanaged_why else logging.WARNING
        self._unmanaged_why = why
        log.log(
            level,
            "the KV cache of %s grows without a host-memory reservation: %s; admitting "
            "within runtime_kv_budget_mb (%s) alone",
            self.model,
            why,
            human_bytes(self.memory.budget_bytes),
        )
        self.address = None
        self.steps.clear()  # unreachable, or gone: they end with their TTL there
        self.memory.unmanaged(why)

    def _failed(self, address: str, error: grpc.aio.AioRpcError) -> None:
        """A Reserve failed otherwise than for memory: go on unreserved. When the hardware
        service cannot see this process (HOLDER_NOT_RUNNING: another pid namespace, as
        across containers), looking again would fail the same way: stop looking."""
        info = error_info(error)
        if info is not None and info.reason == "HOLDER_NOT_RUNNING":
            self._looked_at = math.inf
        self._unmanaged(
            f"Reserve on hardware at {address} failed with {error.code().name}: {error.details()}"
        )

    async def _follow(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), TICK_S)
            self._wakeup.clear()
            try:
                await self._reconcile(self.memory.demand(), time.monotonic())
            except Exception:  # the next round may succeed; a dead loop never would
                log.exception("the KV reservations of %s failed a round", self.model)

    async def _reconcile(self, demand: Demand, now: float) -> None:
        if self.address is None or demand.granted is None:
            if now - self._looked_at >= LOOKUP_S:
                self._looked_at = now
                await self._look_again(demand)
            return
        address = self.address
        # The batch thread lowered the grant: give back what it no longer covers.
        while self.steps and self.held - self.steps[-1].size >= demand.granted:
            await self._release(self.steps[-1])
        if now - self._renewed_at >= renewal_wait_s(self._failed_renewals):
            self._renewed_at = now
            failed = await self._renew(address)
            self._failed_renewals = self._failed_renewals + 1 if failed else 0
        if demand.need > demand.granted:
            self._surplus_since = None
            if now - self._refused_at >= RETRY_S:
                await self._grow(address, demand, now)
            return
        target = self.held
        for step in reversed(self.steps):  # release newest first, down to what is in use
            if target - step.size < demand.in_use:
                break
            target -= step.size
        if target >= self.held:
            self._surplus_since = None
        elif self._surplus_since is None:
            self._surplus_since = now
        elif now - self._surplus_since >= RELEASE_AFTER_S:
            self._surplus_since = None
            self.memory.propose_shrink(target)

    async def _grow(self, address: str, demand: Demand, now: float) -> None:
        """Reserve enough for what waits: every waiting sequence that could join, in steps;
        else the first in line, in steps; else exactly what it needs."""
        ceiling = max(self.memory.budget_bytes, demand.need)
        candidates = (
            round_up(demand.want, self.step_bytes),
            round_up(demand.need, self.step_bytes),
            demand.need,
        )
        targets: list[int] = []
        for candidate in candidates:
            target = min(candidate, ceiling)
            if target >= demand.need and target not in targets:
                targets.append(target)
        refused: grpc.aio.AioRpcError | None = None
        for target in targets:
            size = target - self.held
            if size <= 0:
                self.memory.grant(self.held)
                return
            try:
                reservation = await self.host.reserve_bytes(address, size)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refused = error
                    continue
                self._failed(address, error)
                return
            self.steps.append(Step(address, reservation, size))
            self.memory.grant(self.held)
            log.info(
                "reserved %s more host memory for the KV cache of %s (%s), %s in all",
                human_bytes(size),
                self.model,
                reservation,
                human_bytes(self.held),
            )
            return
        assert refused is not None
        shortage = from_rpc_error(refused, f"Reserve on hardware at {address}")
        if not isinstance(shortage, ResourceExhausted):  # the table maps the code to it
            raise shortage
        self._refused_at = now
        log.warning(
            "the KV cache of %s cannot grow to %s: the hardware service refused: %s",
            self.model,
            human_bytes(demand.need),
            refused.details(),
        )
        self.memory.refuse(demand.need, shortage)

    async def _release(self, step: Step) -> None:
        self.steps.remove(step)
        try:
            await self.host.release_reservation(step.address, step.reservation)
        except grpc.aio.AioRpcError as error:
            # It ends by itself at its TTL, or when this process does.
            log.warning(
                "releasing %s of the KV cache of %s failed: %s",
                step.reservation,
                self.model,
                error.details(),
            )
            return
        log.info(
            "released %s of host memory from the KV cache of %s (%s), %s left",
            human_bytes(step.size),
            self.model,
            step.reservation,
            human_bytes(self.held),
        )

    async def _renew(self, address: str) -> bool:
        """Restart every step's TTL; a step the hardware service forgot (it restarted) is
        reserved again, and one it will not give back is dropped, the grant with it.
        Whether a renewal failed otherwise (the service unreachable: try again soon)."""
        failed = False
        for step in list(self.steps):
            try:
                renewed = await self.host.reserve_bytes(
                    step.address, step.size, renew=step.reservation
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    log.warning("renewing %s failed: %s", step.reservation, error.details())
                    failed = True
                    continue
                try:
                    renewed = await self.host.reserve_bytes(address, step.size)
                except grpc.aio.AioRpcError as again:
                    log.warning(
                        "the KV cache of %s lost %s of its reservation: %s",
                        self.model,
                        human_bytes(step.size),
                        again.details(),
                    )
                    self.steps.remove(step)
                    self.memory.propose_shrink(self.held)
                    continue
            if step in self.steps:
                self.steps[self.steps.index(step)] = Step(address, renewed, step.size)
        return failed

    async def _look_again(self, demand: Demand) -> None:
        """Unmanaged: if a hardware service serves now, reserve what the batch holds and
        manage the grant from then on; else stay as it is (already logged)."""
        address = await self.host.hardware_address(max_age_s=0)
        if address is None:
            return
        if demand.in_use:
            size = round_up(demand.in_use, self.step_bytes)
            try:
                reservation = await self.host.reserve_bytes(address, size)
            except grpc.aio.AioRpcError as error:
                self._failed(address, error)
                return
            self.steps.append(Step(address, reservation, size))
        self._manage(address)
