"""The kernel's scheduler: which admitted ticket runs next, and which are refused or dropped.

Pure logic: no I/O, no asyncio, no clock of its own. Every call that needs the time takes
`now`, in monotonic seconds on the same clock as `Ticket.enqueued_at` and `Ticket.deadline`.

`Scheduler.admit` refuses, in this order: a task id already queued or running
(InvalidArgument DUPLICATE_TASK); a deadline already passed (DeadlineExceeded); a full class
queue (ResourceExhausted QUEUE_FULL with `retry_after_ms`). Each check is O(1).

`Scheduler.dispatch` applies these rules, in this order:

1. Tickets whose deadline has passed (deadline <= now) leave the queue and come back in
   `Dispatch.expired`. A ticket is dropped before dispatch, never dispatched late.
2. A ticket for a service at its concurrency limit is skipped; other services' tickets may go.
3. Lowest effective class first. A ticket's class rises one level (batch -> normal ->
   interactive) for every `aging_s` seconds since its `enqueued_at`, so batch work waits at
   most 2 * aging_s before it competes with fresh interactive work: it never starves.
4. Within an effective class, weighted fair share across tenants (start-time fair queueing):
   each tenant has a virtual time per class; a dispatch advances it by cost / weight, and the
   lowest goes first. A class's virtual clock is the virtual start of its latest dispatch and a
   tenant's virtual time counts as at least that clock, so a tenant back from idle (or from
   waiting on a busy service) starts level with the current minimum, with no banked credit.
5. Then FIFO: earliest `enqueued_at`, then admission order.

Queues are bounded per base class (the class a ticket was admitted with; aging does not move
a ticket out of its class's budget). A class forgets the virtual time of a tenant with nothing
queued in it once it tracks more than TENANT_MEMORY tenants, forgiving at most that tenant's
last cost / weight, so memory stays flat. Data layout: per effective class and service a "lane"
holds one FIFO heap per tenant plus two small heaps of tenants (by virtual time, and at the
clock floor by age); deadlines and aging promotions are heaps too. Stale heap entries are
dropped lazily. Admit, cancel and dispatch cost amortized O(log n) plus O(classes x services).
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import itertools
import math
from collections.abc import Mapping
from types import MappingProxyType

from llmos.services.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted


class Priority(enum.IntEnum):
    """Scheduling class. The values are llmos.v1.Priority's; a lower value runs first."""

    INTERACTIVE = 1
    NORMAL = 2
    BATCH = 3

    @property
    def label(self) -> str:
        """The lower-case name used in metadata and `Scheduler.depth`: "interactive"."""
        return _LABELS[self]

    @classmethod
    def from_proto(cls, value: int) -> Priority:
        """The class for a llmos.v1.Priority value; PRIORITY_UNSPECIFIED (0) means normal."""
        if value == 0:
            return cls.NORMAL
        try:
            return cls(value)
        except ValueError:
            raise InvalidArgument(
                f"priority {value} is not one of llmos.v1.Priority's values (0-3)",
                reason="INVALID_PRIORITY",
                metadata={"priority": str(value)},
            ) from None


# Looked up on every dispatch and trace step: iterating an enum class, and an enum
# member's `name`, cost far more than a tuple and a dict.
PRIORITIES: tuple[Priority, ...] = tuple(Priority)
_LABELS: Mapping[Priority, str] = {p: p.name.lower() for p in PRIORITIES}

DEFAULT_QUEUE_LIMITS: Mapping[Priority, int] = MappingProxyType(
    {Priority.INTERACTIVE: 256, Priority.NORMAL: 1024, Priority.BATCH: 4096}
)

# A class forgets idle tenants' virtual times once it tracks more tenants than this.
TENANT_MEMORY = 1024
# Weight of the newest interval in the moving average of a class's dispatch intervals.
_EWMA_ALPHA = 0.2


@dataclasses.dataclass(frozen=True, slots=True)
class Ticket:
    """One task waiting to run: who asked, how urgently, for which service, until when.

    `enqueued_at` and `deadline` are absolute monotonic seconds; `deadline` None means none.
    `cost` is what a dispatch charges the tenant's fair share (1 for one request).
    """

    task_id: str
    tenant: str
    priority: Priority
    service: str
    enqueued_at: float
    deadline: float | None = None
    cost: float = 1.0


