"""The hardware service's request checks (pure logic): devices, byte counts, TTLs, holders
and Watch intervals, each refused with INVALID_ARGUMENT and a message saying what to fix.

Kept free of I/O so every refusal is unit-tested without a server; the server adds only
what needs the machine (a device's total memory, whether a holder's process runs).
"""

from __future__ import annotations

import dataclasses
import re

from llmos.services.errors import InvalidArgument

MAX_TTL_S = 24 * 3600.0
MAX_HOLDER_CHARS = 256
MIN_WATCH_INTERVAL_S = 0.1
MAX_WATCH_INTERVAL_S = 60.0
DEFAULT_WATCH_INTERVAL_S = 1.0

_GPU = re.compile(r"gpu:(\d{1,4})")
_PID_HOLDER = re.compile(r"pid:(.*)")


@dataclasses.dataclass(frozen=True, order=True)
class Device:
    """Host memory ("cpu") or one GPU's memory ("gpu:N")."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"gpu:{self.index}"


CPU = Device("cpu")


def parse_device(text: str) -> Device:
    """ "cpu" or "gpu:N"; anything else names no device."""
    if text == "cpu":
        return CPU
    match = _GPU.fullmatch(text)
    if match is None:
        raise InvalidArgument(
            f"device {text!r} is unknown: use 'cpu' for host memory or 'gpu:N' for GPU N",
            reason="UNKNOWN_DEVICE",
            metadata={"device": text},
        )
    return Device("gpu", int(match.group(1)))


def human_bytes(count: int) -> str:
    """Binary units, as `free -h` prints them: messages name sizes people can read."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def check_bytes(count: int, device: Device, total_bytes: int) -> int:
    """More than 0 and no more than the device has at all: anything else is a mistake, not a
    shortage, so it is INVALID_ARGUMENT rather than RESOURCE_EXHAUSTED."""
    if count <= 0:
        raise InvalidArgument(
            f"bytes must be more than 0, got {count}",
            reason="BAD_BYTES",
            metadata={"bytes": str(count)},
        )
    if count > total_bytes:
        raise InvalidArgument(
            f"bytes {count} ({human_bytes(count)}) is more than {device}'s total memory "
            f"{total_bytes} ({human_bytes(total_bytes)}); ask for at most that",
            reason="BAD_BYTES",
            metadata={"bytes": str(count), "total_bytes": str(total_bytes)},
        )
    return count


def check_ttl(present: bool, seconds: float) -> float:
    """A reservation must end on its own if its holder forgets it: the TTL is required."""
    if not present or seconds == 0:
        raise InvalidArgument(
            "ttl is required: how long the reservation lasts unless renewed "
            f"(more than 0 s, at most {MAX_TTL_S:.0f} s)",
            reason="BAD_TTL",
        )
    if seconds < 0 or seconds > MAX_TTL_S:
        raise InvalidArgument(
            f"ttl must be more than 0 s and at most {MAX_TTL_S:.0f} s (24 hours), got {seconds} s",
            reason="BAD_TTL",
            metadata={"ttl_s": str(seconds)},
        )
    return seconds


def check_holder(holder: str) -> str:
    if not holder.strip():
        raise InvalidArgument(
            "holder is required: 'pid:N', a registered service's name, or any name of yours",
            reason="HOLDER_MISSING",
        )
    if len(holder) > MAX_HOLDER_CHARS:
        raise InvalidArgument(
            f"holder is {len(holder)} characters; at most {MAX_HOLDER_CHARS} are allowed",
            reason="BAD_HOLDER",
        )
    holder_pid(holder)  # a malformed "pid:" holder is refused up front
    return holder


def holder_pid(holder: str) -> int | None:
    """The process a "pid:N" holder names; None for any other holder."""
    match = _PID_HOLDER.fullmatch(holder)
    if match is None:
        return None
    digits = match.group(1)
    if not digits.isdigit() or int(digits) <= 0 or int(digits) >= 2**31:
        raise InvalidArgument(
            f"holder {holder!r}: a process holder is 'pid:N' with N a positive process id",
            reason="BAD_HOLDER",
        )
    return int(digits)


def check_reservation_id(reservation_id: str) -> str:
    if not reservation_id:
        raise InvalidArgument(
            "reservation_id is required: the id Reserve answered", reason="RESERVATION_ID_MISSING"
        )
    return reservation_id


def watch_interval(present: bool, seconds: float) -> float:
    """Unset means one second; set, it must lie between the bounds. A shorter interval would
    make the CPU figures noise (they are measured over the interval) and load the host."""
    if not present:
        return DEFAULT_WATCH_INTERVAL_S
    if not MIN_WATCH_INTERVAL_S <= seconds <= MAX_WATCH_INTERVAL_S:
        raise InvalidArgument(
            f"interval must be between {MIN_WATCH_INTERVAL_S * 1000:.0f} ms and "
            f"{MAX_WATCH_INTERVAL_S:.0f} s, got {seconds * 1000:g} ms",
            reason="BAD_INTERVAL",
            metadata={"interval_s": str(seconds)},
        )
    return seconds
