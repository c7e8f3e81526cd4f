"""Runtime calls that sent their last piece, followed until their status arrives.

The runtime's streamed Generate ends with a piece that carries the finish reason and the
usage, and then its status, OK, a moment later (~0.2 ms on a quiet two-core machine,
2026-11-30). Everything the task records is in that last piece, so the task runner ends
the task as soon as it arrives, and hands the call to `CallEndings` rather than waiting for
the status on the client's time.

Nothing is lost by not waiting: a runtime that sends its last piece has produced the whole
output. What the status could still say is that something went wrong after that (a bug in
the runtime): `CallEndings` logs it, naming the task, which keeps its output. A runtime
that never ends the stream is cancelled `GRACE_S` after the last piece, so no call is held
longer than that.

Following costs a call a dictionary entry and a done-callback: one reporter task reads the
statuses of the calls that ended since it last ran, and one timer, armed for the oldest
call followed, cancels overdue ones. A task per call would have cost each call of a
saturated kernel as much again as it saved the sequential one.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

log = logging.getLogger(__name__)

# How long a call that sent its last piece may take to end before it is cancelled.
GRACE_S = 10.0


class CallEndings:
    """The runtime calls being followed to their status, for one event loop."""

    def __init__(self, grace_s: float = GRACE_S) -> None:
        self.grace_s = grace_s
        # In the order followed (oldest first): the task's id, the runtime's name, and when
        # the call is given up.
        self._following: dict[grpc.aio.Call, tuple[str, str, float]] = {}
        self._ended: list[grpc.aio.Call] = []
        self._wake = asyncio.Event()
        self._reporter: asyncio.Task[None] | None = None
        self._overdue: asyncio.TimerHandle | None = None

    def follow(self, call: grpc.aio.Call, task_id: str, runtime: str) -> None:
        """Follow `call` to its status; a status other than OK is logged."""
        loop = asyncio.get_running_loop()
        if self._reporter is None:
            self._reporter = loop.create_task(self._report_forever(), name="call-endings")
        give_up_at = loop.time() + self.grace_s
        self._following[call] = (task_id, runtime, give_up_at)
        if self._overdue is None:
            self._overdue = loop.call_at(give_up_at, self._give_up_overdue)
        call.add_done_callback(self._done)

    def _done(self, call: grpc.aio.Call) -> None:
        self._ended.append(call)
        self._wake.set()

    async def _report_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            ended, self._ended = self._ended, []
            for call in ended:
                following = self._following.pop(call, None)
                if following is None:  # given up (and logged) already
                    continue
                code = await call.code()  # at once: the call is done
                if code != grpc.StatusCode.OK:
                    task_id, runtime, _ = following
                    log.warning(
                        "runtime %s ended task %s's call with %s after its last piece: %s "
                        "(the task keeps its output)",
                        runtime,
                        task_id,
                        code.name,
                        await call.details(),
                    )

    def _give_up_overdue(self) -> None:
        """Cancel the calls followed for longer than the grace, oldest first; arm the timer
        again for the oldest left."""
        self._overdue = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for call, (task_id, runtime, give_up_at) in list(self._following.items()):
            if give_up_at > now:
                self._overdue = loop.call_at(give_up_at, self._give_up_overdue)
                return
            del self._following[call]
            call.cancel()
            log.warning(
                "runtime %s did not end task %s's call within %.0f s of its last piece; "
                "cancelled it (the task keeps its output)",
                runtime,
                task_id,
                self.grace_s,
            )

    async def close(self) -> None:
        """Cancel the calls still followed (the kernel is stopping) and stop following."""
        if self._overdue is not None:
            self._overdue.cancel()
            self._overdue = None
        following, self._following = list(self._following), {}
        for call in following:
            call.cancel()
        if self._reporter is not None:
            self._reporter.cancel()
            await asyncio.gather(self._reporter, return_exceptions=True)
            self._reporter = None
