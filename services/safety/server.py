"""SafetyService over gRPC: Check, CheckStream, GetPolicy, SetPolicy.

Start-up loads the encoder (exporting the int8 ONNX file into
`<data_dir>/models/safety-encoder/` the first time), the trained head shipped in the
package (`model/head.npz`; its data card is `model/card.json` and docs/safety.md), and
the tenants' policies from `<data_dir>/safety/policies.json`.
Checks run the judge (judge.py) in a worker thread; policies are read on every check, so a
SetPolicy applies to the next one. Bad input is refused through the error table
(checks.py); the handlers are registered with lenient decoding, so even a request that is
not valid protobuf (invalid UTF-8 in a string) gets INVALID_ARGUMENT, not INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from llmos.services.config import Settings
from llmos.services.errors import FailedPrecondition, InvalidArgument
from llmos.services.rpc_types import Context
from llmos.services.safety.checks import (
    MAX_STREAM_CHARS,
    check_direction,
    check_text,
    lenient,
    parsed,
)
from llmos.services.safety.head import Head
from llmos.services.safety.judge import Judge
from llmos.services.safety.policy import PolicyBook
from llmos.services.safety.stream import StreamWindows
from llmos.v1 import common_pb2, safety_pb2

log = logging.getLogger(__name__)

HEAD_PATH = Path(__file__).parent / "model" / "head.npz"
SERVICE_NAME = "llmos.v1.SafetyService"


class SafetyServicer:
    """The gRPC face of the judge and the policy book."""

    def __init__(self, book: PolicyBook) -> None:
        self.book = book
        self.judge: Judge | None = None

    def _judge(self) -> Judge:
        if self.judge is None:  # pragma: no cover - serve() reports SERVING after start()
            raise FailedPrecondition("the classifier is still loading", reason="NOT_READY")
        return self.judge

    async def check(
        self, text: str, direction: safety_pb2.Direction.ValueType, tenant: str
    ) -> safety_pb2.SafetyVerdict:
        policy = self.book.effective(tenant)
        return await asyncio.to_thread(self._judge().check, text, direction, policy)

    async def Check(self, request: Any, context: Context) -> safety_pb2.SafetyServiceCheckResponse:
        parsed(request)
        check_text(request.text)
        direction = check_direction(request.direction)
        verdict = await self.check(request.text, direction, request.tenant)
        return safety_pb2.SafetyServiceCheckResponse(verdict=verdict)

    async def CheckStream(
        self, requests: AsyncIterator[Any], context: Context
    ) -> AsyncIterator[safety_pb2.SafetyServiceCheckStreamResponse]:
        windows = StreamWindows()
        tenant: str | None = None
        last = safety_pb2.SafetyVerdict(allowed=True, action=safety_pb2.SAFETY_ACTION_ALLOW)
        async for request in requests:
            parsed(request)
            if tenant is None:
                tenant = request.tenant
            windows.add(request.text)
            if len(windows.text) > MAX_STREAM_CHARS:
                raise InvalidArgument(
                    f"the stream passed {MAX_STREAM_CHARS:,} characters; check longer outputs "
                    "in several streams",
                    reason="TEXT_TOO_LONG",
                )
            if windows.due():
                last = await self._window(windows, tenant)
            yield safety_pb2.SafetyServiceCheckStreamResponse(
                verdict=last, checked_chars=windows.checked
            )
            if not last.allowed:
                return
        if tenant is not None and windows.due(final=True):
            last = await self._window(windows, tenant)
        yield safety_pb2.SafetyServiceCheckStreamResponse(
            verdict=last, checked_chars=windows.checked
        )

    async def _window(self, windows: StreamWindows, tenant: str) -> safety_pb2.SafetyVerdict:
        offset, text = windows.window()
        if not text.strip():
            return safety_pb2.SafetyVerdict(allowed=True, action=safety_pb2.SAFETY_ACTION_ALLOW)
        verdict = await self.check(text, safety_pb2.DIRECTION_OUTPUT, tenant)
        for evidence in verdict.evidence:  # spans count from the stream's start
            evidence.start += offset
            evidence.end += offset
        return verdict

    async def GetPolicy(
        self, request: Any, context: Context
    ) -> safety_pb2.SafetyServiceGetPolicyResponse:
        parsed(request)
        return safety_pb2.SafetyServiceGetPolicyResponse(
            policy=self.book.get(request.tenant).to_proto()
        )

    async def SetPolicy(
        self, request: Any, context: Context
    ) -> safety_pb2.SafetyServiceSetPolicyResponse:
        parsed(request)
        policy = self.book.set(request.policy)
        log.info("safety policy %s set", policy.version)
        return safety_pb2.SafetyServiceSetPolicyResponse(policy=policy.to_proto())


def _handlers(servicer: SafetyServicer) -> dict[str, Any]:
    """The generated table, with lenient request decoding (checks.py)."""
    pb = safety_pb2
    return {
        "Check": grpc.unary_unary_rpc_method_handler(
            servicer.Check,
            request_deserializer=lenient(pb.SafetyServiceCheckRequest.FromString),
            response_serializer=pb.SafetyServiceCheckResponse.SerializeToString,
        ),
        "CheckStream": grpc.stream_stream_rpc_method_handler(
            servicer.CheckStream,
            request_deserializer=lenient(pb.SafetyServiceCheckStreamRequest.FromString),
            response_serializer=pb.SafetyServiceCheckStreamResponse.SerializeToString,
        ),
        "GetPolicy": grpc.unary_unary_rpc_method_handler(
            servicer.GetPolicy,
            request_deserializer=lenient(pb.SafetyServiceGetPolicyRequest.FromString),
            response_serializer=pb.SafetyServiceGetPolicyResponse.SerializeToString,
        ),
        "SetPolicy": grpc.unary_unary_rpc_method_handler(
            servicer.SetPolicy,
            request_deserializer=lenient(pb.SafetyServiceSetPolicyRequest.FromString),
            response_serializer=pb.SafetyServiceSetPolicyResponse.SerializeToString,
        ),
    }


class SafetyService:
    """The safety process for `serve()`."""

    kind = common_pb2.SERVICE_KIND_SAFETY

    def __init__(self, settings: Settings) -> None:
        # The exported encoder sits with the converted models (shared by test stacks, which
        # link one models folder); the policies are this data directory's own.
        self.cache = Path(settings.data_dir) / "models" / "safety-encoder"
        policies = Path(settings.data_dir) / "safety" / "policies.json"
        self.servicer = SafetyServicer(PolicyBook(policies))

    def add_to_server(self, server: grpc.aio.Server) -> list[str]:
        handlers = _handlers(self.servicer)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        return [SERVICE_NAME]

    async def start(self) -> None:
        from llmos.services.safety.encoder import Encoder

        started = time.monotonic()
        encoder = await asyncio.to_thread(Encoder.load, self.cache)
        head = Head.load(HEAD_PATH)
        self.servicer.judge = Judge(encoder, head)
        await asyncio.to_thread(encoder.encode, ["warm up"])  # first run allocates
        log.info(
            "safety classifier ready in %.1fs (%s)", time.monotonic() - started, encoder.source
        )

    async def stop(self) -> None:
        """Nothing to release: the policies are saved on every change."""
