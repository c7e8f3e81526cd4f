"""The kernel's side of the privacy stages: redact a request before the runtime sees it, and
restore the runtime's stream before the client does.

`redact_request` sends the prompt, or each message's content, to PrivacyService.Redact with
the task id as the conversation, so one task's placeholders are consistent across its
messages and the restore finds them. It returns the request the runtime should get and the
evidence for the trace: the operator and the count of each entity type, never a value,
and the blind index of the prompt's data subjects for the task store.

`OutputRestorer` keeps one PrivacyService.RestoreStream call open for a task's output: each
piece the runtime streams goes in, and what comes back is what the client may see; a
placeholder split across pieces (`<PER` + `SON_1>`) is held back by the service until it is
whole. `close` releases what is held when the runtime's stream ends.

A tenant's policy (kernel/policy.py) picks the entity types redacted (by default every
type but LOCATION) and, by its privacy mode, the operator: "pseudonymize" (reversible,
restored for the client), "mask" (irreversible: nothing to restore), or "off" (neither
stage runs).
"""

from __future__ import annotations

import collections
import dataclasses

import grpc

from llmos.services.channels import outgoing_metadata
from llmos.services.errors import from_rpc_error
from llmos.v1 import kernel_pb2, privacy_pb2, privacy_pb2_grpc

MODES = {
    "pseudonymize": privacy_pb2.REDACTION_OPERATOR_PSEUDONYMIZE,
    "mask": privacy_pb2.REDACTION_OPERATOR_MASK,
}


@dataclasses.dataclass(frozen=True)
class Redaction:
    """A request as the runtime gets it, and what was taken out of it (types and counts)."""

    request: kernel_pb2.GenerateRequest
    counts: dict[str, int]
    mode: str
    # The blind index of the prompt's data subjects (keyed HMACs from the service, never
    # values), stored with the task so ForgetSubject finds it (kernel/forget.py).
    subjects: tuple[bytes, ...] = ()

    @property
    def restorable(self) -> bool:
        """Whether the output can hold placeholders to put back."""
        return self.mode == "pseudonymize" and bool(self.counts)

    def evidence(self) -> dict[str, str]:
        """For the trace step: entity types and counts, never the values."""
        return {
            "operator": self.mode,
            "entities": ",".join(f"{kind}:{n}" for kind, n in sorted(self.counts.items())),
            "entity_count": str(sum(self.counts.values())),
        }


async def redact_request(
    channel: grpc.aio.Channel,
    request: kernel_pb2.GenerateRequest,
    *,
    tenant: str,
    conversation: str,
    mode: str,
    entities: tuple[str, ...] = (),
    timeout: float | None,
) -> Redaction:
    """Redact the prompt or every message's content (empty ones are left as they are);
    only the `entities` types (all the service detects when empty). The counts are of
    what was redacted: the service returns only the findings it replaced."""
    stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
    redacted = kernel_pb2.GenerateRequest()
    redacted.CopyFrom(request)
    counts: collections.Counter[str] = collections.Counter()
    subjects: dict[bytes, None] = {}

    async def redact(text: str) -> str:
        if not text:
            return text
        reply = await stub.Redact(
            privacy_pb2.PrivacyServiceRedactRequest(
                text=text,
                tenant=tenant,
                conversation_id=conversation,
                operator=MODES[mode],
                entity_types=entities,
            ),
            timeout=timeout,
            metadata=outgoing_metadata(x_llmos_task_id=conversation),
        )
        counts.update(entity.type for entity in reply.entities)
        subjects.update(dict.fromkeys(reply.subject_index))
        return reply.text

    if redacted.prompt:
        redacted.prompt = await redact(redacted.prompt)
    for message in redacted.messages:  # in order: placeholders number as the user wrote
        message.content = await redact(message.content)
    return Redaction(redacted, dict(counts), mode, tuple(subjects))


class OutputRestorer:
    """One RestoreStream call for one task's output."""

    def __init__(self, channel: grpc.aio.Channel, *, tenant: str, conversation: str) -> None:
        stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
        self._call = stub.RestoreStream(metadata=outgoing_metadata(x_llmos_task_id=conversation))
        self._first: privacy_pb2.PrivacyServiceRestoreStreamRequest | None = (
            privacy_pb2.PrivacyServiceRestoreStreamRequest(
                tenant=tenant, conversation_id=conversation
            )
        )
        self.pieces = 0

    async def feed(self, text: str) -> str:
        """What the client may see of the output so far, after `text` (maybe empty)."""
        request = self._first or privacy_pb2.PrivacyServiceRestoreStreamRequest()
        self._first = None
        request.text = text
        try:
            await self._call.write(request)
            reply = await self._call.read()
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, "privacy RestoreStream") from error
        self.pieces += 1
        if not isinstance(reply, privacy_pb2.PrivacyServiceRestoreStreamResponse):
            return ""  # EOF: the service ended the stream
        return reply.text

    async def close(self) -> str:
        """The stream ended: what was held back, restored."""
        try:
            if self._first is not None:  # nothing was fed: nothing to restore
                self._call.cancel()
                return ""
            await self._call.done_writing()
            rest = []
            while (reply := await self._call.read()) is not grpc.aio.EOF:
                if isinstance(reply, privacy_pb2.PrivacyServiceRestoreStreamResponse):
                    rest.append(reply.text)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, "privacy RestoreStream") from error
        return "".join(rest)

    def cancel(self) -> None:
        self._call.cancel()
