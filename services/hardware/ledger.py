"""Reservation accounting (pure logic): who holds how many bytes of which device, until when.

The rules, all of them here:

- a reservation fits when its bytes are at most the device's available memory minus what
  live reservations on that device already hold; otherwise RESOURCE_EXHAUSTED naming
  what is free (available and reserved);
- it ends at `expires_at` unless renewed (a renewal restarts the TTL from now), when it
  is released, or when its holder's process ends;
- only its holder may renew or release it (PERMISSION_DENIED otherwise); an unknown or
  ended one is NOT_FOUND.

No I/O: the caller passes the time, the device's capacity and a way to tell whether a
holder's process still lives, so the accounting is unit-tested without a server.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable

from llmos.services.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from llmos.services.hardware.checks import Device, human_bytes


@dataclasses.dataclass(frozen=True)
class Capacity:
    """A device's memory as measured now."""

    total_bytes: int
    available_bytes: int


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a reservation. `pid` and `started_at` (the process's creation time, which
    tells a reused pid apart) are set when the holder is a process the service can watch."""

    name: str
    pid: int | None = None
    started_at: float | None = None


@dataclasses.dataclass
class Reservation:
    id: str
    device: Device
    bytes: int
    holder: Holder
    expires_at: float


@dataclasses.dataclass(frozen=True)
class Ended:
    """A reservation the ledger dropped on its own, and why (for the service's log)."""

    reservation: Reservation
    why: str


def _new_id() -> str:
    return f"rsv-{uuid.uuid4().hex[:16]}"


class Ledger:
    """The live reservations of one hardware service."""

    def __init__(self, new_id: Callable[[], str] = _new_id) -> None:
        self._new_id = new_id
        self._by_id: dict[str, Reservation] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def reservations(self) -> list[Reservation]:
        return list(self._by_id.values())

    def reserved(self, device: Device, now: float) -> int:
        """Bytes live reservations hold on `device` at `now`."""
        return sum(
            r.bytes for r in self._by_id.values() if r.device == device and r.expires_at > now
        )

    def reserve(
        self,
        device: Device,
        size: int,
        holder: Holder,
        *,
        ttl_s: float,
        capacity: Capacity,
        now: float,
    ) -> Reservation:
        """Claim `size` bytes of `device` for `holder` until `now + ttl_s`, if they fit."""
        self.end_expired(now)
        reserved = self.reserved(device, now)
        free = max(0, capacity.available_bytes - reserved)
        if size > free:
            raise ResourceExhausted(
                f"cannot reserve {human_bytes(size)} of {device} for {holder.name!r}: "
                f"{human_bytes(free)} is free ({human_bytes(capacity.available_bytes)} available"
                f" minus {human_bytes(reserved)} reserved)",
                reason="INSUFFICIENT_MEMORY",
                metadata={
                    "device": str(device),
                    "requested_bytes": str(size),
                    "free_bytes": str(free),
                    "available_bytes": str(capacity.available_bytes),
                    "reserved_bytes": str(reserved),
                },
            )
        reservation = Reservation(
            id=self._new_id(), device=device, bytes=size, holder=holder, expires_at=now + ttl_s
        )
        self._by_id[reservation.id] = reservation
        return reservation

    def _owned(self, reservation_id: str, holder_name: str, verb: str, now: float) -> Reservation:
        self.end_expired(now)
        reservation = self._by_id.get(reservation_id)
        if reservation is None:
            raise NotFound(
                f"reservation {reservation_id!r} is unknown or has ended (released, expired, "
                "or its holder's process ended); Reserve makes a new one",
                reason="RESERVATION_NOT_FOUND",
                metadata={"reservation_id": reservation_id},
            )
        if reservation.holder.name != holder_name:
            raise PermissionDenied(
                f"reservation {reservation_id!r} is held by {reservation.holder.name!r}, not "
                f"{holder_name!r}; only its holder may {verb} it",
                reason="NOT_HOLDER",
                metadata={"reservation_id": reservation_id},
            )
        return reservation

    def renew(
        self,
        reservation_id: str,
        holder_name: str,
        ttl_s: float,
        now: float,
        *,
        device: Device | None = None,
        size: int | None = None,
    ) -> Reservation:
        """Restart the TTL of the holder's reservation from `now`. `device` and `size`, when
        given, must be the reservation's: a renewal never changes what is held (release and
        reserve again for that), so a renewal can never be refused for lack of memory."""
        reservation = self._owned(reservation_id, holder_name, "renew", now)
        if (device is not None and device != reservation.device) or (
            size is not None and size != reservation.bytes
        ):
            raise InvalidArgument(
                f"reservation {reservation_id!r} holds {reservation.bytes} bytes of "
                f"{reservation.device}; a renewal cannot change the device or the size "
                "(leave them unset, or Release and Reserve again)",
                reason="RENEWAL_MISMATCH",
                metadata={"reservation_id": reservation_id},
            )
        reservation.expires_at = now + ttl_s
        return reservation

    def release(self, reservation_id: str, holder_name: str, now: float) -> Reservation:
        reservation = self._owned(reservation_id, holder_name, "release", now)
        del self._by_id[reservation_id]
        return reservation

    def end_expired(self, now: float) -> list[Ended]:
        """Drop reservations whose TTL has passed."""
        ended = [r for r in self._by_id.values() if r.expires_at <= now]
        for reservation in ended:
            del self._by_id[reservation.id]
        return [Ended(r, "its ttl passed") for r in ended]

    def end_orphaned(self, alive: Callable[[Holder], bool]) -> list[Ended]:
        """Drop reservations whose holder is a process that no longer runs."""
        ended = [
            r for r in self._by_id.values() if r.holder.pid is not None and not alive(r.holder)
        ]
        for reservation in ended:
            del self._by_id[reservation.id]
        return [Ended(r, f"its holder's process {r.holder.pid} ended") for r in ended]
