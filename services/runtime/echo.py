"""The echo engine: a runtime that loads no model and streams each prompt back, word by word.

Selected by the setting `runtime_engine = "echo"` (`LLMOS_RUNTIME_ENGINE=echo`): the stack's
"runtime" process (kernel/stack.py builds it, `llmos serve runtime` and `llmos up` run it)
then serves the same RuntimeService contract through the same `serve()` — health,
reflection, registration with the kernel as a runtime — with this servicer instead of the
model's. So tests and benchmarks exercise everything around the model (the kernel's
scheduler, pipeline and task store, the CLI, the wire) in milliseconds, without converting
or loading a model; bench/kernel.py measures the kernel with it. It imports no torch (it
never imports services/runtime/server.py), so it starts in a fraction of a second.

Generate validates the request as the model runtime does, then streams the prompt (or the
messages' contents joined by newlines, the text the kernel's stages see) back as one
response per word, whitespace kept, so the pieces join to the prompt exactly. `max_tokens`
counts words: a longer prompt stops there with FINISH_REASON_LENGTH, otherwise the last
piece carries FINISH_REASON_STOP. Usage counts words; token ids are word positions, not
vocabulary ids. The other sampling fields are validated and otherwise ignored. ListModels
reports one model, "echo". Score, Embed, LoadModel and UnloadModel need a model and answer
UNIMPLEMENTED (ECHO_ENGINE).
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

import grpc

from llmos.services.config import Settings
from llmos.services.errors import InvalidArgument, NotFound, Unimplemented
from llmos.services.logs import task_id_var
from llmos.services.rpc_types import Context
from llmos.services.timing import duration
from llmos.services.validation import chat_messages, sampling_from
from llmos.v1 import common_pb2, runtime_pb2, runtime_pb2_grpc

ECHO_MODEL = "echo"
ENGINES = ("model", "echo")
_WORD = re.compile(r"\S+\s*")


def uses_echo(settings: Settings) -> bool:
    """Whether `runtime_engine` selects the echo engine; an unknown engine stops the runtime
    at start rather than silently loading the model."""
    if settings.runtime_engine not in ENGINES:
        raise InvalidArgument(
            f"runtime_engine is {settings.runtime_engine!r}; use one of {', '.join(ENGINES)}",
            reason="BAD_SETTING",
        )
    return settings.runtime_engine == ECHO_MODEL


def words(text: str) -> list[str]:
    """`text` cut into words, each keeping the whitespace after it (and the first, any
    before it), so that `"".join(words(text)) == text`."""
    pieces = _WORD.findall(text)
    if pieces:
        pieces[0] = text[: len(text) - len(text.lstrip())] + pieces[0]
    return pieces


def _refuse(rpc: str) -> Unimplemented:
    return Unimplemented(
        f"{rpc} needs a model, and this runtime runs the echo engine (runtime_engine = "
        '"echo"); start it with runtime_engine = "model"',
        reason="ECHO_ENGINE",
    )


class EchoServicer(runtime_pb2_grpc.RuntimeServiceServicer):
    """RuntimeService answered without a model."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.running = 0

    async def Generate(
        self, request: runtime_pb2.RuntimeServiceGenerateRequest, context: Context
    ) -> AsyncIterator[runtime_pb2.RuntimeServiceGenerateResponse]:
        started = time.monotonic()
        task_id_var.set(request.task_id)
        if request.model not in ("", ECHO_MODEL):
            raise NotFound(
                f"model {request.model!r} is not loaded: this runtime runs the echo engine "
                f"and serves only {ECHO_MODEL!r}",
                reason="MODEL_NOT_FOUND",
            )
        turns = chat_messages(request.prompt, request.messages, self.settings.max_prompt_chars)
        sampling = sampling_from(request.sampling, self.settings.default_max_tokens)
        prompt = words("\n".join(turn["content"] for turn in turns))
        pieces = prompt[: sampling.max_tokens]
        finish = (
            common_pb2.FINISH_REASON_LENGTH
            if len(prompt) > len(pieces)
            else common_pb2.FINISH_REASON_STOP
        )
        self.running += 1
        try:
            for index, piece in enumerate(pieces):
                response = runtime_pb2.RuntimeServiceGenerateResponse(text=piece, token_ids=[index])
                if index == 0:
                    response.model = ECHO_MODEL
                if index == len(pieces) - 1:
                    response.finish_reason = finish
                    response.usage.CopyFrom(
                        common_pb2.Usage(
                            prompt_tokens=len(prompt),
                            completion_tokens=len(pieces),
                            queue_time=duration(0.0),
                            time_to_first_token=duration(time.monotonic() - started),
                        )
                    )
                yield response
        finally:
            self.running -= 1

    async def ListModels(
        self, request: runtime_pb2.RuntimeServiceListModelsRequest, context: Context
    ) -> runtime_pb2.RuntimeServiceListModelsResponse:
        info = common_pb2.ModelInfo(
            name=ECHO_MODEL,
            loaded=True,
            source="echo engine: streams the prompt back, no weights",
            running_sequences=self.running,
        )
        return runtime_pb2.RuntimeServiceListModelsResponse(models=[info])

    async def Score(
        self, request: runtime_pb2.RuntimeServiceScoreRequest, context: Context
    ) -> runtime_pb2.RuntimeServiceScoreResponse:
        raise _refuse("Score")

    async def Embed(
        self, request: runtime_pb2.RuntimeServiceEmbedRequest, context: Context
    ) -> runtime_pb2.RuntimeServiceEmbedResponse:
        raise _refuse("Embed")

    async def LoadModel(
        self, request: runtime_pb2.RuntimeServiceLoadModelRequest, context: Context
    ) -> runtime_pb2.RuntimeServiceLoadModelResponse:
        raise _refuse("LoadModel")

    async def UnloadModel(
        self, request: runtime_pb2.RuntimeServiceUnloadModelRequest, context: Context
    ) -> runtime_pb2.RuntimeServiceUnloadModelResponse:
        raise _refuse("UnloadModel")


class EchoRuntimeService:
    """The runtime process with the echo engine: ready at once, nothing to load or free."""

    kind = common_pb2.SERVICE_KIND_RUNTIME

    def __init__(self, settings: Settings) -> None:
        self.servicer = EchoServicer(settings)

    def add_to_server(self, server: grpc.aio.Server) -> list[str]:
        runtime_pb2_grpc.add_RuntimeServiceServicer_to_server(self.servicer, server)
        return [runtime_pb2.DESCRIPTOR.services_by_name["RuntimeService"].full_name]

    async def start(self) -> None:
        """Nothing to load."""

    async def stop(self) -> None:
        """Nothing to release."""