@dataclasses.dataclass(slots=True)
class Dispatch:
    """What one `Scheduler.dispatch` call decided.

    `ticket` is the ticket to run now (None when nothing may run), `effective` the class it
    ran at after aging, and `expired` the tickets dropped because their deadline passed,
    which the caller records as failed.
    """

    ticket: Ticket | None = None
    expired: list[Ticket] = dataclasses.field(default_factory=list)
    effective: Priority | None = None


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Limits and knobs. A class missing from `queue_limits` keeps its default; a service
    missing from `service_limits` has no concurrency limit; a tenant missing from
    `tenant_weights` weighs 1."""

    queue_limits: Mapping[Priority, int] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_QUEUE_LIMITS)
    )
    aging_s: float = 5.0
    service_limits: Mapping[str, int] = dataclasses.field(default_factory=dict)
    tenant_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    retry_after_default_s: float = 1.0
    retry_after_min_s: float = 0.01
    retry_after_max_s: float = 30.0

    def __post_init__(self) -> None:
        for priority, limit in self.queue_limits.items():
            if not isinstance(priority, Priority) or limit < 1:
                raise InvalidArgument(
                    f"queue limit {priority!r}: {limit} must be a Priority mapped to >= 1",
                    reason="INVALID_QUEUE_LIMIT",
                )
        if not self.aging_s > 0:
            raise InvalidArgument(
                f"aging_s must be > 0 (math.inf turns aging off), got {self.aging_s}",
                reason="INVALID_AGING",
            )
        for service, limit in self.service_limits.items():
            _check_service_limit(service, limit)
        for tenant, weight in self.tenant_weights.items():
            _check_weight(tenant, weight)
        low, default, high = (
            self.retry_after_min_s,
            self.retry_after_default_s,
            self.retry_after_max_s,
        )
        if not 0 < low <= default <= high < math.inf:
            raise InvalidArgument(
                "retry-after bounds must satisfy 0 < min <= default <= max < inf, "
                f"got {low}, {default}, {high}",
                reason="INVALID_RETRY_AFTER",
            )


def effective_priority(
    priority: Priority, enqueued_at: float, now: float, aging_s: float
) -> Priority:
    """`priority` raised one level per `aging_s` seconds waited since `enqueued_at`."""
    level = priority
    while (
        level > Priority.INTERACTIVE and _promotion_at(priority, level, enqueued_at, aging_s) <= now
    ):
        level = Priority(level - 1)
    return level


def _promotion_at(base: Priority, level: Priority, enqueued_at: float, aging_s: float) -> float:
    """When a ticket admitted as `base`, now at `level`, rises to the next level."""
    return enqueued_at + (base - level + 1) * aging_s


def _check_service_limit(service: str, limit: int) -> None:
    if limit < 0:
        raise InvalidArgument(
            f"concurrency limit for {service!r} must be >= 0 (0 pauses it), got {limit}",
            reason="INVALID_SERVICE_LIMIT",
        )


def _check_weight(tenant: str, weight: float) -> None:
    if not 0 < weight < math.inf:
        raise InvalidArgument(
            f"weight of tenant {tenant!r} must be a finite number > 0, got {weight}",
            reason="INVALID_WEIGHT",
        )


class _Record:
    """A queued ticket: its admission order and where it sits now."""

    __slots__ = ("level", "live", "queue", "seq", "ticket")

    def __init__(self, ticket: Ticket, seq: int, level: Priority) -> None:
        self.ticket = ticket
        self.seq = seq
        self.level = level
        self.queue: _Queue | None = None
        self.live = True


class _Queue:
    """One tenant's tickets for one service at one effective class, oldest first.

    `key` is (virtual time, enqueued_at, seq) of the head as last pushed into the lane;
    `stamp` identifies that push, so older lane entries for this queue are stale.
    """

    __slots__ = ("heap", "key", "lane", "level", "live", "stamp", "tenant")

    def __init__(self, lane: _Lane, level: Priority, tenant: str) -> None:
        self.lane = lane
        self.level = level
        self.tenant = tenant
        self.heap: list[tuple[float, int, _Record]] = []
        self.live = 0
        self.stamp = 0
        self.key: tuple[float, float, int] | None = None


class _Lane:
    """Every tenant's queue for one service at one effective class.

    `main` orders tenants whose virtual time is above the class clock by (virtual time, age);
    `floor` holds those at or below it, who all count as the clock, by age alone. Entries
    move from main to floor as the clock passes them, never back (a dispatch re-pushes).
    """

    __slots__ = ("floor", "main", "queues", "service")

    def __init__(self, service: str) -> None:
        self.service = service
        self.queues: dict[str, _Queue] = {}
        self.main: list[tuple[float, float, int, int, _Queue]] = []
        self.floor: list[tuple[float, int, int, _Queue]] = []

    def head(self, clock: float) -> tuple[float, float, int, _Queue] | None:
        """(fair-share key, enqueued_at, seq, queue) of the lane's first ticket."""
        main, floor = self.main, self.floor
        while main:
            tag, enqueued_at, seq, stamp, queue = main[0]
            if queue.stamp != stamp:
                heapq.heappop(main)
            elif tag <= clock:
                heapq.heappop(main)
                heapq.heappush(floor, (enqueued_at, seq, stamp, queue))
            else:
                break
        while floor and floor[0][3].stamp != floor[0][2]:
            heapq.heappop(floor)
        if floor:
            enqueued_at, seq, _, queue = floor[0]
            return clock, enqueued_at, seq, queue
        if main:
            tag, enqueued_at, seq, _, queue = main[0]
            return tag, enqueued_at, seq, queue
        return None

    def compact(self, clock: float) -> None:
        """Rebuild both heaps from the live queues once stale entries dominate."""
        if len(self.main) + len(self.floor) <= 4 * len(self.queues) + 64:
            return
        self.main, self.floor = [], []
        for queue in self.queues.values():
            assert queue.key is not None  # a queue in the lane has been pushed
            tag, enqueued_at, seq = queue.key
            if tag > clock:
                self.main.append((tag, enqueued_at, seq, queue.stamp, queue))
            else:
                self.floor.append((enqueued_at, seq, queue.stamp, queue))
        heapq.heapify(self.main)
        heapq.heapify(self.floor)


