"""The KV cache's memory grant (services/runtime/kv_memory.py) and the cache's growth within
it (services/runtime/kv_cache.py): pure logic, no model and no hardware service."""

from __future__ import annotations

import threading

import pytest
import torch

from llmos.services.errors import ResourceExhausted
from llmos.services.runtime.kv_cache import SlotKVCache
from llmos.services.runtime.kv_memory import (
    RESERVED,
    UNRESERVED,
    KvMemory,
    rectangle_positions,
)

BPP = 1000  # bytes per cache position, to keep the arithmetic readable


class Waiting:
    def __init__(self, footprint: int) -> None:
        self.footprint = footprint


def memory(budget: int = 10**9) -> tuple[KvMemory, list[str]]:
    woken: list[str] = []
    grant = KvMemory(threading.Condition(), BPP, budget, "m")
    grant.wake = lambda: woken.append("wake")
    return grant, woken


# ---------------------------------------------------------------- the rectangle


def test_the_rectangle_is_rows_times_the_longest_footprint() -> None:
    # Two rows running, the longest 100; the queue holds 50, 300, 20.
    first, wanted = rectangle_positions(2, 100, [50, 300, 20], max_rows=32, position_budget=10_000)
    assert first == 3 * 100
    assert wanted == 5 * 300  # all three join: 5 rows x the longest, 300


def test_the_wanted_rectangle_stops_at_the_batch_size_and_the_budget() -> None:
    assert rectangle_positions(0, 0, [10] * 10, max_rows=4, position_budget=10_000) == (10, 40)
    # The third would make 3 x 400 = 1200 > 1000: it and everything behind it wait.
    assert rectangle_positions(0, 0, [400, 400, 400, 1], max_rows=32, position_budget=1000) == (
        400,
        800,
    )


def test_nothing_waiting_wants_nothing() -> None:
    assert rectangle_positions(3, 100, [], max_rows=32, position_budget=10_000) == (0, 0)


# ---------------------------------------------------------------- the grant


def test_unmanaged_admits_within_the_budget_alone() -> None:
    grant, _ = memory(budget=50_000)
    assert grant.granted is None
    assert grant.fits(10**9)  # the engine checks the budget itself
    assert grant.limit() == 50_000
    admission = grant.admitted(Waiting(10), 10)
    assert admission.decision == UNRESERVED
    assert admission.reserved_bytes == 0
    assert "without a reservation" in admission.reason


def test_a_managed_grant_admits_what_fits_and_limits_the_cache() -> None:
    grant, _ = memory(budget=500_000)
    grant.grant(200_000)
    assert grant.fits(200) and not grant.fits(201)
    assert grant.limit() == 200_000
    grant.grant(900_000)
    assert grant.limit() == 500_000, "never past the budget"
    admission = grant.admitted(Waiting(10), 150)
    assert (admission.decision, admission.batch_bytes, admission.reserved_bytes) == (
        RESERVED,
        150 * BPP,
        900_000,
    )


def test_a_blocked_sequence_wakes_the_reservation_side_once_and_records_its_wait() -> None:
    grant, woken = memory()
    grant.grant(0)
    head = Waiting(100)
    for _ in range(3):  # every step boundary while it waits: one wake-up, not three
        assert grant.short([head], 0, 0, max_rows=32, position_budget=10**6) is None
    assert woken == ["wake"]
    demand = grant.demand()
    assert (demand.granted, demand.need, demand.want) == (0, 100 * BPP, 100 * BPP)
    grant.grant(100 * BPP)
    admission = grant.admitted(head, 100)
    assert admission.memory_wait_s > 0
    assert grant.demand().need == 0, "admitted: nothing waits for memory any more"


def test_a_shrink_applies_at_a_boundary_only_when_the_batch_fits_in_it() -> None:
    grant, woken = memory()
    grant.grant(300_000)
    grant.propose_shrink(100_000)
    grant.boundary(allocated_bytes=150_000, batch_positions=50)
    assert grant.granted == 300_000, "the cache holds more than the smaller grant"
    grant.propose_shrink(200_000)
    grant.boundary(allocated_bytes=150_000, batch_positions=190)  # rectangle 190,000 bytes
    assert grant.granted == 200_000
    assert grant.demand().in_use == 190_000
    woken.clear()
    grant.boundary(0, 0)  # idle: the reservation side hears of it
    assert woken == ["wake"]


def test_a_waiting_sequence_that_left_wants_nothing_more() -> None:
    grant, woken = memory()
    grant.grant(0)
    assert grant.short([Waiting(100)], 0, 0, max_rows=32, position_budget=10**6) is None
    assert grant.demand().need > 0
    woken.clear()
    grant.boundary(0, 0, waiting=False)  # it was cancelled before it got its memory
    assert grant.demand().need == grant.demand().want == 0
    assert woken == ["wake"]


