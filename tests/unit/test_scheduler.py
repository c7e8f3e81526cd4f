"""The kernel scheduler: bounded class queues, aging, fair share, service limits, deadlines.

Time is simulated: every call gets `now`. The last tests drive random operations (fixed
seeds) against a slow reference that sorts every queued ticket by the documented rules, and
check that no admitted ticket is ever lost or handled twice.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import tracemalloc
from collections import Counter

import pytest

from llmos.kernel.scheduler import (
    DEFAULT_QUEUE_LIMITS,
    TENANT_MEMORY,
    Dispatch,
    Priority,
    Scheduler,
    SchedulerConfig,
    Ticket,
    effective_priority,
)
from llmos.services.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from llmos.v1 import common_pb2

INTERACTIVE, NORMAL, BATCH = Priority.INTERACTIVE, Priority.NORMAL, Priority.BATCH
_ids = itertools.count()


def ticket(
    tenant: str = "acme",
    priority: Priority = NORMAL,
    at: float = 0.0,
    *,
    service: str = "runtime",
    deadline: float | None = None,
    cost: float = 1.0,
    task_id: str | None = None,
) -> Ticket:
    return Ticket(
        task_id=task_id or f"task-{next(_ids)}",
        tenant=tenant,
        priority=priority,
        service=service,
        enqueued_at=at,
        deadline=deadline,
        cost=cost,
    )


def admitted(scheduler: Scheduler, *tickets: Ticket, now: float = 0.0) -> list[Ticket]:
    for one in tickets:
        scheduler.admit(one, now)
    return list(tickets)


def next_tenant(scheduler: Scheduler, now: float) -> str:
    ticket = scheduler.dispatch(now).ticket
    assert ticket is not None
    return ticket.tenant


def drain(scheduler: Scheduler, now: float) -> list[Ticket]:
    """Dispatch until nothing may run, releasing nothing."""
    out = []
    while (ticket := scheduler.dispatch(now).ticket) is not None:
        out.append(ticket)
    return out


# -- priorities ---------------------------------------------------------------------------


def test_priority_values_are_the_proto_enum_values() -> None:
    for priority in Priority:
        assert common_pb2.Priority.Value(f"PRIORITY_{priority.name}") == priority.value
    assert Priority.from_proto(common_pb2.PRIORITY_UNSPECIFIED) is NORMAL
    assert Priority.from_proto(common_pb2.PRIORITY_BATCH) is BATCH
    with pytest.raises(InvalidArgument) as refused:
        Priority.from_proto(7)
    assert refused.value.reason == "INVALID_PRIORITY"


def test_interactive_before_normal_before_batch_then_fifo() -> None:
    scheduler = Scheduler()
    batch, normal_1, interactive, normal_2 = admitted(
        scheduler,
        ticket(priority=BATCH, at=0.0),
        ticket(priority=NORMAL, at=0.1),
        ticket(priority=INTERACTIVE, at=0.2),
        ticket(priority=NORMAL, at=0.3),
        now=0.3,
    )

    assert drain(scheduler, 0.5) == [interactive, normal_1, normal_2, batch]


def test_fifo_follows_enqueued_at_not_admission_order() -> None:
    # A task re-queued after a kernel restart keeps its original enqueued_at.
    scheduler = Scheduler()
    fresh, requeued = admitted(scheduler, ticket(at=3.0), ticket(at=1.0), now=3.0)

    assert drain(scheduler, 3.0) == [requeued, fresh]


def test_effective_priority_rises_one_level_per_aging_period() -> None:
    def level(priority: Priority, now: float) -> Priority:
        return effective_priority(priority, 10.0, now, 5.0)

    assert [level(BATCH, now) for now in (10.0, 14.9, 15.0, 19.9, 20.0, 99.0)] == [
        BATCH, BATCH, NORMAL, NORMAL, INTERACTIVE, INTERACTIVE,
    ]  # fmt: skip
    assert level(NORMAL, 15.0) is INTERACTIVE
    assert level(INTERACTIVE, 99.0) is INTERACTIVE
    assert effective_priority(BATCH, 0.0, 1e9, math.inf) is BATCH


# -- aging ----------------------------------------------------------------------------------


def test_aged_batch_goes_before_fresh_normal_work() -> None:
    scheduler = Scheduler(SchedulerConfig(aging_s=5.0))
    (batch,) = admitted(scheduler, ticket("acme", BATCH, at=0.0))
    early_normal = ticket("zeta", NORMAL, at=4.9)
    scheduler.admit(early_normal, 4.9)

    # Before 5 s the batch ticket is still batch: normal work goes first.
    assert scheduler.dispatch(4.9).ticket == early_normal

    late_normal = ticket("zeta", NORMAL, at=5.0)
    scheduler.admit(late_normal, 5.0)
    outcome = scheduler.dispatch(5.0)
    assert outcome.ticket == batch
    assert outcome.effective is NORMAL


def test_aged_batch_goes_before_fresh_interactive_work() -> None:
    scheduler = Scheduler(SchedulerConfig(aging_s=5.0))
    (batch,) = admitted(scheduler, ticket("acme", BATCH, at=0.0))
    (interactive,) = admitted(scheduler, ticket("zeta", INTERACTIVE, at=9.5), now=9.5)
    assert scheduler.dispatch(9.5).ticket == interactive

    (interactive,) = admitted(scheduler, ticket("zeta", INTERACTIVE, at=10.0), now=10.0)
    outcome = scheduler.dispatch(10.0)
    assert outcome.ticket == batch
    assert outcome.effective is INTERACTIVE
    assert scheduler.dispatch(10.0).ticket == interactive


def simulate_interactive_flood(aging_s: float) -> dict[str, float]:
    """Ten batch tickets, then 60 s of interactive work arriving exactly as fast as it runs.

    Returns when each batch ticket was dispatched.
    """
    scheduler = Scheduler(SchedulerConfig(aging_s=aging_s, service_limits={"runtime": 1}))
    batch = admitted(scheduler, *(ticket("bulk", BATCH, at=0.0) for _ in range(10)))
    started: dict[str, float] = {}
    running: Ticket | None = None
    for step in range(600):
        now = step * 0.1
        # Two interactive tenants keep one interactive ticket each queued at all times.
        for tenant in ("chat-a", "chat-b"):
            if scheduler.depth()["interactive"] < 2:
                scheduler.admit(ticket(tenant, INTERACTIVE, at=now), now)
        if running is not None:
            scheduler.release(running.task_id)
        running = scheduler.dispatch(now).ticket
        assert running is not None
        if running.priority is BATCH:
            started[running.task_id] = now
    assert set(started) <= {one.task_id for one in batch}
    return started


def test_batch_never_starves_under_a_constant_interactive_stream() -> None:
    started = simulate_interactive_flood(aging_s=5.0)

    assert len(started) == 10
    # Promoted to interactive after 10 s, the batch tickets then share the runtime with the
    # two interactive tenants (fair share by tenant), all done well within the minute.
    assert min(started.values()) == pytest.approx(10.0)
    assert max(started.values()) < 25.0


def test_without_aging_the_same_batch_work_would_starve() -> None:
    assert simulate_interactive_flood(aging_s=math.inf) == {}


# -- fair share -----------------------------------------------------------------------------


def test_weighted_fair_share_within_a_class() -> None:
    scheduler = Scheduler(SchedulerConfig(tenant_weights={"gold": 2.0}))
    scheduler.set_weight("bronze", 1.0)
    for i in range(400):
        scheduler.admit(ticket("gold", at=i * 0.001), 1.0)
        scheduler.admit(ticket("bronze", at=i * 0.001), 1.0)

    counts = Counter(next_tenant(scheduler, 1.0 + i * 0.001) for i in range(300))

    assert counts["gold"] / counts["bronze"] == pytest.approx(2.0, rel=0.15)
    assert counts["gold"] + counts["bronze"] == 300


def test_cost_counts_against_fair_share() -> None:
    scheduler = Scheduler()
    for _ in range(100):
        scheduler.admit(ticket("big", cost=3.0), 0.0)
        scheduler.admit(ticket("small", cost=1.0), 0.0)

    counts = Counter(next_tenant(scheduler, 0.0) for _ in range(80))

    assert counts["small"] == 60
    assert counts["big"] == 20


def test_fair_share_beats_fifo_within_a_class() -> None:
    scheduler = Scheduler()
    early = admitted(scheduler, *(ticket("early", at=0.0) for _ in range(5)))
    (late,) = admitted(scheduler, ticket("late", at=1.0), now=1.0)

    order = drain(scheduler, 1.0)

    # "late" does not wait behind all of early's tickets: the two tenants alternate.
    assert order[:3] == [early[0], late, early[1]]


def test_an_idle_tenant_does_not_bank_credit() -> None:
    scheduler = Scheduler()
    scheduler.admit(ticket("sleepy"), 0.0)
    scheduler.admit(ticket("busy"), 0.0)
    assert {next_tenant(scheduler, 0.0) for _ in range(2)} == {"sleepy", "busy"}

    # "busy" runs 100 tickets alone while "sleepy" has nothing queued.
    for i in range(100):
        scheduler.admit(ticket("busy", at=1.0 + i), 1.0 + i)
        assert next_tenant(scheduler, 1.0 + i) == "busy"

    # Both now have plenty queued. Had "sleepy" banked its idle time, it would take ~100
    # dispatches in a row; without credit the two alternate from the start.
    for _ in range(30):
        scheduler.admit(ticket("sleepy", at=200.0), 200.0)
        scheduler.admit(ticket("busy", at=200.0), 200.0)
    first = [next_tenant(scheduler, 200.0) for _ in range(20)]
    assert first.count("sleepy") == 10
    assert all(a != b for a, b in itertools.pairwise(first))


def test_weights_change_at_once() -> None:
    scheduler = Scheduler()
    for _ in range(200):
        scheduler.admit(ticket("a"), 0.0)
        scheduler.admit(ticket("b"), 0.0)
    before = Counter(next_tenant(scheduler, 0.0) for _ in range(40))
    scheduler.set_weight("a", 3.0)
    after = Counter(next_tenant(scheduler, 0.0) for _ in range(80))

    assert before["a"] == before["b"] == 20
    assert after["a"] == 60
    with pytest.raises(InvalidArgument) as refused:
        scheduler.set_weight("a", 0.0)
    assert refused.value.reason == "INVALID_WEIGHT"


# -- bounded queues -------------------------------------------------------------------------


def test_full_class_queue_refuses_with_a_retry_hint_and_accepts_after_a_dispatch() -> None:
    limits = {INTERACTIVE: 2, NORMAL: 3, BATCH: 4}
    scheduler = Scheduler(SchedulerConfig(queue_limits=limits, retry_after_default_s=0.5))
    admitted(scheduler, ticket(priority=INTERACTIVE), ticket(priority=INTERACTIVE))

    with pytest.raises(ResourceExhausted) as refused:
        scheduler.admit(ticket(priority=INTERACTIVE), 0.0)
    assert refused.value.reason == "QUEUE_FULL"
    # No dispatch observed yet: the configured default.
    assert refused.value.metadata == {"retry_after_ms": "500", "priority": "interactive"}
    # Other classes are not affected.
    scheduler.admit(ticket(priority=BATCH), 0.0)
    assert scheduler.depth() == {"interactive": 2, "normal": 0, "batch": 1}

    assert scheduler.dispatch(0.1).ticket is not None
    scheduler.admit(ticket(priority=INTERACTIVE), 0.1)
    assert scheduler.depth() == {"interactive": 2, "normal": 0, "batch": 1}


def test_retry_hint_follows_the_observed_dispatch_rate() -> None:
    scheduler = Scheduler(SchedulerConfig(queue_limits={NORMAL: 5}))
    for _ in range(5):
        scheduler.admit(ticket(), 0.0)
    # One dispatch every 200 ms, refilling the queue each time.
    for step in range(1, 30):
        now = step * 0.2
        assert scheduler.dispatch(now).ticket is not None
        scheduler.admit(ticket(at=now), now)

    with pytest.raises(ResourceExhausted) as refused:
        scheduler.admit(ticket(), 5.85)
    assert int(refused.value.metadata["retry_after_ms"]) == pytest.approx(200, abs=5)

    # A class that has stopped moving hints at least how long it has been stuck.
    assert scheduler.retry_after_ms(NORMAL, 5.8 + 3.0) == pytest.approx(3000, abs=5)
    assert scheduler.retry_after_ms(NORMAL, 5.8 + 1e6) == 30_000


# -- deadlines ------------------------------------------------------------------------------


def test_a_ticket_that_expires_while_queued_is_returned_and_never_dispatched() -> None:
    scheduler = Scheduler(SchedulerConfig(service_limits={"runtime": 1}))
    first, urgent, patient = admitted(
        scheduler,
        ticket("a", at=0.0),
        ticket("b", at=0.1, deadline=2.0),
        ticket("c", at=0.2, deadline=60.0),
    )
    assert scheduler.dispatch(0.5) == Dispatch(first, [], NORMAL)
    assert scheduler.dispatch(1.0) == Dispatch(None, [])  # runtime busy, "b" still in time

    scheduler.release(first.task_id)
    # At 2.0 "b" is exactly at its deadline: dropped before dispatch, "c" runs instead.
    assert scheduler.dispatch(2.0) == Dispatch(patient, [urgent], NORMAL)
    assert drain(scheduler, 3.0) == []
    assert not scheduler.cancel(urgent.task_id)
    assert scheduler.depth()["normal"] == 0


def test_expired_tickets_of_every_class_are_dropped_before_dispatch() -> None:
    scheduler = Scheduler()
    late = admitted(
        scheduler,
        ticket(priority=INTERACTIVE, deadline=1.0),
        ticket(priority=BATCH, deadline=1.5),
        ticket(priority=NORMAL, deadline=0.5),
    )
    (ok,) = admitted(scheduler, ticket(priority=BATCH, deadline=10.0))

    outcome = scheduler.dispatch(1.5)

    assert outcome.ticket == ok
    assert outcome.expired == [late[2], late[0], late[1]]  # earliest deadline first


def test_expire_without_dispatch_and_next_deadline() -> None:
    scheduler = Scheduler(SchedulerConfig(service_limits={"runtime": 0}))  # paused
    a, b = admitted(scheduler, ticket(deadline=3.0), ticket(deadline=1.0))
    assert scheduler.next_deadline() == 1.0
    assert scheduler.cancel(b.task_id)
    assert scheduler.next_deadline() == 3.0

    assert scheduler.expire(2.9) == []
    assert scheduler.expire(3.0) == [a]
    assert scheduler.next_deadline() is None


def test_a_ticket_past_its_deadline_is_refused_at_admission() -> None:
    scheduler = Scheduler()
    with pytest.raises(DeadlineExceeded):
        scheduler.admit(ticket(deadline=5.0), 5.0)
    assert scheduler.depth()["normal"] == 0


# -- services, cancel, ids ------------------------------------------------------------------


def test_service_limit_skips_a_blocked_service_and_release_frees_its_slot() -> None:
    scheduler = Scheduler(SchedulerConfig(service_limits={"runtime": 1}))
    gen_1, gen_2, scan = admitted(
        scheduler,
        ticket(priority=INTERACTIVE, at=0.0),
        ticket(priority=INTERACTIVE, at=0.1),
        ticket(priority=BATCH, at=0.2, service="safety"),
    )

    assert scheduler.dispatch(1.0).ticket == gen_1
    assert scheduler.running("runtime") == 1
    # gen_2 is more urgent but its service is full: the batch safety scan goes instead.
    assert scheduler.dispatch(1.0).ticket == scan
    assert scheduler.dispatch(1.0).ticket is None
    assert scheduler.running("safety") == 1

    assert scheduler.release(gen_1.task_id)
    assert not scheduler.release(gen_1.task_id)
    assert scheduler.running("runtime") == 0
    assert scheduler.dispatch(1.0).ticket == gen_2
    assert scheduler.running("runtime") == 1


def test_service_limit_can_change_at_once() -> None:
    scheduler = Scheduler()
    scheduler.set_service_limit("runtime", 2)
    admitted(scheduler, *(ticket() for _ in range(4)))
    assert len(drain(scheduler, 0.0)) == 2
    scheduler.set_service_limit("runtime", None)
    assert len(drain(scheduler, 0.0)) == 2
    with pytest.raises(InvalidArgument):
        scheduler.set_service_limit("runtime", -1)


def test_cancel_removes_a_queued_ticket_only() -> None:
    scheduler = Scheduler()
    a, b, c = admitted(scheduler, ticket(), ticket(), ticket())

    assert scheduler.cancel(b.task_id)
    assert not scheduler.cancel(b.task_id)
    assert not scheduler.cancel("no-such-task")
    assert scheduler.depth()["normal"] == 2
    assert scheduler.dispatch(0.0).ticket == a
    assert not scheduler.cancel(a.task_id)  # running: the caller cancels the call instead
    assert scheduler.is_running(a.task_id)
    assert drain(scheduler, 0.0) == [c]


def test_duplicate_task_ids_are_refused_while_queued_or_running() -> None:
    scheduler = Scheduler()
    first = ticket(task_id="t-1")
    scheduler.admit(first, 0.0)
    with pytest.raises(InvalidArgument) as refused:
        scheduler.admit(dataclasses.replace(first, tenant="other"), 0.0)
    assert refused.value.reason == "DUPLICATE_TASK"

    assert scheduler.dispatch(0.0).ticket == first
    with pytest.raises(InvalidArgument):
        scheduler.admit(first, 0.0)

    # Once released, the id may come back (a task re-queued after a failure).
    scheduler.release(first.task_id)
    scheduler.admit(first, 1.0)
    assert scheduler.is_queued(first.task_id)


def test_queued_counts_tickets_waiting_and_nothing_else() -> None:
    """The task runner skips `dispatch` when `queued` is 0: every way out of a queue
    (dispatch, cancel, expiry) must count down, and running tickets never count."""
    scheduler = Scheduler(SchedulerConfig(service_limits={"runtime": 1}))
    first, second, third = admitted(scheduler, ticket(), ticket(), ticket(deadline=5.0), now=0.0)
    assert scheduler.queued == 3
    assert scheduler.dispatch(1.0).ticket == first
    assert scheduler.queued == 2  # running: not queued
    assert scheduler.cancel(second.task_id)
    assert scheduler.queued == 1
    assert scheduler.dispatch(6.0).expired == [third]
    assert scheduler.queued == 0
    assert scheduler.dispatch(6.0) == Dispatch(None, [])


@pytest.mark.parametrize(
    "bad",
    [
        {"task_id": ""},
        {"service": ""},
        {"cost": 0.0},
        {"cost": math.inf},
        {"enqueued_at": math.nan},
        {"deadline": math.nan},
        {"priority": 2},
    ],
)
def test_malformed_tickets_are_refused(bad: dict[str, object]) -> None:
    scheduler = Scheduler()
    with pytest.raises(InvalidArgument) as refused:
        scheduler.admit(dataclasses.replace(ticket(), **bad), 0.0)  # type: ignore[arg-type]
    assert refused.value.reason == "INVALID_TICKET"
    assert scheduler.depth() == {"interactive": 0, "normal": 0, "batch": 0}


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"queue_limits": {NORMAL: 0}}, "INVALID_QUEUE_LIMIT"),
        ({"aging_s": 0.0}, "INVALID_AGING"),
        ({"service_limits": {"runtime": -1}}, "INVALID_SERVICE_LIMIT"),
        ({"tenant_weights": {"a": -2.0}}, "INVALID_WEIGHT"),
        ({"retry_after_min_s": 2.0, "retry_after_default_s": 1.0}, "INVALID_RETRY_AFTER"),
    ],
)
def test_bad_configuration_is_refused(config: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        SchedulerConfig(**config)  # type: ignore[arg-type]
    assert refused.value.reason == reason


def test_memory_stays_flat_under_admit_cancel_and_dispatch_churn() -> None:
    scheduler = Scheduler(SchedulerConfig(service_limits={"runtime": 0}))
    # A ticket that cannot run keeps its queue (and its timers) alive throughout.
    (stuck,) = admitted(scheduler, ticket("acme", BATCH, deadline=1e9))
    ids = itertools.count()

    def churn(rounds: int) -> None:
        for _ in range(rounds):
            now = 1.0
            scan = ticket(
                "acme", BATCH, now, service="safety", deadline=1e9, task_id=f"{next(ids)}"
            )
            scheduler.admit(scan, now)
            assert scheduler.dispatch(now).ticket == scan
            assert scheduler.release(scan.task_id)
            waits = ticket("acme", BATCH, now, deadline=1e9, task_id=f"{next(ids)}")
            scheduler.admit(waits, now)
            assert scheduler.cancel(waits.task_id)

    churn(2_000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        churn(20_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()

    # Kept, 20,000 stale heap entries with their tickets would take megabytes.
    assert grown < 100_000
    scheduler.set_service_limit("runtime", None)
    assert drain(scheduler, 2.0) == [stuck]
    assert scheduler.next_deadline() is None


# -- against a reference, with random operations ---------------------------------------------


class Reference:
    """The documented rules, computed the slow and obvious way: sort everything each time."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.limits = dict(config.service_limits)
        self.weights = dict(config.tenant_weights)
        self.queued: dict[str, tuple[Ticket, int]] = {}
        self.running: dict[str, Ticket] = {}
        self.tags: dict[Priority, dict[str, float]] = {p: {} for p in Priority}
        self.clock = dict.fromkeys(Priority, 0.0)
        self.prune_at = dict.fromkeys(Priority, TENANT_MEMORY)
        self.seq = itertools.count()
        self.dispatched = self.pruned = 0

    def busy(self) -> Counter[str]:
        return Counter(r.service for r in self.running.values())

    def level(self, one: Ticket, now: float) -> Priority:
        raised = [k for k in (1, 2) if one.enqueued_at + k * self.config.aging_s <= now]
        return Priority(max(INTERACTIVE, one.priority - max(raised, default=0)))

    def admit(self, one: Ticket, now: float) -> str | None:
        """The reason it is refused, or None."""
        if one.task_id in self.queued or one.task_id in self.running:
            return "DUPLICATE_TASK"
        if one.deadline is not None and one.deadline <= now:
            return "DEADLINE_EXCEEDED"
        depth = sum(1 for t, _ in self.queued.values() if t.priority == one.priority)
        if depth >= self.config.queue_limits.get(one.priority, DEFAULT_QUEUE_LIMITS[one.priority]):
            return "QUEUE_FULL"
        self.queued[one.task_id] = (one, next(self.seq))
        return None

    def dispatch(self, now: float) -> Dispatch:
        expired = sorted(
            (t.deadline, seq, t)
            for t, seq in self.queued.values()
            if t.deadline is not None and t.deadline <= now
        )
        for _, _, t in expired:
            del self.queued[t.task_id]
        candidates = []
        busy = self.busy()
        for t, seq in self.queued.values():
            if busy[t.service] >= self.limits.get(t.service, math.inf):
                continue
            level = self.level(t, now)
            share = max(self.tags[level].get(t.tenant, 0.0), self.clock[level])
            candidates.append((level, share, t.enqueued_at, seq, t))
        outcome = Dispatch(None, [t for _, _, t in expired])
        if not candidates:
            return outcome
        level, share, _, _, chosen = min(candidates)
        del self.queued[chosen.task_id]
        self.running[chosen.task_id] = chosen
        self.clock[level] = share
        tags = self.tags[level]
        tags[chosen.tenant] = share + chosen.cost / self.weights.get(chosen.tenant, 1.0)
        if len(tags) > self.prune_at[level]:
            self.pruned += 1
            here = {t.tenant for t, _ in self.queued.values() if self.level(t, now) == level}
            for tenant in [x for x, tag in tags.items() if tag <= share or x not in here]:
                del tags[tenant]
            self.prune_at[level] = max(TENANT_MEMORY, 2 * len(tags))
        outcome.ticket, outcome.effective = chosen, level
        self.dispatched += 1
        return outcome


