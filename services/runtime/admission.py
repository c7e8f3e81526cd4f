"""The runtime's waiting queue: which waiting sequence takes the next free place in the batch.

A first-come-first-served queue makes priority meaningless once the batch is full: the
kernel dispatched an interactive request first, but in the runtime it waits behind every
batch request that arrived before it (vLLM #24365). Here the next free place goes to the
waiting sequence of the lowest *effective* class, then the earliest arrival. A sequence's
effective class is the class the kernel dispatched it at (interactive 1, normal 2, batch 3),
raised one level for every `aging_s` seconds it has waited here, so batch work waits at most
2 x aging_s before it competes with fresh interactive work: it never starves.

Pure logic (no clock of its own, no lock): the engine orders the queue at each step
boundary, under its lock, with `order(now)`, then admits from the front. The queue holds at
most `runtime_max_queued` sequences (plus parked ones coming back), so a sort per boundary
costs microseconds.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Generic, Protocol, TypeVar, overload

from llmos.services.errors import InvalidArgument

INTERACTIVE, NORMAL, BATCH = 1, 2, 3
_LABELS = {INTERACTIVE: "interactive", NORMAL: "normal", BATCH: "batch"}


def priority_class(value: int) -> int:
    """The class of a llmos.v1.Priority value: unspecified (0) is normal; others refused."""
    if value == 0:
        return NORMAL
    if value not in _LABELS:
        raise InvalidArgument(
            f"priority {value} is not one of llmos.v1.Priority's values (0-3)",
            reason="INVALID_PRIORITY",
            metadata={"priority": str(value)},
        )
    return value


def label(priority: int) -> str:
    """ "interactive", "normal" or "batch"."""
    return _LABELS[priority]


def effective_class(priority: int, waited_s: float, aging_s: float) -> int:
    """`priority` raised one level (towards interactive) per `aging_s` seconds waited."""
    return max(INTERACTIVE, priority - int(max(0.0, waited_s) // aging_s))


class Queued(Protocol):
    """What the queue needs of a waiting sequence (`sequences.SequenceHandle`)."""

    @property
    def priority(self) -> int: ...

    @property
    def arrived(self) -> float: ...


T = TypeVar("T", bound=Queued)


class WaitingQueue(Sequence[T], Generic[T]):
    """Waiting sequences; after `order(now)`, index 0 is the next to admit."""

    def __init__(self, aging_s: float) -> None:
        self.aging_s = aging_s
        self._items: list[tuple[int, T]] = []  # (arrival order, item)
        self._seq = itertools.count()

    def append(self, item: T) -> None:
        self._items.append((next(self._seq), item))

    def remove(self, item: T) -> None:
        for index, (_, queued) in enumerate(self._items):
            if queued is item:
                del self._items[index]
                return
        raise ValueError("not queued")

    def clear(self) -> None:
        self._items.clear()

    def order(self, now: float) -> None:
        """Sort by effective class at `now`, then arrival (then submission order)."""
        aging_s = self.aging_s
        self._items.sort(
            key=lambda entry: (
                effective_class(entry[1].priority, now - entry[1].arrived, aging_s),
                entry[1].arrived,
                entry[0],
            )
        )

    def popleft(self) -> T:
        return self._items.pop(0)[1]

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[T]: ...

    def __getitem__(self, index: int | slice) -> T | Sequence[T]:
        if isinstance(index, slice):
            return [item for _, item in self._items[index]]
        return self._items[index][1]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter([item for _, item in self._items])
