"""PrivacyService over gRPC: Detect, Redact, Restore, RestoreStream, ForgetSubject,
ForgetTenant.

Detection runs on one worker thread in micro-batches (batching.py): concurrent Detect and
Redact calls share one `nlp.pipe` call, which costs much less a message than one call each.
Keys are loaded and the model is warmed before the process reports SERVING, so the first
request pays no loading cost. Redact returns the blind index of the text's data subjects
(subjects.py) for the kernel to store with the task; ForgetSubject deletes the vault
conversations that held a subject and returns its index under every key, for the kernel to
delete the tasks (docs/privacy.md "Retention and forgetting").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from llmos.services.config import Settings
from llmos.services.errors import FailedPrecondition, InvalidArgument
from llmos.services.keyring import KeyRing, load_keys
from llmos.services.privacy.batching import DetectBatcher
from llmos.services.privacy.checks import (
    check_conversation,
    check_subject,
    check_tenant,
    check_text,
    entity_types,
    operator_name,
)
from llmos.services.privacy.operators import (
    Redactor,
    StreamRestorer,
    restore,
    unseal,
)
from llmos.services.privacy.recognizers import Detector, Finding, NerRecognizer
from llmos.services.privacy.retention import sweep_forever, vault_scopes
from llmos.services.privacy.subjects import index_values, lookup_tokens
from llmos.services.privacy.vault import VAULT_FILE, Vault, rewrap_forever
from llmos.services.rpc_types import Context
from llmos.v1 import common_pb2, privacy_pb2, privacy_pb2_grpc

log = logging.getLogger(__name__)


def to_entity(finding: Finding) -> privacy_pb2.Entity:
    return privacy_pb2.Entity(
        type=finding.type,
        start=finding.start,
        end=finding.end,
        score=finding.score,
        recognizer=finding.recognizer,
        explanation=finding.explanation,
    )


class PrivacyServicer(privacy_pb2_grpc.PrivacyServiceServicer):
    """The gRPC face of the detector, the operators and the vault."""

    def __init__(self, detector: Detector, keys: KeyRing, vault: Vault) -> None:
        self.detector = detector
        self.keys = keys
        self.vault = vault
        self.redactor = Redactor(keys, vault)
        self.batcher = DetectBatcher(detector.detect_many)

    def close(self) -> None:
        self.batcher.close()

    async def detect(self, text: str) -> list[Finding]:
        return await self.batcher.detect(text)

    def restore_text(self, text: str, tenant: str, conversation: str) -> tuple[str, int]:
        pseudonyms = self.vault.values(tenant, conversation) if conversation else {}
        return restore(
            text,
            pseudonyms,
            lambda kind, key_id, payload: unseal(self.keys, tenant, kind, key_id, payload),
        )

    async def Detect(
        self, request: privacy_pb2.PrivacyServiceDetectRequest, context: Context
    ) -> privacy_pb2.PrivacyServiceDetectResponse:
        check_tenant(request.tenant)
        findings = await self.detect(check_text(request.text))
        return privacy_pb2.PrivacyServiceDetectResponse(entities=[to_entity(f) for f in findings])

    async def Redact(
        self, request: privacy_pb2.PrivacyServiceRedactRequest, context: Context
    ) -> privacy_pb2.PrivacyServiceRedactResponse:
        tenant = check_tenant(request.tenant)
        text = check_text(request.text)
        operator = operator_name(request.operator)
        conversation = check_conversation(request.conversation_id, required=False)
        kinds = entity_types(request.entity_types)
        # Filtered after detection, whose overlap resolution already left one finding per
        # character: the spans redacted are a subset of non-overlapping ones, so the round
        # trip stays exact. What is returned is what was redacted (the kernel counts it).
        detected = await self.detect(text)
        findings = [f for f in detected if f.type in kinds]
        redacted = self.redactor.redact(text, findings, operator, tenant, conversation)
        # Every detected value is indexed, redacted or not: a subject is forgotten from
        # tasks whose policy let some of their PII through to the model too.
        index = index_values(self.keys, tenant, (text[f.start : f.end] for f in detected))
        return privacy_pb2.PrivacyServiceRedactResponse(
            text=redacted, entities=[to_entity(f) for f in findings], subject_index=index
        )

    async def Restore(
        self, request: privacy_pb2.PrivacyServiceRestoreRequest, context: Context
    ) -> privacy_pb2.PrivacyServiceRestoreResponse:
        tenant = check_tenant(request.tenant)
        text = check_text(request.text, allow_empty=True)
        conversation = check_conversation(request.conversation_id, required=False)
        restored, _ = self.restore_text(text, tenant, conversation)
        return privacy_pb2.PrivacyServiceRestoreResponse(text=restored)

    async def RestoreStream(
        self,
        request_iterator: AsyncIterator[privacy_pb2.PrivacyServiceRestoreStreamRequest],
        context: Context,
    ) -> AsyncIterator[privacy_pb2.PrivacyServiceRestoreStreamResponse]:
        """One answer per chunk (empty while a token is held back), then what was held."""
        stream: StreamRestorer | None = None
        async for request in request_iterator:
            if stream is None:
                tenant = check_tenant(request.tenant)
                conversation = check_conversation(request.conversation_id, required=False)
                # Read once: a stream restores from the vault as it was when it began.
                pseudonyms = self.vault.values(tenant, conversation) if conversation else {}
                stream = StreamRestorer(self._restorer(tenant, pseudonyms))
            text = stream.feed(check_text(request.text, allow_empty=True))
            yield privacy_pb2.PrivacyServiceRestoreStreamResponse(text=text)
        if stream is not None:
            rest = stream.close()
            if rest:
                yield privacy_pb2.PrivacyServiceRestoreStreamResponse(text=rest)

    def _restorer(self, tenant: str, pseudonyms: dict[str, str]) -> Callable[[str], str]:
        def restore_text(text: str) -> str:
            def open_sealed(kind: str, key_id: str, payload: str) -> str:
                return unseal(self.keys, tenant, kind, key_id, payload)

            return restore(text, pseudonyms, open_sealed)[0]

        return restore_text

    async def ForgetSubject(
        self, request: privacy_pb2.PrivacyServiceForgetSubjectRequest, context: Context
    ) -> privacy_pb2.PrivacyServiceForgetSubjectResponse:
        """Delete the tenant's conversations that held the subject; answer its blind index
        under every key, for the kernel to find the tasks. An unknown subject or tenant
        deletes nothing and is not an error (forgetting twice must succeed twice)."""
        tenant = check_tenant(request.tenant)
        subject = check_subject(request.subject)
        tokens = lookup_tokens(self.keys, tenant, subject)
        also = [check_conversation(c, required=True) for c in request.conversation_ids]
        deleted, conversations = self.vault.forget_subject(tenant, tokens, subject, also)
        log.info(
            "forgot a subject of tenant %s: %d vault entries in %d conversations deleted",
            tenant,
            deleted,
            len(conversations),
        )
        return privacy_pb2.PrivacyServiceForgetSubjectResponse(
            deleted=deleted, subject_index=tokens, conversation_ids=conversations
        )

    async def ForgetTenant(
        self, request: privacy_pb2.PrivacyServiceForgetTenantRequest, context: Context
    ) -> privacy_pb2.PrivacyServiceForgetTenantResponse:
        tenant = check_tenant(request.tenant)
        deleted = self.vault.forget_tenant(tenant)
        log.info("forgot tenant %s: %d vault entries deleted", tenant, deleted)
        return privacy_pb2.PrivacyServiceForgetTenantResponse(deleted=deleted)


class PrivacyService:
    """The privacy process for `serve()`: keys, vault and model made ready in `start`."""

    kind = common_pb2.SERVICE_KIND_PRIVACY

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._servicer: PrivacyServicer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._rewrap: asyncio.Task[None] | None = None
        self._proxy = _Deferred(self)

    def add_to_server(self, server: grpc.aio.Server) -> list[str]:
        return [_add_checked(self._proxy, server)]

    @property
    def servicer(self) -> PrivacyServicer:
        if self._servicer is None:
            raise FailedPrecondition("the privacy service is still starting", reason="NOT_READY")
        return self._servicer

    async def start(self) -> None:
        settings = self.settings
        keys = load_keys(settings.privacy_key, settings.privacy_key_file, settings.data_dir)
        vault = Vault(Path(settings.data_dir) / VAULT_FILE, keys)
        ner = await asyncio.to_thread(NerRecognizer)
        detector = Detector(ner)
        await asyncio.to_thread(detector.detect, "Warm up: Jane Doe lives in Boston.")
        self._servicer = PrivacyServicer(detector, keys, vault)
        if vault_scopes(settings) and settings.kernel_retention_sweep_s > 0:
            self._sweeper = asyncio.create_task(sweep_forever(vault, settings), name="retention")
        # After `llmos keys rotate` (seen through the key file), older entries move to the
        # new key in the background.
        if settings.key_rewrap_rate > 0:
            self._rewrap = asyncio.create_task(
                rewrap_forever(vault, settings.key_rewrap_rate), name="vault-rewrap"
            )
        log.info(
            "privacy ready: model %s, keys from %s (active %s), vault %s",
            ner.model,
            keys.source,
            keys.active,
            vault.path,
        )

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._rewrap is not None:
            self._rewrap.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rewrap
        if self._servicer is not None:
            self._servicer.close()
            self._servicer.vault.close()


@dataclasses.dataclass(frozen=True)
class Malformed:
    """A request the protobuf runtime could not parse (invalid UTF-8 in a string field, a
    truncated message): handed to the handler so it is refused with INVALID_ARGUMENT through
    the error table, instead of gRPC's bare UNKNOWN."""

    message_type: str
    why: str

    def refuse(self) -> InvalidArgument:
        return InvalidArgument(
            f"the {self.message_type} could not be parsed: {self.why} (string fields must be "
            "valid UTF-8)",
            reason="MALFORMED_REQUEST",
        )