def lifecycle_complete(events: list[str]) -> bool:
    """Each admission ends exactly once: expired, cancelled, or dispatched (then released,
    unless it is the last one and still running)."""
    rest = list(events)
    while rest:
        if rest[:2] in (["admitted", "expired"], ["admitted", "cancelled"]):
            del rest[:2]
        elif rest == ["admitted", "dispatched"]:
            return True
        elif rest[:3] == ["admitted", "dispatched", "released"]:
            del rest[:3]
        else:
            return False
    return True


class Workload:
    """Random admits, dispatches, cancels, releases and weight changes in simulated time,
    each result compared with the reference's, every ticket's life written down.

    Times are multiples of 1/8 s, so both implementations see exactly the same floats.
    """

    def __init__(self, seed: int, *, tenants: int, limited: bool) -> None:
        self.rng = rng = random.Random(seed)
        config = SchedulerConfig(
            queue_limits={INTERACTIVE: 6, NORMAL: 10, BATCH: 14} if limited else {},
            aging_s=rng.choice([0.5, 1.0, 2.0]),
            service_limits={"runtime": 2, "safety": 1} if limited else {},
            tenant_weights={"t0": 2.0},
        )
        self.scheduler, self.reference = Scheduler(config), Reference(config)
        self.tenants = tenants
        self.fate: dict[str, list[str]] = {}
        self.now = 0.0

    def run(self, steps: int) -> None:
        rng = self.rng
        for step in range(steps):
            self.now += rng.choice([0.0, 0.0, 0.125, 0.25, 1.0])
            action = rng.random()
            if action < 0.45:
                self.admit(step)
            elif action < 0.8:
                self.dispatch()
            elif action < 0.88 and self.fate:
                self.cancel(rng.choice(list(self.fate)))
            elif action < 0.98 and self.reference.running:
                self.release(rng.choice(list(self.reference.running)))
            else:
                tenant, weight = f"t{rng.randrange(self.tenants)}", rng.choice([0.5, 1.0, 3.0])
                self.scheduler.set_weight(tenant, weight)
                self.reference.weights[tenant] = weight
            self.check_counts()

    def drain(self) -> None:
        """Run everything still queued, releasing as it goes; then check every ticket."""
        while self.reference.queued:
            self.now += 0.125
            for task_id in list(self.reference.running):
                self.release(task_id)
            self.dispatch()
        assert self.scheduler.dispatch(self.now + 100.0) == Dispatch(None, [])
        assert self.scheduler.next_deadline() is None
        assert self.scheduler.depth() == {"interactive": 0, "normal": 0, "batch": 0}
        for task_id, events in self.fate.items():
            assert lifecycle_complete(events), (task_id, events)

    def admit(self, step: int) -> None:
        rng, now = self.rng, self.now
        task_id = f"task-{step}"
        if rng.random() < 0.05 and self.fate:  # an id seen before: refused unless finished
            task_id = rng.choice(list(self.fate))
        one = Ticket(
            task_id=task_id,
            tenant=f"t{rng.randrange(self.tenants)}",
            priority=rng.choice(list(Priority)),
            service=rng.choice(["runtime", "runtime", "safety", "explain"]),
            enqueued_at=now - rng.choice([0.0, 0.0, 0.0, 0.5, 3.0]),
            deadline=rng.choice([None, None, now + rng.randrange(0, 40) / 8]),
            cost=rng.choice([1.0, 1.0, 0.5, 2.0]),
        )
        want = self.reference.admit(one, now)
        try:
            self.scheduler.admit(one, now)
        except (InvalidArgument, DeadlineExceeded, ResourceExhausted) as refused:
            assert refused.reason == want
            if want == "QUEUE_FULL":
                assert int(refused.metadata["retry_after_ms"]) >= 10
        else:
            assert want is None
            self.fate.setdefault(one.task_id, []).append("admitted")

    def dispatch(self) -> None:
        got = self.scheduler.dispatch(self.now)
        assert got == self.reference.dispatch(self.now)
        for one in got.expired:
            assert one.deadline is not None and one.deadline <= self.now
            self.fate[one.task_id].append("expired")
        if got.ticket is not None:
            assert got.ticket.deadline is None or got.ticket.deadline > self.now
            self.fate[got.ticket.task_id].append("dispatched")

    def cancel(self, task_id: str) -> None:
        cancelled = self.scheduler.cancel(task_id)
        assert cancelled == (self.reference.queued.pop(task_id, None) is not None)
        if cancelled:
            self.fate[task_id].append("cancelled")

    def release(self, task_id: str) -> None:
        assert self.scheduler.release(task_id)
        del self.reference.running[task_id]
        self.fate[task_id].append("released")

    def check_counts(self) -> None:
        reference = self.reference
        want_depth = Counter(t.priority.label for t, _ in reference.queued.values())
        assert self.scheduler.depth() == {p.label: want_depth[p.label] for p in Priority}
        for service, busy in reference.busy().items():
            assert self.scheduler.running(service) == busy
            assert busy <= reference.limits.get(service, math.inf)


def test_lifecycle_check_catches_lost_and_doubled_tickets() -> None:
    assert lifecycle_complete(["admitted", "dispatched", "released", "admitted", "expired"])
    assert lifecycle_complete(["admitted", "cancelled", "admitted", "dispatched"])
    assert not lifecycle_complete(["admitted"])
    assert not lifecycle_complete(["admitted", "dispatched", "expired"])
    assert not lifecycle_complete(["admitted", "dispatched", "released", "dispatched"])


@pytest.mark.parametrize("seed", range(20))
def test_random_workloads_match_the_reference_and_lose_nothing(seed: int) -> None:
    workload = Workload(seed, tenants=4, limited=True)
    workload.run(1500)
    workload.drain()

    assert len(workload.fate) > 200
    assert workload.reference.dispatched > 150
    outcomes = Counter(events[-1] for events in workload.fate.values())
    assert outcomes["expired"] and outcomes["cancelled"]


def test_many_tenants_coming_and_going_match_the_reference() -> None:
    # Enough distinct tenants that each class forgets idle ones (TENANT_MEMORY).
    workload = Workload(7, tenants=3000, limited=False)
    workload.run(12_000)
    workload.drain()

    assert workload.reference.pruned >= 3
