"""GenericHandlersOnly (services/grpc_server.py) on a real in-process grpc.aio server: every kind of
method, health and reflection are served through the generic handlers alone."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from llmos.services.grpc_server import GenericHandlersOnly
from llmos.v1 import kernel_pb2, kernel_pb2_grpc

Context = Any  # grpc.aio.ServicerContext

KERNEL = kernel_pb2.DESCRIPTOR.services_by_name["KernelService"].full_name


class Servicer(kernel_pb2_grpc.KernelServiceServicer):
    async def GetTask(
        self, request: kernel_pb2.GetTaskRequest, context: Context
    ) -> kernel_pb2.GetTaskResponse:
        return kernel_pb2.GetTaskResponse(output=f"task {request.task_id}")

    async def Generate(
        self, request: kernel_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[kernel_pb2.GenerateResponse]:
        for word in request.prompt.split():
            yield kernel_pb2.GenerateResponse(text=word)


class Recording(GenericHandlersOnly):
    """A real server that takes registered methods and notes which reached it (the
    delegation of everything else is GenericHandlersOnly's)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        super().__init__(server)
        self.registered: list[str] = []

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.registered.append(service_name)
        self._server.add_registered_method_handlers(service_name, method_handlers)


@pytest.fixture
async def served() -> AsyncIterator[tuple[grpc.aio.Channel, Recording]]:
    inner = Recording(grpc.aio.server())
    server = GenericHandlersOnly(inner)
    kernel_pb2_grpc.add_KernelServiceServicer_to_server(Servicer(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([KERNEL, health.SERVICE_NAME], server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel, inner
    finally:
        await server.stop(None)


async def test_no_registered_method_reaches_the_server(
    served: tuple[grpc.aio.Channel, Recording],
) -> None:
    _, inner = served
    assert inner.registered == []


async def test_unary_and_streaming_methods_are_served_by_name(
    served: tuple[grpc.aio.Channel, Recording],
) -> None:
    channel, _ = served
    stub = kernel_pb2_grpc.KernelServiceStub(channel)
    task = await stub.GetTask(kernel_pb2.GetTaskRequest(task_id="t1"), timeout=5)
    assert task.output == "task t1"
    words = [
        piece.text async for piece in stub.Generate(kernel_pb2.GenerateRequest(prompt="a b c"))
    ]
    assert words == ["a", "b", "c"]


async def test_health_and_reflection_are_served(
    served: tuple[grpc.aio.Channel, Recording],
) -> None:
    channel, _ = served
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]))
    names = [
        service.name async for answer in stream for service in answer.list_services_response.service
    ]
    assert set(names) == {KERNEL, health.SERVICE_NAME}


async def test_a_method_no_servicer_has_is_unimplemented(
    served: tuple[grpc.aio.Channel, Recording],
) -> None:
    channel, _ = served
    call = channel.unary_unary("/llmos.v1.KernelService/NoSuchMethod")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(b"", timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