class Scheduler:
    """Bounded priority queues with aging, weighted fair share and per-service limits.

    The caller admits tickets, calls `dispatch` whenever work may start (after `admit` and
    `release`) until it returns no ticket, and calls `release` when a dispatched ticket ends.
    `next_deadline` says when to call `expire` if nothing else happens before.
    """

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self._queue_limits = {
            p: self.config.queue_limits.get(p, DEFAULT_QUEUE_LIMITS[p]) for p in Priority
        }
        self._service_limits = dict(self.config.service_limits)
        self._weights = dict(self.config.tenant_weights)
        self._records: dict[str, _Record] = {}
        self._running: dict[str, Ticket] = {}
        self._running_count: dict[str, int] = {}
        self._depth = dict.fromkeys(Priority, 0)
        self._lanes: dict[Priority, dict[str, _Lane]] = {p: {} for p in Priority}
        self._tags: dict[Priority, dict[str, float]] = {p: {} for p in Priority}
        self._prune_tags_at = dict.fromkeys(Priority, TENANT_MEMORY)
        self._clock = dict.fromkeys(Priority, 0.0)
        self._deadlines: list[tuple[float, int, _Record]] = []
        self._promotions: list[tuple[float, int, _Record]] = []
        self._seq = itertools.count()
        self._stamps = itertools.count(1)
        # Dispatch rate per base class, for the retry-after hint.
        self._progress_at: dict[Priority, float | None] = dict.fromkeys(Priority)
        self._interval: dict[Priority, float | None] = dict.fromkeys(Priority)

    # -- admission ---------------------------------------------------------------------------

    def admit(self, ticket: Ticket, now: float) -> None:
        """Queue `ticket`, or refuse it at once.

        Raises InvalidArgument (DUPLICATE_TASK, or a malformed ticket), DeadlineExceeded
        (deadline <= now), ResourceExhausted (QUEUE_FULL, metadata `retry_after_ms` and
        `priority`).
        """
        _check_ticket(ticket)
        if ticket.task_id in self._records or ticket.task_id in self._running:
            raise InvalidArgument(
                f"task {ticket.task_id!r} is already queued or running",
                reason="DUPLICATE_TASK",
                metadata={"task_id": ticket.task_id},
            )
        if ticket.deadline is not None and ticket.deadline <= now:
            raise DeadlineExceeded(
                f"task {ticket.task_id!r} arrived after its deadline",
                reason="DEADLINE_EXCEEDED",
                metadata={"task_id": ticket.task_id},
            )
        base = ticket.priority
        if self._depth[base] >= self._queue_limits[base]:
            hint_ms = self.retry_after_ms(base, now)
            raise ResourceExhausted(
                f"the {base.label} queue is full ({self._queue_limits[base]} tickets); "
                f"retry in {hint_ms} ms",
                reason="QUEUE_FULL",
                metadata={"retry_after_ms": str(hint_ms), "priority": base.label},
            )

        if self._depth[base] == 0:
            self._progress_at[base] = now
        self._depth[base] += 1
        aging_s = self.config.aging_s
        level = effective_priority(base, ticket.enqueued_at, now, aging_s)
        record = _Record(ticket, next(self._seq), level)
        self._records[ticket.task_id] = record
        self._enqueue(record)
        if ticket.deadline is not None:
            heapq.heappush(self._deadlines, (ticket.deadline, record.seq, record))
        self._schedule_promotion(record)

    def retry_after_ms(self, priority: Priority, now: float) -> int:
        """How long a client refused by `priority`'s full queue should wait, in ms.

        The expected time until that class frees a slot: the moving average of the intervals
        between its dispatches, or the time since it last made progress when that is longer
        (a stalled class should not invite a retry storm), clamped to the configured bounds.
        Until the class has dispatched once there is no rate to go by: the configured default.
        """
        config = self.config
        interval, progress_at = self._interval[priority], self._progress_at[priority]
        if interval is None or progress_at is None:
            seconds = config.retry_after_default_s
        else:
            seconds = max(interval, now - progress_at)
        seconds = min(max(seconds, config.retry_after_min_s), config.retry_after_max_s)
        return max(1, round(seconds * 1000))

    # -- dispatch ----------------------------------------------------------------------------

    def dispatch(self, now: float) -> Dispatch:
        """Drop expired tickets, then take the next ticket to run (see the module's rules)."""
        expired = self.expire(now)
        self._promote(now)
        best: tuple[float, float, int, _Queue] | None = None
        for level in PRIORITIES:
            clock = self._clock[level]
            for service, lane in self._lanes[level].items():
                if not lane.queues or self._at_limit(service):
                    continue
                head = lane.head(clock)
                if head is not None and (best is None or head[:3] < best[:3]):
                    best = head
            if best is not None:
                break
        if best is None:
            return Dispatch(None, expired)

        queue = best[3]
        record = heapq.heappop(queue.heap)[2]
        ticket, level = record.ticket, queue.level
        record.live = False
        queue.live -= 1
        del self._records[ticket.task_id]
        self._depth[ticket.priority] -= 1
        self._charge(level, ticket)
        self._running[ticket.task_id] = ticket
        self._running_count[ticket.service] = self._running_count.get(ticket.service, 0) + 1
        self._note_progress(ticket.priority, now)
        self._compact_timers()
        return Dispatch(ticket, expired, level)

    def expire(self, now: float) -> list[Ticket]:
        """Remove and return the queued tickets whose deadline is <= now, earliest first."""
        expired: list[Ticket] = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            record = heapq.heappop(deadlines)[2]
            if record.live:
                self._remove(record)
                expired.append(record.ticket)
        return expired

    def next_deadline(self) -> float | None:
        """The earliest deadline among queued tickets: when `expire` next has work."""
        deadlines = self._deadlines
        while deadlines and not deadlines[0][2].live:
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else None

    def release(self, task_id: str) -> bool:
        """Free the service slot of a dispatched ticket; False if it is not running."""
        ticket = self._running.pop(task_id, None)
        if ticket is None:
            return False
        self._running_count[ticket.service] -= 1
        if not self._running_count[ticket.service]:
            del self._running_count[ticket.service]
        return True

    def cancel(self, task_id: str) -> bool:
        """Remove a queued ticket; False if it is not queued (unknown, running or gone)."""
        record = self._records.get(task_id)
        if record is None:
            return False
        self._remove(record)
        self._compact_timers()
        return True

    # -- control and views -------------------------------------------------------------------

    def set_weight(self, tenant: str, weight: float) -> None:
        """A tenant's fair-share weight, from its next dispatch on."""
        _check_weight(tenant, weight)
        self._weights[tenant] = weight

    def set_service_limit(self, service: str, limit: int | None) -> None:
        """At most `limit` running tickets for `service` (None: no limit; 0: paused).

        Lowering it below the running count stops nothing; dispatch waits until it fits.
        """
        if limit is None:
            self._service_limits.pop(service, None)
            return
        _check_service_limit(service, limit)
        self._service_limits[service] = limit

    def depth(self) -> dict[str, int]:
        """Queued tickets per class they were admitted with, by label."""
        return {p.label: self._depth[p] for p in Priority}

    def running(self, service: str) -> int:
        """Dispatched and not yet released tickets for `service`."""
        return self._running_count.get(service, 0)

    @property
    def queued(self) -> int:
        """Tickets waiting in any queue: none means `dispatch` has nothing to hand out or
        expire (the task runner asks before every dispatch, on every task's path)."""
        return len(self._records)

    def is_queued(self, task_id: str) -> bool:
        """Whether `task_id` waits in a queue."""
        return task_id in self._records

    def is_running(self, task_id: str) -> bool:
        """Whether `task_id` was dispatched and not yet released."""
        return task_id in self._running

    # -- internals ---------------------------------------------------------------------------

    def _at_limit(self, service: str) -> bool:
        limit = self._service_limits.get(service)
        return limit is not None and self._running_count.get(service, 0) >= limit

    def _enqueue(self, record: _Record) -> None:
        level, ticket = record.level, record.ticket
        lanes = self._lanes[level]
        lane = lanes.get(ticket.service)
        if lane is None:
            lane = lanes[ticket.service] = _Lane(ticket.service)
        queue = lane.queues.get(ticket.tenant)
        if queue is None:
            queue = lane.queues[ticket.tenant] = _Queue(lane, level, ticket.tenant)
        record.queue = queue
        queue.live += 1
        heapq.heappush(queue.heap, (ticket.enqueued_at, record.seq, record))
        self._refresh(queue)

    def _remove(self, record: _Record) -> None:
        """Take a queued ticket out (cancelled or expired)."""
        record.live = False
        del self._records[record.ticket.task_id]
        self._depth[record.ticket.priority] -= 1
        self._leave(record)

    def _leave(self, record: _Record) -> None:
        """Detach a record from its queue (removed, or moving to another class)."""
        queue = record.queue
        assert queue is not None
        queue.live -= 1
        record.queue = None
        if len(queue.heap) > 2 * queue.live + 16:
            queue.heap = [entry for entry in queue.heap if _belongs(entry[2], queue)]
            heapq.heapify(queue.heap)
        self._refresh(queue)

    def _refresh(self, queue: _Queue) -> None:
        """Re-push the queue into its lane if its head or its tenant's virtual time changed."""
        heap = queue.heap
        while heap and not _belongs(heap[0][2], queue):
            heapq.heappop(heap)
        lane = queue.lane
        if not heap:
            queue.stamp = next(self._stamps)  # invalidates its lane entries
            queue.key = None
            if lane.queues.get(queue.tenant) is queue:
                del lane.queues[queue.tenant]
            return
        enqueued_at, seq, _ = heap[0]
        tag = self._tags[queue.level].get(queue.tenant, 0.0)
        key = (tag, enqueued_at, seq)
        if key == queue.key:
            return
        queue.key = key
        queue.stamp = stamp = next(self._stamps)
        clock = self._clock[queue.level]
        if tag > clock:
            heapq.heappush(lane.main, (tag, enqueued_at, seq, stamp, queue))
        else:
            heapq.heappush(lane.floor, (enqueued_at, seq, stamp, queue))
        lane.compact(clock)

    def _charge(self, level: Priority, ticket: Ticket) -> None:
        """Advance the class clock and the tenant's virtual time for one dispatch."""
        tags = self._tags[level]
        start = max(tags.get(ticket.tenant, 0.0), self._clock[level])
        self._clock[level] = start
        tags[ticket.tenant] = start + ticket.cost / self._weights.get(ticket.tenant, 1.0)
        for lane in self._lanes[level].values():
            queue = lane.queues.get(ticket.tenant)
            if queue is not None:
                self._refresh(queue)
        if len(tags) > self._prune_tags_at[level]:
            # Memory stays flat however many tenants come and go. A virtual time at or below
            # the clock counts as the clock, so forgetting it changes nothing; a tenant with
            # nothing queued here is at most its last cost / weight above the clock (the
            # clock is the start of the latest dispatch), so forgetting it forgives no more.
            queued: set[str] = set()
            for lane in self._lanes[level].values():
                queued.update(lane.queues)
            for tenant in [t for t, tag in tags.items() if tag <= start or t not in queued]:
                del tags[tenant]
            self._prune_tags_at[level] = max(TENANT_MEMORY, 2 * len(tags))

    def _compact_timers(self) -> None:
        """Drop timers of tickets no longer queued once they outnumber the queued ones.

        A dispatched or cancelled ticket leaves its deadline and promotion entries behind
        (they go when they come due); this bounds them when deadlines are far off.
        """
        bound = 2 * len(self._records) + 64
        if len(self._deadlines) > bound:
            self._deadlines = [entry for entry in self._deadlines if entry[2].live]
            heapq.heapify(self._deadlines)
        if len(self._promotions) > bound:
            self._promotions = [entry for entry in self._promotions if entry[2].live]
            heapq.heapify(self._promotions)

    def _schedule_promotion(self, record: _Record) -> None:
        if record.level == Priority.INTERACTIVE:
            return
        ticket = record.ticket
        at = _promotion_at(ticket.priority, record.level, ticket.enqueued_at, self.config.aging_s)
        if at < math.inf:
            heapq.heappush(self._promotions, (at, record.seq, record))

    def _promote(self, now: float) -> None:
        """Move tickets that have waited long enough up to their new effective class."""
        promotions, aging_s = self._promotions, self.config.aging_s
        while promotions and promotions[0][0] <= now:
            record = heapq.heappop(promotions)[2]
            if not record.live:
                continue
            ticket = record.ticket
            level = effective_priority(ticket.priority, ticket.enqueued_at, now, aging_s)
            if level >= record.level:
                continue  # cannot happen: the heap time is the test effective_priority makes
            self._leave(record)
            record.level = level
            self._enqueue(record)
            self._schedule_promotion(record)

    def _note_progress(self, priority: Priority, now: float) -> None:
        progress_at = self._progress_at[priority]
        if progress_at is not None:
            sample = max(0.0, now - progress_at)
            previous = self._interval[priority]
            self._interval[priority] = (
                sample if previous is None else previous + _EWMA_ALPHA * (sample - previous)
            )
        self._progress_at[priority] = now


def _belongs(record: _Record, queue: _Queue) -> bool:
    return record.live and record.queue is queue


def _check_ticket(ticket: Ticket) -> None:
    problem = ""
    if not ticket.task_id:
        problem = "a ticket needs a task_id"
    elif not ticket.service:
        problem = "a ticket needs the service it runs on"
    elif not isinstance(ticket.priority, Priority):
        problem = f"priority {ticket.priority!r} is not a Priority"
    elif not 0 < ticket.cost < math.inf:
        problem = f"cost must be a finite number > 0, got {ticket.cost}"
    elif not math.isfinite(ticket.enqueued_at):
        problem = f"enqueued_at must be finite, got {ticket.enqueued_at}"
    elif ticket.deadline is not None and math.isnan(ticket.deadline):
        problem = "deadline must be a number or None"
    if problem:
        raise InvalidArgument(
            problem, reason="INVALID_TICKET", metadata={"task_id": ticket.task_id}
        )
