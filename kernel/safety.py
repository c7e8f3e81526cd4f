"""The kernel's side of the safety stages: the verdict as a trace step, the refusal the
client reads, and the guard that checks a runtime stream as it flows.

`check_input` sends the prompt to SafetyService.Check before the runtime sees it.
`OutputGuard` keeps one CheckStream call open for a task's output: each runtime piece goes
in, and a piece is released to the client only once the service has checked the text up
to its end (`checked_chars`), so no unchecked text reaches the client; when a verdict
blocks, the guard reports it and the caller cancels the runtime and ends the stream with
finish reason SAFETY and `refusal(verdict)`. A refusal is not an error: the task succeeds
with FINISH_REASON_SAFETY, and its trace holds the verdict (`verdict_step`).

Not yet wired into the task runner (kernel/tasks.py), which another work item is
restructuring: see docs/safety.md, "What is not built".
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Generic, TypeVar

import grpc
from google.protobuf import json_format

from llmos.kernel.registry import Registry
from llmos.services.channels import outgoing_metadata
from llmos.services.errors import from_rpc_error
from llmos.services.safety.policy import ACTION_NAMES
from llmos.services.safety.taxonomy import label
from llmos.v1 import common_pb2, kernel_pb2, safety_pb2, safety_pb2_grpc

Piece = TypeVar("Piece")


def top_category(verdict: safety_pb2.SafetyVerdict) -> str:
    return verdict.categories[0].category if verdict.categories else ""


def refusal(verdict: safety_pb2.SafetyVerdict) -> str:
    """The short text a refused client reads, naming the category."""
    category = top_category(verdict)
    return f"[refused by the safety policy: {label(category) if category else 'unsafe'}]"


def verdict_step(
    stage: str, service: str, verdict: safety_pb2.SafetyVerdict, policy: str
) -> common_pb2.TraceStep:
    """A trace step holding the verdict and its evidence (JSON, as the API returns it)."""
    action = ACTION_NAMES.get(verdict.action, "allow")
    step = common_pb2.TraceStep(
        stage=stage,
        service=service,
        decision=action,
        reason=(
            f"{label(top_category(verdict))} scored "
            f"{verdict.categories[0].score:.2f}; action {action}"
            if verdict.categories
            else "no category scored"
        ),
    )
    step.evidence["policy"] = policy
    step.evidence["safety_policy_version"] = verdict.policy_version
    step.evidence["categories"] = ",".join(
        f"{c.category}:{c.score:.3f}" for c in verdict.categories
    )
    step.evidence["verdict"] = json.dumps(
        json_format.MessageToDict(verdict, preserving_proto_field_name=True), sort_keys=True
    )
    return step


async def check_input(
    channel: grpc.aio.Channel, text: str, tenant: str, timeout: float | None
) -> safety_pb2.SafetyVerdict:
    stub = safety_pb2_grpc.SafetyServiceStub(channel)
    reply = await stub.Check(
        safety_pb2.SafetyServiceCheckRequest(
            text=text, direction=safety_pb2.DIRECTION_INPUT, tenant=tenant
        ),
        timeout=timeout,
        metadata=outgoing_metadata(),
    )
    return reply.verdict


@dataclasses.dataclass
class Held(Generic[Piece]):
    piece: Piece
    end: int  # the stream offset its text ends at


class OutputGuard(Generic[Piece]):
    """One CheckStream call for a task's output; pieces are held until checked."""

    def __init__(self, channel: grpc.aio.Channel, tenant: str, timeout: float | None) -> None:
        stub = safety_pb2_grpc.SafetyServiceStub(channel)
        self._call = stub.CheckStream(timeout=timeout, metadata=outgoing_metadata())
        self._tenant = tenant
        self._first = True
        self._chars = 0
        self._held: collections.deque[Held[Piece]] = collections.deque()
        self.verdict = safety_pb2.SafetyVerdict(allowed=True, action=safety_pb2.SAFETY_ACTION_ALLOW)

    @property
    def blocked(self) -> bool:
        return not self.verdict.allowed

    async def feed(self, text: str, piece: Piece) -> list[Piece]:
        """Send a piece's text; return the pieces now checked, in order (none once blocked)."""
        self._chars += len(text)
        self._held.append(Held(piece, self._chars))
        request = safety_pb2.SafetyServiceCheckStreamRequest(text=text)
        if self._first:
            request.tenant, self._first = self._tenant, False
        try:
            await self._call.write(request)
            reply = await self._call.read()
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, "safety CheckStream") from error
        return self._take(reply)

    async def close(self) -> list[Piece]:
        """The runtime's stream ended: check the rest; return what may be released."""
        if self._first:  # nothing was generated
            self._call.cancel()
            return [held.piece for held in self._held]
        try:
            await self._call.done_writing()
            released: list[Piece] = []
            while (reply := await self._call.read()) is not grpc.aio.EOF:
                released += self._take(reply)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, "safety CheckStream") from error
        return released

    def cancel(self) -> None:
        self._call.cancel()

    def _take(self, reply: object) -> list[Piece]:
        assert isinstance(reply, safety_pb2.SafetyServiceCheckStreamResponse)
        self.verdict = reply.verdict
        if self.blocked:
            self._held.clear()
            return []
        released = []
        while self._held and self._held[0].end <= reply.checked_chars:
            released.append(self._held.popleft().piece)
        return released


async def relay_policy(
    registry: Registry,
    request: kernel_pb2.GetSafetyPolicyRequest | kernel_pb2.SetSafetyPolicyRequest,
    timeout: float | None,
) -> safety_pb2.SafetyPolicy:
    """KernelService.GetSafetyPolicy / SetSafetyPolicy: the call passed on to a serving
    safety service, so the admin API is the kernel's like the rest of the clients' API.
    The service's refusals (unknown tenant or category, a stale version) come back with
    their status and reason; no safety service serving is UNAVAILABLE."""
    safety = registry.pick(common_pb2.SERVICE_KIND_SAFETY)
    stub = safety_pb2_grpc.SafetyServiceStub(safety.channel)
    try:
        if isinstance(request, kernel_pb2.SetSafetyPolicyRequest):
            set_reply = await stub.SetPolicy(
                safety_pb2.SafetyServiceSetPolicyRequest(policy=request.policy),
                timeout=timeout,
                metadata=outgoing_metadata(),
            )
            return set_reply.policy
        get_reply = await stub.GetPolicy(
            safety_pb2.SafetyServiceGetPolicyRequest(tenant=request.tenant),
            timeout=timeout,
            metadata=outgoing_metadata(),
        )
        return get_reply.policy
    except grpc.aio.AioRpcError as error:
        verb = (
            "SetPolicy" if isinstance(request, kernel_pb2.SetSafetyPolicyRequest) else "GetPolicy"
        )
        where = f"{verb} on {safety.info.name} at {safety.info.address}"
        raise from_rpc_error(error, where) from error
