"""The runtime's waiting queue (services/runtime/admission.py): class first, aging so batch
work never starves, then arrival; pure logic, on a clock the tests choose."""

from __future__ import annotations

import dataclasses

import pytest

from llmos.services.errors import InvalidArgument
from llmos.services.runtime.admission import (
    BATCH,
    INTERACTIVE,
    NORMAL,
    WaitingQueue,
    effective_class,
    priority_class,
)


@dataclasses.dataclass(eq=False)
class Item:
    name: str
    priority: int
    arrived: float


def names(queue: WaitingQueue[Item]) -> list[str]:
    return [item.name for item in queue]


def test_the_lowest_class_goes_first_then_the_earliest() -> None:
    queue: WaitingQueue[Item] = WaitingQueue(aging_s=10.0)
    for item in [
        Item("batch-early", BATCH, 0.0),
        Item("normal", NORMAL, 1.0),
        Item("batch-late", BATCH, 2.0),
        Item("interactive", INTERACTIVE, 3.0),
    ]:
        queue.append(item)
    queue.order(now=4.0)
    assert names(queue) == ["interactive", "normal", "batch-early", "batch-late"]
    assert queue.popleft().name == "interactive"
    assert len(queue) == 3 and queue[0].name == "normal"


def test_aging_raises_a_class_one_level_per_period() -> None:
    assert effective_class(BATCH, 0.0, 5.0) == BATCH
    assert effective_class(BATCH, 4.9, 5.0) == BATCH
    assert effective_class(BATCH, 5.0, 5.0) == NORMAL
    assert effective_class(BATCH, 10.0, 5.0) == INTERACTIVE
    assert effective_class(BATCH, 1000.0, 5.0) == INTERACTIVE
    assert effective_class(INTERACTIVE, 1000.0, 5.0) == INTERACTIVE


def test_old_batch_work_is_admitted_ahead_of_a_stream_of_fresh_interactive_work() -> None:
    """No starvation: however many interactive requests keep arriving, a batch request
    that waited 2 x aging_s is next, because it arrived before all of them."""
    queue: WaitingQueue[Item] = WaitingQueue(aging_s=5.0)
    old = Item("old-batch", BATCH, 0.0)
    queue.append(old)
    admitted: list[str] = []
    for tick in range(1, 30):  # one interactive arrival and one free place per second
        now = float(tick)
        queue.append(Item(f"interactive-{tick}", INTERACTIVE, now))
        queue.order(now)
        admitted.append(queue.popleft().name)
        if admitted[-1] == old.name:
            break
    # Until it aged to interactive (10 s) fresh interactive work went first; then it did.
    assert admitted[-1] == "old-batch"
    assert len(admitted) == 10
    assert all(name.startswith("interactive") for name in admitted[:-1])


def test_a_batch_request_waits_behind_normal_work_only_until_it_ages() -> None:
    queue: WaitingQueue[Item] = WaitingQueue(aging_s=5.0)
    queue.append(Item("batch", BATCH, 0.0))
    queue.append(Item("normal", NORMAL, 4.0))
    queue.order(now=4.5)
    assert names(queue) == ["normal", "batch"]
    queue.order(now=5.0)  # aged to normal, and it arrived first
    assert names(queue) == ["batch", "normal"]


def test_remove_and_clear() -> None:
    queue: WaitingQueue[Item] = WaitingQueue(aging_s=5.0)
    first, second = Item("a", NORMAL, 0.0), Item("b", NORMAL, 0.0)
    queue.append(first)
    queue.append(second)
    queue.remove(first)
    assert names(queue) == ["b"]
    with pytest.raises(ValueError):
        queue.remove(first)
    queue.clear()
    assert not queue


def test_priority_values() -> None:
    assert priority_class(0) == NORMAL  # unspecified
    assert [priority_class(v) for v in (1, 2, 3)] == [INTERACTIVE, NORMAL, BATCH]
    with pytest.raises(InvalidArgument) as refused:
        priority_class(4)
    assert refused.value.reason == "INVALID_PRIORITY"
