"""RuntimeService over gRPC: validates requests, feeds the engine, streams its events.

The default model is loaded (converted first if needed) before the process reports
SERVING, so a healthy runtime can always answer. Score, Embed, LoadModel and UnloadModel
are part of the contract but not overridden yet: they answer UNIMPLEMENTED (see
llmos.services.interceptors) until the model-runtime work item.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from google.protobuf.duration_pb2 import Duration

from llmos.services.config import Settings
from llmos.services.errors import LlmosError, NotFound, Unavailable
from llmos.services.logs import task_id_var
from llmos.services.rpc_types import Context
from llmos.services.runtime.engine import Engine, EngineLimits, load_model
from llmos.services.runtime.models import resolve_model_dir
from llmos.services.runtime.sequences import Event
from llmos.services.validation import chat_messages, sampling_from
from llmos.v1 import common_pb2, runtime_pb2, runtime_pb2_grpc

log = logging.getLogger(__name__)


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


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
                queue_time=_duration(event.queue_time_s),
                time_to_first_token=_duration(event.time_to_first_token_s),
            )
        )
    return response


class RuntimeServicer(runtime_pb2_grpc.RuntimeServiceServicer):
    """The gRPC face of the engines, one per loaded model."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engines: dict[str, Engine] = {}

    @property
    def default_model(self) -> str:
        return Path(self.settings.model).name

    def engine_for(self, name: str) -> Engine:
        if not self.engines:
            raise Unavailable("the runtime is still loading its model", reason="NOT_READY")
        key = Path(name).name if name else self.default_model
        if key not in self.engines:
            raise NotFound(
                f"model {name!r} is not loaded; loaded: {sorted(self.engines)}",
                reason="MODEL_NOT_FOUND",
            )
        return self.engines[key]

    async def Generate(
        self,
        request: runtime_pb2.RuntimeServiceGenerateRequest,
        context: Context,
    ) -> AsyncIterator[runtime_pb2.RuntimeServiceGenerateResponse]:
        task_id_var.set(request.task_id)
        engine = self.engine_for(request.model)
        turns = chat_messages(request.prompt, request.messages, self.settings.max_prompt_chars)
        sampling = sampling_from(request.sampling, self.settings.default_max_tokens)
        prompt_ids = engine.loaded.encode_chat(turns)
        handle = engine.submit(prompt_ids, sampling)
        try:
            first = True
            async for event in handle.events():
                if event.finish_reason == common_pb2.FINISH_REASON_ERROR:
                    raise LlmosError(
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

    async def ListModels(
        self,
        request: runtime_pb2.RuntimeServiceListModelsRequest,
        context: Context,
    ) -> runtime_pb2.RuntimeServiceListModelsResponse:
        return runtime_pb2.RuntimeServiceListModelsResponse(
            models=[engine.loaded.info() for engine in self.engines.values()]
        )


class RuntimeService:
    """The runtime process: ready once its default model is loaded."""

    kind = common_pb2.SERVICE_KIND_RUNTIME

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # RPCs not built yet are left to the generated base: they answer UNIMPLEMENTED.
        self.servicer = RuntimeServicer(settings)  # type: ignore[abstract]

    def add_to_server(self, server: grpc.aio.Server) -> list[str]:
        runtime_pb2_grpc.add_RuntimeServiceServicer_to_server(self.servicer, server)
        return [runtime_pb2.DESCRIPTOR.services_by_name["RuntimeService"].full_name]

    async def start(self) -> None:
        name = self.settings.model
        model_dir = await asyncio.to_thread(resolve_model_dir, name, self.settings.data_dir)
        log.info("loading %s from %s", name, model_dir)
        loaded = await asyncio.to_thread(
            load_model, self.servicer.default_model, str(model_dir), self.settings.torch_threads
        )
        self.servicer.engines[loaded.name] = Engine(
            loaded, EngineLimits(max_queued=self.settings.runtime_max_queued)
        )
        log.info("%s loaded: %d parameters", loaded.name, loaded.parameters)

    async def stop(self) -> None:
        for engine in self.servicer.engines.values():
            await asyncio.to_thread(engine.close)
