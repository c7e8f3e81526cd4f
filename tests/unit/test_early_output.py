"""`_early_output` (kernel/tasks.py): what a Generate's first message may carry besides the
task id. A task that started at once waits up to FIRST_OUTPUT_WAIT_S for the runtime's
first output, so a short answer goes out in one message; nothing that comes later is
lost or reordered."""

from __future__ import annotations

import asyncio

from llmos.kernel.tasks import FIRST_OUTPUT_WAIT_S, NO_OUTPUT, STREAM_END, _early_output
from llmos.v1 import kernel_pb2

Listener = asyncio.Queue[kernel_pb2.GenerateResponse | None]


def piece(text: str) -> kernel_pb2.GenerateResponse:
    return kernel_pb2.GenerateResponse(text=text)


async def test_output_already_queued_is_taken_without_waiting() -> None:
    for wait in (False, True):
        listener: Listener = asyncio.Queue()
        listener.put_nowait(piece("early"))
        assert await _early_output(listener, wait=wait) == piece("early")
        assert listener.empty()


async def test_a_queued_task_does_not_wait() -> None:
    listener: Listener = asyncio.Queue()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await _early_output(listener, wait=False) is NO_OUTPUT
    assert loop.time() - started < FIRST_OUTPUT_WAIT_S


async def test_output_that_comes_within_the_wait_is_taken() -> None:
    listener: Listener = asyncio.Queue()
    asyncio.get_running_loop().call_soon(listener.put_nowait, piece("soon"))
    assert await _early_output(listener, wait=True) == piece("soon")
    assert listener.empty()


async def test_nothing_within_the_wait_gives_no_output_and_the_queue_stays_usable() -> None:
    listener: Listener = asyncio.Queue()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await _early_output(listener, wait=True) is NO_OUTPUT
    assert loop.time() - started >= FIRST_OUTPUT_WAIT_S * 0.9  # the loop's clock granularity
    listener.put_nowait(piece("late"))
    listener.put_nowait(STREAM_END)
    assert listener.get_nowait() == piece("late") and listener.get_nowait() is STREAM_END


async def test_a_piece_followed_at_once_by_the_end_keeps_the_end_queued() -> None:
    """The whole answer and the stream's end arrive before the waiting call resumes: the
    piece is returned, the end stays for the stream's loop."""
    listener: Listener = asyncio.Queue()

    def answer() -> None:
        listener.put_nowait(piece("all of it"))
        listener.put_nowait(STREAM_END)

    asyncio.get_running_loop().call_soon(answer)
    assert await _early_output(listener, wait=True) == piece("all of it")
    assert listener.qsize() == 1 and listener.get_nowait() is STREAM_END


async def test_the_end_alone_is_returned_as_the_end() -> None:
    listener: Listener = asyncio.Queue()
    asyncio.get_running_loop().call_soon(listener.put_nowait, STREAM_END)
    assert await _early_output(listener, wait=True) is STREAM_END