def _parser(message_type: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as error:
            return Malformed(message_type.DESCRIPTOR.name, str(error))

    return parse


def _checked_unary(method: Callable[[Any, Context], Awaitable[Any]]) -> Callable[..., Any]:
    async def handle(request: Any, context: Context) -> Any:
        if isinstance(request, Malformed):
            raise request.refuse()
        return await method(request, context)

    return handle


def _checked_stream(method: Callable[[Any, Context], AsyncIterator[Any]]) -> Callable[..., Any]:
    async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Malformed):
                raise request.refuse()
            yield request

    def handle(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        return method(checked(requests), context)

    return handle


def _add_checked(servicer: privacy_pb2_grpc.PrivacyServiceServicer, server: grpc.aio.Server) -> str:
    """What `add_PrivacyServiceServicer_to_server` does, with parsers that hand a malformed
    request to the handler (`Malformed`) rather than failing before it."""
    service = privacy_pb2.DESCRIPTOR.services_by_name["PrivacyService"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        parse = _parser(getattr(privacy_pb2, method.input_type.name))
        serialize = getattr(privacy_pb2, method.output_type.name).SerializeToString
        implementation = getattr(servicer, method.name)
        if method.client_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _checked_stream(implementation),
                request_deserializer=parse,
                response_serializer=serialize,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _checked_unary(implementation),
                request_deserializer=parse,
                response_serializer=serialize,
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    return str(service.full_name)


class _Deferred(privacy_pb2_grpc.PrivacyServiceServicer):
    """Registered with the server before `start` builds the real servicer (serve() adds
    servicers first, then starts); each call goes to it once it exists."""

    def __init__(self, service: PrivacyService) -> None:
        self._service = service

    async def Detect(
        self, request: privacy_pb2.PrivacyServiceDetectRequest, context: Context
    ) -> privacy_pb2.PrivacyServiceDetectResponse:
        return await self._service.servicer.Detect(request, context)

    async def Redact(
        self, request: privacy_pb2.PrivacyServiceRedactRequest, context: Context
    ) -> privacy_pb2.PrivacyServiceRedactResponse:
        return await self._service.servicer.Redact(request, context)

    async def Restore(
        self, request: privacy_pb2.PrivacyServiceRestoreRequest, context: Context
    ) -> privacy_pb2.PrivacyServiceRestoreResponse:
        return await self._service.servicer.Restore(request, context)

    def RestoreStream(
        self,
        request_iterator: AsyncIterator[privacy_pb2.PrivacyServiceRestoreStreamRequest],
        context: Context,
    ) -> AsyncIterator[privacy_pb2.PrivacyServiceRestoreStreamResponse]:
        return self._service.servicer.RestoreStream(request_iterator, context)

    async def ForgetSubject(
        self, request: privacy_pb2.PrivacyServiceForgetSubjectRequest, context: Context
    ) -> privacy_pb2.PrivacyServiceForgetSubjectResponse:
        return await self._service.servicer.ForgetSubject(request, context)

    async def ForgetTenant(
        self, request: privacy_pb2.PrivacyServiceForgetTenantRequest, context: Context
    ) -> privacy_pb2.PrivacyServiceForgetTenantResponse:
        return await self._service.servicer.ForgetTenant(request, context)
