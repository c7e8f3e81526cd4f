"""KernelService: the clients' only entry point; brokers Generate and keeps the registry.

Generate validates the request, picks a serving runtime from the registry and relays its
stream. The client's deadline bounds the downstream call (the time remaining is passed on),
and a client cancel cancels the downstream call, which drops the sequence in the runtime.
A runtime that dies mid-stream ends the client's stream with UNAVAILABLE at once.

Task, trace and scheduling RPCs are part of the contract but not overridden here: the
generated base class refuses them and the error interceptor answers UNIMPLEMENTED.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import grpc

from llmos.kernel.registry import Registry
from llmos.services.channels import outgoing_metadata
from llmos.services.config import Settings
from llmos.services.errors import from_rpc_error
from llmos.services.logs import task_id_var
from llmos.services.rpc_types import Context
from llmos.services.validation import chat_messages, sampling_from
from llmos.v1 import common_pb2, kernel_pb2, kernel_pb2_grpc, runtime_pb2, runtime_pb2_grpc

log = logging.getLogger(__name__)


class KernelServicer(kernel_pb2_grpc.KernelServiceServicer):
    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry

    async def Generate(
        self, request: kernel_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[kernel_pb2.GenerateResponse]:
        # Refuse bad input here, before anything downstream is touched.
        chat_messages(request.prompt, request.messages, self.settings.max_prompt_chars)
        sampling_from(request.sampling, self.settings.default_max_tokens)
        runtime = self.registry.pick(common_pb2.SERVICE_KIND_RUNTIME)
        task_id = uuid.uuid4().hex
        task_id_var.set(task_id)
        stub = runtime_pb2_grpc.RuntimeServiceStub(runtime.channel)
        call = stub.Generate(
            runtime_pb2.RuntimeServiceGenerateRequest(
                model=request.model,
                prompt=request.prompt,
                messages=request.messages,
                sampling=request.sampling,
                task_id=task_id,
            ),
            timeout=context.time_remaining(),
            metadata=outgoing_metadata(x_llmos_task_id=task_id),
        )
        log.info("task started on %s", runtime.info.name)
        try:
            first = True
            async for piece in call:
                response = kernel_pb2.GenerateResponse(
                    text=piece.text,
                    token_ids=piece.token_ids,
                    finish_reason=piece.finish_reason,
                    model=piece.model,
                )
                if piece.HasField("usage"):
                    response.usage.CopyFrom(piece.usage)
                if first:
                    response.task_id = task_id
                    first = False
                yield response
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(
                error, f"Generate on {runtime.info.name} at {runtime.info.address}"
            ) from error
        finally:
            # Reached on success too (no-op then); on a client cancel or deadline this is
            # what reaches the runtime and frees its slot.
            call.cancel()

    async def ListModels(
        self, request: kernel_pb2.ListModelsRequest, context: Context
    ) -> kernel_pb2.ListModelsResponse:
        runtime = self.registry.pick(common_pb2.SERVICE_KIND_RUNTIME)
        stub = runtime_pb2_grpc.RuntimeServiceStub(runtime.channel)
        try:
            reply = await stub.ListModels(
                runtime_pb2.RuntimeServiceListModelsRequest(),
                timeout=context.time_remaining(),
                metadata=outgoing_metadata(),
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(
                error, f"ListModels on {runtime.info.name} at {runtime.info.address}"
            ) from error
        return kernel_pb2.ListModelsResponse(models=reply.models)

    async def RegisterService(
        self, request: kernel_pb2.RegisterServiceRequest, context: Context
    ) -> kernel_pb2.RegisterServiceResponse:
        lease = await self.registry.register(request)
        return kernel_pb2.RegisterServiceResponse(lease_seconds=lease)

    async def DeregisterService(
        self, request: kernel_pb2.DeregisterServiceRequest, context: Context
    ) -> kernel_pb2.DeregisterServiceResponse:
        await self.registry.deregister(request.name)
        return kernel_pb2.DeregisterServiceResponse()

    async def ListServices(
        self, request: kernel_pb2.ListServicesRequest, context: Context
    ) -> kernel_pb2.ListServicesResponse:
        return kernel_pb2.ListServicesResponse(services=self.registry.services())


class KernelService:
    """The kernel process: ready at once; the registry fills as services register."""

    kind = common_pb2.SERVICE_KIND_KERNEL

    def __init__(self, settings: Settings) -> None:
        self.registry = Registry(settings.lease_s, settings.max_message_bytes)
        # RPCs not built yet are left to the generated base: they answer UNIMPLEMENTED.
        self.servicer = KernelServicer(settings, self.registry)  # type: ignore[abstract]

    def add_to_server(self, server: grpc.aio.Server) -> list[str]:
        kernel_pb2_grpc.add_KernelServiceServicer_to_server(self.servicer, server)
        return [kernel_pb2.DESCRIPTOR.services_by_name["KernelService"].full_name]

    async def start(self) -> None:
        self.registry.start()

    async def stop(self) -> None:
        await self.registry.close()
