"""A running task's text and trace steps on their way to the task store, written together.

Writing each streamed piece of text and each trace step the moment it exists costs one
task-store round trip apiece (several per request, most of the kernel's own work). The
task runner instead hands them to the task's `PendingWrites`, and they reach the store:

- with the task's next transition (`TaskStore.transition(text=..., trace=...)`), in the
  same atomic step: for a short request, everything it produced goes in with SUCCEEDED; or
- on their own, `FLUSH_S` after the oldest of them was added, whichever comes first: so
  `WatchTask` readers and `GetTrace` see a long-running task's output and steps within
  about `FLUSH_S` (plus the write itself).

What is lost in a crash is at most the last `FLUSH_S` of a RUNNING attempt, which recovery
re-queues and runs afresh anyway (a re-queue starts the output over). States are never
held back: a transition is stored before the runner goes on, a final one before the
client hears of it.
"""

from __future__ import annotations

import asyncio

from llmos.kernel.store import TaskStore
from llmos.services.errors import LlmosError

# The longest text and trace steps wait before they are written on their own.
FLUSH_S = 0.05


class PendingWrites:
    """What one running task produced and the store has not got yet."""

    def __init__(self, store: TaskStore, task_id: str, flush_s: float = FLUSH_S) -> None:
        self._store = store
        self._task_id = task_id
        self._flush_s = flush_s
        self._text: list[str] = []
        self._steps: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._error: LlmosError | None = None

    def add_text(self, text: str) -> None:
        """Hold `text` for the next write. Raises the error of a flush that failed since the
        last call (once), so a store that refuses the text ends the generation as a failed
        `append_text` used to."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if text:
            self._text.append(text)
            self._arm()

    def add_step(self, step: bytes) -> None:
        """Hold a serialized trace step for the next write."""
        self._steps.append(step)
        self._arm()

    async def take(self) -> tuple[str, tuple[bytes, ...]]:
        """Everything pending, for a transition to store: the text joined and the steps in
        order. A flush already writing goes first (its text precedes the transition's)."""
        if self._flushing is not None:
            await asyncio.wait((self._flushing,))  # not cancelled if the caller is
        self._disarm()
        return self._take_now()

    def restore(self, text: str, steps: tuple[bytes, ...]) -> None:
        """Put back what a transition took but could not store, ahead of anything newer."""
        if text:
            self._text.insert(0, text)
        self._steps[:0] = steps

    def discard(self) -> None:
        """The task left this kernel without a state written here (another kernel took it
        over): what is pending belongs to an attempt that is over."""
        self._disarm()
        self._text.clear()
        self._steps.clear()

    def _take_now(self) -> tuple[str, tuple[bytes, ...]]:
        text, steps = "".join(self._text), tuple(self._steps)
        self._text.clear()
        self._steps.clear()
        return text, steps

    def _arm(self) -> None:
        if self._timer is None and self._flushing is None:
            self._timer = asyncio.get_running_loop().call_later(self._flush_s, self._start_flush)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _start_flush(self) -> None:
        self._timer = None
        self._flushing = asyncio.create_task(self._flush(), name=f"flush-{self._task_id}")

    async def _flush(self) -> None:
        """Write what is pending on its own; what fails to be written goes back, to be
        tried again with the next transition."""
        text, steps = self._take_now()
        try:
            if text:
                await self._store.append_text(self._task_id, text)
                text = ""
            while steps:
                await self._store.add_trace_step(self._task_id, steps[0])
                steps = steps[1:]
        except LlmosError as error:
            self.restore(text, steps)
            self._error = error
        finally:
            self._flushing = None
        if self._text or self._steps:  # added while this flush was writing
            self._arm()
