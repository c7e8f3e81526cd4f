"""CallEndings on real calls to a real in-process grpc.aio runtime servicer: what a runtime
does after its last piece is logged or cut short, never waited for by the task."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from llmos.kernel.call_endings import CallEndings
from llmos.v1 import common_pb2, runtime_pb2, runtime_pb2_grpc

Context = Any  # grpc.aio.ServicerContext

LAST = runtime_pb2.RuntimeServiceGenerateResponse(
    text="done", finish_reason=common_pb2.FINISH_REASON_STOP
)


class Runtime(runtime_pb2_grpc.RuntimeServiceServicer):
    """Sends its last piece, then does what the prompt says: "ok" ends the call, "fail"
    aborts it, "hang" never ends it (until it is cancelled)."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    async def Generate(
        self, request: runtime_pb2.RuntimeServiceGenerateRequest, context: Context
    ) -> AsyncIterator[runtime_pb2.RuntimeServiceGenerateResponse]:
        yield LAST
        if request.prompt == "fail":
            await context.abort(grpc.StatusCode.INTERNAL, "the runtime broke after its output")
        if request.prompt == "hang":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise


@pytest.fixture
async def runtime() -> AsyncIterator[tuple[Runtime, runtime_pb2_grpc.RuntimeServiceStub]]:
    servicer = Runtime()
    server = grpc.aio.server()
    runtime_pb2_grpc.add_RuntimeServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield servicer, runtime_pb2_grpc.RuntimeServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


async def last_piece_read(stub: runtime_pb2_grpc.RuntimeServiceStub, prompt: str) -> Any:
    """A Generate call whose last piece was read, and nothing after it (as the runner does)."""
    call = stub.Generate(runtime_pb2.RuntimeServiceGenerateRequest(prompt=prompt), timeout=30)
    async for piece in call:
        assert piece == LAST
        break
    return call


async def logged(caplog: pytest.LogCaptureFixture, within_s: float = 5.0) -> None:
    """Wait for the follower to log something (it runs once the call's status came)."""
    async with asyncio.timeout(within_s):
        while not caplog.records:  # noqa: ASYNC110 (caplog has no event to wait on)
            await asyncio.sleep(0.01)


async def test_an_error_after_the_last_piece_is_logged_naming_the_task_and_ok_is_silent(
    runtime: tuple[Runtime, runtime_pb2_grpc.RuntimeServiceStub], caplog: pytest.LogCaptureFixture
) -> None:
    _, stub = runtime
    endings = CallEndings()
    fine, broken = await last_piece_read(stub, "ok"), await last_piece_read(stub, "fail")

    with caplog.at_level(logging.WARNING, logger="llmos.kernel.call_endings"):
        endings.follow(fine, "t-ok", "runtime-0")
        assert await fine.code() == grpc.StatusCode.OK
        endings.follow(broken, "t-1", "runtime-0")
        assert await broken.code() == grpc.StatusCode.INTERNAL
        await logged(caplog)
        await endings.close()

    (warning,) = caplog.records  # the OK call, followed and ended first, logged nothing
    assert "t-1" in warning.getMessage() and "INTERNAL" in warning.getMessage()
    assert "the runtime broke after its output" in warning.getMessage()


async def test_a_runtime_that_never_ends_the_call_is_cancelled_after_the_grace(
    runtime: tuple[Runtime, runtime_pb2_grpc.RuntimeServiceStub], caplog: pytest.LogCaptureFixture
) -> None:
    servicer, stub = runtime
    endings = CallEndings(grace_s=0.2)
    call = await last_piece_read(stub, "hang")

    with caplog.at_level(logging.WARNING, logger="llmos.kernel.call_endings"):
        endings.follow(call, "t-3", "runtime-0")
        await asyncio.wait_for(servicer.cancelled.wait(), 5)

    assert call.cancelled()
    (warning,) = caplog.records
    assert "t-3" in warning.getMessage() and "cancelled" in warning.getMessage()


async def test_close_cancels_the_calls_still_followed(
    runtime: tuple[Runtime, runtime_pb2_grpc.RuntimeServiceStub],
) -> None:
    servicer, stub = runtime
    endings = CallEndings()
    call = await last_piece_read(stub, "hang")
    endings.follow(call, "t-4", "runtime-0")

    await endings.close()

    await asyncio.wait_for(servicer.cancelled.wait(), 5)
    assert call.cancelled()
