"""ErrorInterceptor on a real in-process grpc.aio server, and the errors its clients read back."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from llmos.services.errors import (
    DOMAIN,
    InvalidArgument,
    LlmosError,
    NotFound,
    Unavailable,
    error_info,
    from_rpc_error,
)
from llmos.services.interceptors import ErrorInterceptor
from llmos.services.logs import request_id_var
from llmos.v1 import kernel_pb2, kernel_pb2_grpc

Context = Any  # grpc.aio.ServicerContext


class Servicer(kernel_pb2_grpc.KernelServiceServicer):
    async def ListServices(
        self, request: kernel_pb2.ListServicesRequest, context: Context
    ) -> kernel_pb2.ListServicesResponse:
        raise NotFound("x", reason="R", metadata={"k": "v"})

    async def GetTask(
        self, request: kernel_pb2.GetTaskRequest, context: Context
    ) -> kernel_pb2.GetTaskResponse:
        if request.task_id == "crash":
            raise RuntimeError("something broke")
        # Echo the request id the interceptor put in the logging context.
        return kernel_pb2.GetTaskResponse(output=request_id_var.get())

    async def CancelTask(
        self, request: kernel_pb2.CancelTaskRequest, context: Context
    ) -> kernel_pb2.CancelTaskResponse:
        await context.abort(grpc.StatusCode[request.task_id], "plain abort")
        raise AssertionError("abort returned")

    async def Generate(
        self, request: kernel_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[kernel_pb2.GenerateResponse]:
        yield kernel_pb2.GenerateResponse(text="first")
        if request.prompt == "crash":
            raise RuntimeError("mid-stream failure")
        raise InvalidArgument("bad prompt", reason="BAD_PROMPT", metadata={"field": "prompt"})

    async def WatchTask(self, request: kernel_pb2.WatchTaskRequest, context: Context) -> None:
        # A streaming handler written as a coroutine that writes, not an async generator.
        await context.write(kernel_pb2.WatchTaskResponse(text="one", offset=1))
        if request.task_id == "crash":
            raise RuntimeError("writer failure")
        raise NotFound(f"no task {request.task_id!r}", reason="TASK_NOT_FOUND")


@pytest.fixture
async def stub() -> AsyncIterator[kernel_pb2_grpc.KernelServiceStub]:
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    kernel_pb2_grpc.add_KernelServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield kernel_pb2_grpc.KernelServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


async def test_llmos_error_becomes_its_status_with_error_info(
    stub: kernel_pb2_grpc.KernelServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListServices(kernel_pb2.ListServicesRequest(), timeout=5)

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "x"
    info = error_info(caught.value)
    assert info is not None
    assert (info.reason, info.domain, dict(info.metadata)) == ("R", DOMAIN, {"k": "v"})


async def test_from_rpc_error_rebuilds_our_error_naming_the_hop(
    stub: kernel_pb2_grpc.KernelServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListServices(kernel_pb2.ListServicesRequest(), timeout=5)

    error = from_rpc_error(caught.value, "kernel ListServices")

    assert type(error) is NotFound
    assert error.message == "kernel ListServices: x"
    assert error.reason == "R"
    assert error.metadata == {"k": "v"}


async def test_handler_sees_the_clients_request_id(
    stub: kernel_pb2_grpc.KernelServiceStub,
) -> None:
    reply = await stub.GetTask(
        kernel_pb2.GetTaskRequest(task_id="t"), metadata=(("x-request-id", "req-42"),), timeout=5
    )

    assert reply.output == "req-42"


async def test_handler_gets_a_fresh_request_id_when_none_is_sent(
    stub: kernel_pb2_grpc.KernelServiceStub,
) -> None:
    first = await stub.GetTask(kernel_pb2.GetTaskRequest(task_id="t"), timeout=5)
    second = await stub.GetTask(kernel_pb2.GetTaskRequest(task_id="t"), timeout=5)

    assert re.fullmatch(r"[0-9a-f]{16}", first.output)
    assert first.output != second.output


async def test_unexpected_exception_is_internal_with_request_id_and_server_keeps_serving(
    stub: kernel_pb2_grpc.KernelServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetTask(
            kernel_pb2.GetTaskRequest(task_id="crash"),
            metadata=(("x-request-id", "req-crash-7"),),
            timeout=5,
        )

    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "req-crash-7" in caught.value.details()
    assert "/llmos.v1.KernelService/GetTask" in caught.value.details()
    # The exception's own text stays in the service log, not in the reply.
    assert "something broke" not in caught.value.details()
    info = error_info(caught.value)
    assert info is not None
    assert info.reason == "INTERNAL"
    rebuilt = from_rpc_error(caught.value, "kernel GetTask")
    assert type(rebuilt) is LlmosError
    assert rebuilt.reason == "INTERNAL"

    reply = await stub.GetTask(kernel_pb2.GetTaskRequest(task_id="after"), timeout=5)
    assert reply.output


async def test_stream_error_after_a_message_keeps_the_message_and_the_status(
    stub: kernel_pb2_grpc.KernelServiceStub,
) -> None:
    call = stub.Generate(kernel_pb2.GenerateRequest(prompt="p"), timeout=5)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for reply in call:
            received.append(reply.text)

    assert received == ["first"]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(caught.value, "kernel Generate")
    assert type(error) is InvalidArgument
    assert error.message == "kernel Generate: bad prompt"
    assert (error.reason, error.metadata) == ("BAD_PROMPT", {"field": "prompt"})


async def test_stream_unexpected_exception_is_internal_with_request_id(
    stub: kernel_pb2_grpc.KernelServiceStub,
) -> None:
    call = stub.Generate(
        kernel_pb2.GenerateRequest(prompt="crash"),
        metadata=(("x-request-id", "req-stream-1"),),
        timeout=5,
    )
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for reply in call:
            received.append(reply.text)

    assert received == ["first"]
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "req-stream-1" in caught.value.details()
    assert "mid-stream failure" not in caught.value.details()


@pytest.mark.parametrize(
    ("task_id", "code"),
    [("gone", grpc.StatusCode.NOT_FOUND), ("crash", grpc.StatusCode.INTERNAL)],
)
async def test_coroutine_streaming_handler_errors_are_mapped(
    stub: kernel_pb2_grpc.KernelServiceStub, task_id: str, code: grpc.StatusCode
) -> None:
    call = stub.WatchTask(kernel_pb2.WatchTaskRequest(task_id=task_id), timeout=5)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for reply in call:
            received.append(reply.text)

    assert received == ["one"]
    assert caught.value.code() == code


async def test_abort_passes_through_without_error_info(
    stub: kernel_pb2_grpc.KernelServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CancelTask(kernel_pb2.CancelTaskRequest(task_id="UNAVAILABLE"), timeout=5)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "plain abort"
    assert error_info(caught.value) is None
    error = from_rpc_error(caught.value, "kernel CancelTask")
    assert type(error) is Unavailable
    assert error.reason == "UNAVAILABLE"
    assert error.metadata == {}


async def test_from_rpc_error_with_an_unmapped_code_is_the_base_error(
    stub: kernel_pb2_grpc.KernelServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CancelTask(kernel_pb2.CancelTaskRequest(task_id="OUT_OF_RANGE"), timeout=5)

    error = from_rpc_error(caught.value, "kernel CancelTask")

    assert type(error) is LlmosError
    assert error.reason == "OUT_OF_RANGE"
    assert error.message == "kernel CancelTask: plain abort"
