"""RuntimeService over gRPC: validates requests, feeds the engines, streams their events.

The default model is loaded (converted first if needed) before the process reports
SERVING, so a healthy runtime can always answer. Generate streams from the model's
continuous batch; Score reads log-probs in one forward pass; Embed serves sentence
embeddings (all-MiniLM-L6-v2, loaded on first use); LoadModel and UnloadModel change what
the runtime holds while it serves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from llmos.services.config import Settings
from llmos.services.errors import InvalidArgument, LlmosError
from llmos.services.logs import task_id_var
from llmos.services.rpc_types import Context
from llmos.services.runtime.admission import priority_class
from llmos.services.runtime.metrics import StreamMeter, watch_shelf
from llmos.services.runtime.scoring import score
from llmos.services.runtime.sequences import Event
from llmos.services.runtime.shelf import Shelf
from llmos.services.timing import duration
from llmos.services.validation import chat_messages, sampling_from
from llmos.v1 import common_pb2, runtime_pb2, runtime_pb2_grpc

log = logging.getLogger(__name__)


def _response(event: Event) -> runtime_pb2.RuntimeServiceGenerateResponse:
    response = runtime_pb2.RuntimeServiceGenerateResponse(
        text=event.text, token_ids=event.token_ids
    )
    if event.finish_reason is not None:
        response.finish_reason = event.finish_reason
        response.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
                queue_time=duration(event.queue_time_s),
                time_to_first_token=duration(event.time_to_first_token_s),
            )
        )
    if event.kv is not None:
        response.kv_admission.CopyFrom(
            runtime_pb2.KvAdmission(
                decision=event.kv.decision,
                batch_bytes=event.kv.batch_bytes,
                reserved_bytes=event.kv.reserved_bytes,
                memory_wait=duration(event.kv.memory_wait_s),
                reason=event.kv.reason,
            )
        )
    return response


class RuntimeServicer(runtime_pb2_grpc.RuntimeServiceServicer):
    """The gRPC face of the shelf of loaded models."""

    def __init__(self, settings: Settings, shelf: Shelf) -> None:
        self.settings = settings
        self.shelf = shelf

    async def Generate(
        self,
        request: runtime_pb2.RuntimeServiceGenerateRequest,
        context: Context,
    ) -> AsyncIterator[runtime_pb2.RuntimeServiceGenerateResponse]:
        task_id_var.set(request.task_id)
        engine = self.shelf.engine(request.model)
        turns = chat_messages(request.prompt, request.messages, self.settings.max_prompt_chars)
        sampling = sampling_from(request.sampling, self.settings.default_max_tokens)
        priority = priority_class(request.priority)
        prompt_ids = engine.loaded.encode_chat(turns)
        handle = engine.submit(prompt_ids, sampling, priority)
        meter = StreamMeter(engine.loaded.name, handle.arrived, len(prompt_ids))
        try:
            first = True
            async for event in handle.events():
                meter.event(event)
                if event.finish_reason == common_pb2.FINISH_REASON_ERROR:
                    raise event.error or LlmosError(
                        "decoding failed inside the runtime; see its log", reason="DECODE_FAILED"
                    )
                response = _response(event)
                if first:
                    response.model = engine.loaded.name
                    first = False
                yield response
        finally:
            # Client cancel, deadline or a finished stream: the worker drops the sequence
            # before its next step (a finished one is already gone).
            handle.cancel()
            meter.close()

    async def ListModels(
        self,
        request: runtime_pb2.RuntimeServiceListModelsRequest,
        context: Context,
    ) -> runtime_pb2.RuntimeServiceListModelsResponse:
        return runtime_pb2.RuntimeServiceListModelsResponse(models=self.shelf.infos())

    async def Score(
        self, request: runtime_pb2.RuntimeServiceScoreRequest, context: Context
    ) -> runtime_pb2.RuntimeServiceScoreResponse:
        loaded = self.shelf.engine(request.model).loaded
        scored = await asyncio.to_thread(score, loaded, request.context, request.continuation)
        return runtime_pb2.RuntimeServiceScoreResponse(
            tokens=[
                runtime_pb2.TokenLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob)
                for t in scored
            ]
        )

    async def Embed(
        self, request: runtime_pb2.RuntimeServiceEmbedRequest, context: Context
    ) -> runtime_pb2.RuntimeServiceEmbedResponse:
        embedder = await self.shelf.embedding_model(request.model)
        vectors = await asyncio.to_thread(embedder.embed, list(request.inputs))
        return runtime_pb2.RuntimeServiceEmbedResponse(
            embeddings=[runtime_pb2.Embedding(values=vector) for vector in vectors]
        )

    async def LoadModel(
        self, request: runtime_pb2.RuntimeServiceLoadModelRequest, context: Context
    ) -> runtime_pb2.RuntimeServiceLoadModelResponse:
        if not request.name:
            raise InvalidArgument(
                "LoadModel needs a name: a catalogue model or a model directory",
                reason="MODEL_NAME_MISSING",
            )
        return runtime_pb2.RuntimeServiceLoadModelResponse(
            model=await self.shelf.load(request.name)
        )

    async def UnloadModel(
        self, request: runtime_pb2.RuntimeServiceUnloadModelRequest, context: Context
    ) -> runtime_pb2.RuntimeServiceUnloadModelResponse:
        freed = await self.shelf.unload(request.name or self.shelf.default)
        return runtime_pb2.RuntimeServiceUnloadModelResponse(freed_bytes=freed)


class RuntimeService:
    """The runtime process: ready once its default model is loaded."""

    kind = common_pb2.SERVICE_KIND_RUNTIME

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.shelf = Shelf(settings)
        self.servicer = RuntimeServicer(settings, self.shelf)
        watch_shelf(self.shelf)

    def add_to_server(self, server: grpc.aio.Server) -> list[str]:
        runtime_pb2_grpc.add_RuntimeServiceServicer_to_server(self.servicer, server)
        return [runtime_pb2.DESCRIPTOR.services_by_name["RuntimeService"].full_name]

    async def start(self) -> None:
        await self.shelf.load(self.settings.model)

    async def stop(self) -> None:
        await self.shelf.close()
