"""Runtime calls that sent their last piece, followed until their status arrives.

The runtime's streamed Generate ends with a piece that carries the finish reason and the
usage, and then its status, OK, a moment later (~0.2 ms on a quiet two-core machine,
2026-11-30). Everything the task records is in that last piece, so the task runner ends
the task as soon as it arrives, and hands the call to `CallEndings` rather than waiting for
the status on the client's time.

Nothing is lost by not waiting: a runtime that sends its last piece has produced the whole
output and freed its batch slot. What the status could still say is that something went
wrong after that (a bug in the runtime): `CallEndings` logs it, naming the task, which
keeps its output. A runtime that never ends the stream is cancelled after `GRACE_S`, so a
call is never held longer than that.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

log = logging.getLogger(__name__)

# How long a call that sent its last piece may take to end before it is cancelled.
GRACE_S = 10.0


class CallEndings:
    """The calls being followed to their end, so that none is left unfinished at close."""

    def __init__(self, grace_s: float = GRACE_S) -> None:
        self.grace_s = grace_s
        self._following: dict[asyncio.Task[None], grpc.aio.Call] = {}

    def follow(self, call: grpc.aio.Call, task_id: str, runtime: str) -> None:
        """Wait for `call`'s status in the background; log it unless it is OK."""
        following = asyncio.get_running_loop().create_task(
            self._end(call, task_id, runtime), name=f"end-{task_id}"
        )
        self._following[following] = call
        following.add_done_callback(self._followed)

    def _followed(self, following: asyncio.Task[None]) -> None:
        self._following.pop(following, None)

    async def _end(self, call: grpc.aio.Call, task_id: str, runtime: str) -> None:
        try:
            async with asyncio.timeout(self.grace_s):
                code = await call.code()
        except TimeoutError:
            call.cancel()
            log.warning(
                "runtime %s did not end task %s's call within %.0f s of its last piece; "
                "cancelled it (the task keeps its output)",
                runtime,
                task_id,
                self.grace_s,
            )
            return
        if code != grpc.StatusCode.OK:
            log.warning(
                "runtime %s ended task %s's call with %s after its last piece: %s "
                "(the task keeps its output)",
                runtime,
                task_id,
                code.name,
                await call.details(),
            )

    async def close(self) -> None:
        """Cancel the calls still being followed (the kernel is stopping)."""
        followed = list(self._following.items())
        for following, call in followed:
            call.cancel()
            following.cancel()
        await asyncio.gather(*(following for following, _ in followed), return_exceptions=True)
