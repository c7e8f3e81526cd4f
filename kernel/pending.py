"""A running task's text and trace steps on their way to the task store, written together.

Writing each streamed piece of text and each trace step the moment it exists costs one
task-store round trip apiece (several per request, most of the kernel's own work). The
task runner instead hands them to the task's `PendingWrites`, and they reach the store:

- with the task's next transition (`TaskStore.transition(text=..., trace=...)`), in the
  same atomic step: for a short request, everything it produced goes in with SUCCEEDED; or
- on their own, whichever comes first: `FLUSH_S` after the oldest text was added, or
  `STEP_FLUSH_S` after the oldest trace step when no text is pending. So `WatchTask`
  readers see a long-running task's output within about `FLUSH_S`, and `GetTrace` its
  steps within about `STEP_FLUSH_S` (plus the write itself).

Steps wait longer because of what they cost alone (a store job each): every task adds its
`admit` step (and its input stages' steps) before the runtime call, and a model whose first
token takes longer than `FLUSH_S` had them written on their own, then its text a moment
later. Nobody streams trace steps as they happen; output is streamed, so text keeps the
short window, and steps pending then go with it.

Nothing is written on its own before the task's first write (`create`) has landed: nobody
can read the task before then, and the runner's next transition follows that write at
once. At saturation that write can take longer than `FLUSH_S` (the runtime call overlaps
it), and the flush that fired meanwhile cost a store job for the text and one per step,
all to be followed a moment later by the transition. The window starts again once the
first write has landed.

Every text write says where it starts in the attempt's output (`Taken.at`, the characters
taken before it), so the store keeps a write once even when it is sent twice: Redis can run
a script and lose its reply when the connection drops, and then the client sends it again,
or the text comes back here (`restore`) and goes again with the next write
(`kernel.store.contract.unstored_text`).

What is lost in a crash is at most the last `STEP_FLUSH_S` of a RUNNING attempt, which
recovery re-queues and runs afresh anyway (a re-queue starts the output over). States are
never held back: a transition is stored before the runner goes on, a final one before the
client hears of it.
"""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

from llmos.kernel.store import TaskStore
from llmos.services.errors import LlmosError

# The longest text waits before it is written on its own (with any steps pending).
FLUSH_S = 0.05
# The longest trace steps wait when no text is pending: long enough to outlast a call at
# saturation, so a short task's steps go with its final transition.
STEP_FLUSH_S = 0.5


class Taken(NamedTuple):
    """What a write takes: the text joined, where it starts in the attempt's output (the
    characters taken before it), and the trace steps in order."""

    text: str
    at: int
    steps: tuple[bytes, ...]


NOTHING_TAKEN = Taken("", 0, ())


class PendingWrites:
    """What one running task produced and the store has not got yet."""

    def __init__(
        self,
        store: TaskStore,
        task_id: str,
        flush_s: float = FLUSH_S,
        step_flush_s: float = STEP_FLUSH_S,
        *,
        stored: asyncio.Future[Any] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        attempt: int | None = None,
    ) -> None:
        """`stored`, when given, ends once the task's first write has (flushes wait).
        `loop` is the running loop, when the caller knows it (else asked for at first use).
        `attempt` is the task's attempt these writes belong to (`TaskStore.append_text`)."""
        self._store = store
        self._task_id = task_id
        self._flush_s = flush_s
        self._step_flush_s = step_flush_s
        self._stored = stored
        self._held = False  # a flush came due before `stored` ended: it re-arms then
        self._text: list[str] = []
        self._taken_chars = 0  # of the attempt's output, by writes that took text
        self._steps: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._error: LlmosError | None = None
        self._loop = loop
        self._attempt = attempt

    def add_text(self, text: str) -> None:
        """Hold `text` for the next write. Raises the error of a flush that failed since the
        last call (once), so a store that refuses the text ends the generation as a failed
        `append_text` used to."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if text:
            self._text.append(text)
            self._arm(self._flush_s)

    def add_step(self, step: bytes) -> None:
        """Hold a serialized trace step for the next write."""
        self._steps.append(step)
        self._arm(self._step_flush_s)

    async def take(self) -> Taken:
        """Everything pending, for a transition to store. A flush already writing goes
        first (its text precedes the transition's)."""
        if self._flushing is not None:
            await asyncio.wait((self._flushing,))  # not cancelled if the caller is
        self._disarm()
        return self._take_now()

    def restore(self, taken: Taken) -> None:
        """Put back what a write took but could not store (or may have stored: it goes
        again from the same place), ahead of anything newer."""
        if taken.text:
            self._text.insert(0, taken.text)
            self._taken_chars = taken.at
        self._steps[:0] = taken.steps

    def discard(self) -> None:
        """The task left this kernel without a state written here (another kernel took it
        over): what is pending belongs to an attempt that is over."""
        self._disarm()
        self._text.clear()
        self._steps.clear()

    def _take_now(self) -> Taken:
        taken = Taken("".join(self._text), self._taken_chars, tuple(self._steps))
        self._taken_chars += len(taken.text)
        self._text.clear()
        self._steps.clear()
        return taken

    def _arm(self, within: float) -> None:
        """Flush no later than `within` from now: a timer already due sooner stays, a later
        one (steps only, then text came) is brought forward. A flush in flight re-arms
        when it ends."""
        if self._flushing is not None or self._held:
            return
        loop = self._running_loop()
        when = loop.time() + within
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = loop.call_at(when, self._start_flush)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _start_flush(self) -> None:
        self._timer = None
        if self._stored is not None and not self._stored.done():
            self._held = True
            self._stored.add_done_callback(self._after_stored)
            return
        self._flushing = self._running_loop().create_task(
            self._flush(), name=f"flush-{self._task_id}"
        )

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop, asked for once (`get_running_loop` makes a system call each time)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _after_stored(self, stored: asyncio.Future[Any]) -> None:
        """The task's first write ended: flush what waits if it was stored. If it was
        refused or its outcome is unknown, nothing is written for a task the store may not
        hold; the runner then discards the attempt (or its next transition checks again)."""
        self._held = False
        if not stored.cancelled() and stored.exception() is None and stored.result() is True:
            self._rearm()

    def _rearm(self) -> None:
        if self._text or self._steps:
            self._arm(self._flush_s if self._text else self._step_flush_s)

    async def _flush(self) -> None:
        """Write what is pending on its own; what fails to be written goes back, to be
        tried again with the next transition."""
        taken = self._take_now()
        try:
            if taken.text:
                await self._store.append_text(
                    self._task_id, taken.text, at=taken.at, attempt=self._attempt
                )
                taken = taken._replace(text="")
            while taken.steps:
                await self._store.add_trace_step(self._task_id, taken.steps[0])
                taken = taken._replace(steps=taken.steps[1:])
        except LlmosError as error:
            self.restore(taken)
            self._error = error
        finally:
            self._flushing = None
        self._rearm()  # for what was added while this flush was writing, or put back
