"""The KV cache's memory grant: how much host memory the engine's batch may use for its
cache, as reserved at the hardware service, and what the engine does when that is short.

Two sides share one `KvMemory`, through the engine's lock (a re-entrant condition):

- the engine's batch thread asks it, at step boundaries only, whether a newcomer fits
  (`fits`), how large the cache may grow (`limit`), and tells it what the batch holds
  (`boundary`) and which newcomer waits for memory (`blocked`). None of this waits on
  anything but the lock: a decoding step never waits on a gRPC call;
- the runtime's event loop (`reservations.KvReservations`) reads what is wanted
  (`demand`), reserves memory at the hardware service in steps *before* it raises the
  grant (`grant`), and releases it only *after* the batch thread agreed to shrink
  (`propose_shrink`, applied at a boundary when the batch fits in the smaller grant).

So the grant never exceeds what the hardware service holds for the engine, and the
cache never grows past the grant: the cache's shape is chosen within `limit()` (see
`kv_cache.SlotKVCache.reserve`), and a newcomer is admitted only when the batch's
rectangle (rows x the longest row's prompt + max_tokens) with it fits the grant. When
the hardware service refuses the memory a newcomer needs, it waits while running
sequences may still leave room; with nothing running it is refused with
RESOURCE_EXHAUSTED naming the memory, rather than growing the cache past the grant.

An engine with no hardware service to ask is *unmanaged* (`granted` is None): it admits
within `runtime_kv_budget_mb` alone, as the runtime did before reservations. The cache
is bounded by the budget either way.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from llmos.services.errors import ResourceExhausted
from llmos.services.hardware.checks import human_bytes

RESERVED = "reserved"
UNRESERVED = "unreserved"
# A refusal older than this is asked again before a sequence is refused with it.
REFUSAL_FRESH_S = 2.0
# How often a batch thread with only memory-blocked work looks again (besides being woken
# by every grant, refusal and shrink).
WAIT_POLL_S = 0.5


class Waiting(Protocol):
    """A waiting sequence, as far as memory goes (`sequences.SequenceHandle`)."""

    @property
    def footprint(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class Admission:
    """The memory decision for one sequence joining the batch (sent to the kernel, which
    puts it in the task's runtime:generate trace step)."""

    decision: str
    batch_bytes: int
    reserved_bytes: int
    memory_wait_s: float
    reason: str


@dataclasses.dataclass(frozen=True)
class Demand:
    """What the engine's batch holds and wants, for the reservation side to act on."""

    # None: unmanaged (no hardware service); else bytes the engine may use now.
    granted: int | None
    # Bytes the batch must keep: its cache's allocation or its rectangle, the larger.
    in_use: int
    # Bytes that would admit the first waiting sequence (0: none waits for memory).
    need: int
    # Bytes that would admit every waiting sequence the batch size and budget allow.
    want: int
    # The need the hardware service last refused (0: none refused since the last grant).
    refused_need: int


def rectangle_positions(
    rows: int,
    widest: int,
    footprints: Iterable[int],
    *,
    max_rows: int,
    position_budget: int,
) -> tuple[int, int]:
    """Cache positions the batch needs with the first waiting sequence, and with as many
    waiting sequences as join in order (first come, first served) within `max_rows` and
    the budget. `rows` running rows whose longest footprint is `widest`; the cache is a
    rectangle, so rows x the longest footprint is what counts."""
    first = wanted = 0
    for footprint in footprints:
        if rows >= max_rows:
            break
        candidate = (rows + 1) * max(widest, footprint)
        if candidate > position_budget:
            break
        rows, widest, wanted = rows + 1, max(widest, footprint), candidate
        first = first or candidate
    return first, wanted


class KvMemory:
    """One engine's KV-cache grant; every method takes the engine's `lock`."""

    def __init__(
        self,
        lock: threading.Condition,
        bytes_per_position: int,
        budget_bytes: int,
        model: str,
    ) -> None:
        self.lock = lock
        self.bytes_per_position = bytes_per_position
        self.budget_bytes = budget_bytes
        self.model = model
        self.granted: int | None = None
        self.unmanaged_reason = "no hardware service has been asked yet"
        # Wakes the reservation side (thread-safe; set by it when it starts).
        self.wake: Callable[[], None] = lambda: None
        self._in_use = 0
        self._need = 0
        self._want = 0
        self._blocked: object | None = None  # the waiting sequence memory holds back
        self._blocked_since = 0.0
        self._refused_need = 0
        self._refused_at = 0.0
        self._refusal: ResourceExhausted | None = None
        self._shrink_to: int | None = None

    # -- the batch thread's side (at step boundaries) ----------------------------------

    def limit(self) -> int:
        """The most memory the cache may allocate now: the grant, within the budget."""
        granted = self.granted
        return self.budget_bytes if granted is None else min(granted, self.budget_bytes)

    def fits(self, positions: int) -> bool:
        """Whether a batch rectangle of `positions` cache positions fits the grant."""
        granted = self.granted
        return granted is None or positions * self.bytes_per_position <= granted

    def boundary(self, allocated_bytes: int, batch_positions: int, waiting: bool = False) -> None:
        """A step boundary: the cache holds `allocated_bytes` and the running batch's
        rectangle is `batch_positions`. Applies a proposed shrink when both fit in it and
        nothing `waiting` is about to join, and tells the reservation side when what the
        batch holds or is granted changed."""
        in_use = max(allocated_bytes, batch_positions * self.bytes_per_position)
        with self.lock:
            changed = in_use != self._in_use
            self._in_use = in_use
            target, self._shrink_to = self._shrink_to, None
            granted = self.granted
            if waiting:  # it may need the memory at this very boundary: keep it
                target = None
            elif self._need:  # what waited for memory left (cancelled): nothing wants more
                self._blocked, self._need, self._want = None, 0, 0
                changed = True
            if target is not None and granted is not None and in_use <= target < granted:
                self.granted = target
                changed = True
        if changed:
            self.wake()

    def short(
        self,
        waiting: Sequence[Waiting],
        rows: int,
        widest: int,
        *,
        max_rows: int,
        position_budget: int,
    ) -> ResourceExhausted | None:
        """The first of `waiting` does not fit the grant beside the batch's `rows` rows
        (longest footprint `widest`). Returns the error to refuse it with when nothing runs
        and the hardware service refused what it needs; otherwise (None) it waits, and the
        reservation side is told what the batch needs."""
        need, want = rectangle_positions(
            rows,
            widest,
            (handle.footprint for handle in waiting),
            max_rows=max_rows,
            position_budget=position_budget,
        )
        if rows == 0:
            refusal = self.refusal(need)
            if refusal is not None:
                return refusal
        self.blocked(waiting[0], need, want)
        return None

    def blocked(self, waiting: object, need_positions: int, want_positions: int) -> None:
        """`waiting`, first in line, does not fit the grant: the batch needs
        `need_positions` to admit it and `want_positions` to admit what may follow it."""
        now = time.monotonic()
        with self.lock:
            if waiting is not self._blocked:
                self._blocked, self._blocked_since = waiting, now
            need = need_positions * self.bytes_per_position
            want = want_positions * self.bytes_per_position
            changed = (need, want) != (self._need, self._want)
            self._need, self._want = need, want
        if changed:
            self.wake()

    def refusal(self, need_positions: int) -> ResourceExhausted | None:
        """The error to refuse the first waiting sequence with, when the hardware service
        refused what it needs (`need_positions`, with nothing running to leave room)."""
        with self.lock:
            refusal = self._refusal
            if refusal is None or time.monotonic() - self._refused_at > REFUSAL_FRESH_S:
                return None
            if need_positions * self.bytes_per_position < self._refused_need:
                return None  # it needs less than what was refused: ask again first
            # Used once: the next sequence in line is asked for again.
            self._refusal, self._refused_need = None, 0
            self._blocked = None
            self._need = self._want = 0
            return refusal

    def admitted(self, waiting: object, batch_positions: int) -> Admission:
        """`waiting` joins the batch, whose rectangle is then `batch_positions`."""
        with self.lock:
            waited = 0.0
            if waiting is self._blocked:
                waited = time.monotonic() - self._blocked_since
                self._blocked = None
                self._need = self._want = 0
            batch_bytes = batch_positions * self.bytes_per_position
            granted = self.granted
            if granted is None:
                return Admission(
                    UNRESERVED,
                    batch_bytes,
                    0,
                    waited,
                    f"admitted within runtime_kv_budget_mb ({human_bytes(self.budget_bytes)}) "
                    f"without a reservation: {self.unmanaged_reason}",
                )
            return Admission(
                RESERVED,
                batch_bytes,
                granted,
                waited,
                f"the batch's KV cache ({human_bytes(batch_bytes)}) fits the "
                f"{human_bytes(granted)} reserved at the hardware service for {self.model}",
            )

    # -- the reservation side (the runtime's event loop) -------------------------------

    def demand(self) -> Demand:
        with self.lock:
            return Demand(self.granted, self._in_use, self._need, self._want, self._refused_need)

    def grant(self, granted: int) -> None:
        """The hardware service now holds `granted` bytes for this cache (already
        reserved: raising the grant is always safe). Clears a refusal."""
        with self.lock:
            self.granted = granted
            self._refusal, self._refused_need = None, 0
            self.lock.notify_all()

    def unmanaged(self, reason: str) -> None:
        """No hardware service to ask: admit within the budget alone from now on."""
        with self.lock:
            self.granted = None
            self.unmanaged_reason = reason
            self._refusal, self._refused_need = None, 0
            self._shrink_to = None
            self.lock.notify_all()

    def propose_shrink(self, target: int) -> None:
        """Ask the batch thread to lower the grant to `target` at its next boundary, if
        the batch fits in it then; the reservation side releases memory only after."""
        with self.lock:
            self._shrink_to = target
            self.lock.notify_all()

    def refuse(self, need: int, error: ResourceExhausted) -> None:
        """The hardware service refused the `need` bytes that the first waiting sequence
        needs: with nothing running to leave room, refuse it with `error`."""
        with self.lock:
            message = (
                f"{self.model} cannot admit this sequence: its KV cache needs "
                f"{human_bytes(need)} of host memory and the runtime holds "
                f"{human_bytes(self.granted or 0)}; {error.message}. Retry later, or "
                "lower max_tokens"
            )
            self._refusal = ResourceExhausted(
                message,
                reason=error.reason,
                metadata={**error.metadata, "retry_after_ms": "1000", "model": self.model},
            )
            self._refused_need = need
            self._refused_at = time.monotonic()
            self.lock.notify_all()