def test_no_shrink_while_a_sequence_waits_to_join() -> None:
    grant, _ = memory()
    grant.grant(300_000)
    grant.propose_shrink(0)
    grant.boundary(0, 0, waiting=True)
    assert grant.granted == 300_000
    grant.boundary(0, 0)
    assert grant.granted == 300_000, "a proposal is dropped, not kept for later"


def test_a_refusal_refuses_the_head_when_nothing_runs_and_only_once() -> None:
    grant, _ = memory()
    grant.grant(0)
    head, small = Waiting(100), Waiting(10)
    assert grant.short([head], 0, 0, max_rows=32, position_budget=10**6) is None
    shortage = ResourceExhausted(
        "cannot reserve 64.0 MiB of cpu", reason="INSUFFICIENT_MEMORY", metadata={"free_bytes": "5"}
    )
    grant.refuse(100 * BPP, shortage)
    # With rows running, it waits for them to leave room instead.
    assert grant.short([head], 1, 50, max_rows=32, position_budget=10**6) is None
    refusal = grant.short([head], 0, 0, max_rows=32, position_budget=10**6)
    assert refusal is not None
    assert refusal.reason == "INSUFFICIENT_MEMORY"
    assert refusal.metadata["free_bytes"] == "5"
    assert refusal.metadata["retry_after_ms"] == "1000"
    assert "KV cache needs 97.7 KiB of host memory" in refusal.message
    assert "cannot reserve 64.0 MiB of cpu" in refusal.message
    # Used once: the next in line is asked for again before it is refused.
    assert grant.short([small], 0, 0, max_rows=32, position_budget=10**6) is None


def test_a_smaller_sequence_is_asked_for_again_before_it_is_refused() -> None:
    grant, _ = memory()
    grant.grant(0)
    grant.refuse(100 * BPP, ResourceExhausted("no", reason="INSUFFICIENT_MEMORY"))
    assert grant.short([Waiting(10)], 0, 0, max_rows=32, position_budget=10**6) is None


def test_a_grant_clears_a_refusal() -> None:
    grant, _ = memory()
    grant.grant(0)
    grant.refuse(100 * BPP, ResourceExhausted("no", reason="INSUFFICIENT_MEMORY"))
    grant.grant(100 * BPP)
    assert grant.demand().refused_need == 0
    assert grant.short([Waiting(200)], 0, 0, max_rows=32, position_budget=10**6) is None


# ---------------------------------------------------------------- the cache within the limit


def cache(limit: int | None = None) -> SlotKVCache:
    kv = SlotKVCache(layers=2, kv_heads=1, head_dim=4, max_positions=4096, dtype=torch.float32)
    if limit is not None:
        kv.limit = lambda: limit
    return kv


def test_the_cache_doubles_when_the_limit_allows() -> None:
    kv = cache()
    kv.reserve(3, 70)
    assert (kv.rows_capacity, kv.positions_capacity) == (4, 70)
    kv.reserve(5, 71)
    assert (kv.rows_capacity, kv.positions_capacity) == (8, 140)


def test_near_the_limit_the_cache_grows_only_as_far_as_it_allows() -> None:
    kv = cache()
    per_position = kv.bytes_per_position
    kv.limit = lambda: 8 * 100 * per_position  # 800 positions
    kv.reserve(5, 100)
    assert (kv.rows_capacity, kv.positions_capacity) == (5, 100)
    kv.reserve(6, 100)  # doubling rows to 10 x 100 would pass the limit: 8 rows instead
    assert (kv.rows_capacity, kv.positions_capacity) == (8, 100)
    assert kv.allocated_bytes <= 800 * per_position


def test_growing_positions_may_drop_spare_rows_and_keeps_what_is_stored() -> None:
    kv = cache()
    kv.reserve(8, 64)  # 8 rows from an earlier batch
    kv.keys[0][0, 0, 10, :] = 7.0
    per_position = kv.bytes_per_position
    kv.limit = lambda: 2 * 600 * per_position
    kv.reserve(2, 600)  # two rows left, now long: the spare rows go, not the limit
    assert kv.rows_capacity * kv.positions_capacity <= 1200
    assert kv.rows_capacity >= 2 and kv.positions_capacity >= 600
    assert kv.keys[0][0, 0, 10].tolist() == [7.0] * 4, "stored keys are kept"


@pytest.mark.parametrize("rows,positions", [(1, 1), (3, 200), (32, 64), (5, 4096)])
def test_what_is_asked_for_is_always_granted(rows: int, positions: int) -> None:
    kv = cache(limit=0)  # even a limit that cannot hold it: the engine admitted it
    kv.reserve(rows, positions)
    assert kv.rows_capacity >= rows and kv.positions_capacity >= positions
