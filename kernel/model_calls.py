"""Score and Embed through the kernel: admitted like every call, then forwarded to a runtime.

Clients reach the model's log-probabilities and embeddings only through the kernel, so
these calls get the kernel's admission: the tenant from call metadata, the request's
priority class, the host-memory floor (kernel/memory.py), and a scheduler of their own
(kernel/scheduler.py, the same class the task runner uses: bounded queues per class that
refuse at once with RESOURCE_EXHAUSTED / QUEUE_FULL and a `retry_after_ms` hint, aging,
weighted fair share across tenants, deadlines dropped before dispatch) with at most
`kernel_model_call_concurrency` calls at the runtimes at once. They are short unary calls
that leave the runtime's continuous batch alone, so they do not take the task runner's
slots, and like ListModels they are not stored as tasks: the kernel records neither their
inputs nor their outputs.

No safety or privacy stage runs on them, by choice: they generate no text for safety to
judge, and redacting their inputs would change what is measured (a placeholder's
embedding or log-probability is not the text's); the caller gets back numbers about its
own input and nothing is kept. docs/architecture.md ("Score and Embed") says so too.

`forward_score` and `forward_embed` are the one forwarding path to a runtime: the kernel's
RPCs and the plugins' model gateway (kernel/plugins.py) both use them, so a runtime's
refusal (INVALID_ARGUMENT for an empty text, say) reaches every caller with its code,
reason and message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from llmos.kernel.memory import Headroom
from llmos.kernel.registry import Registry
from llmos.kernel.scheduler import Priority, Scheduler, SchedulerConfig, Ticket
from llmos.services.channels import outgoing_metadata
from llmos.services.errors import DeadlineExceeded, from_rpc_error
from llmos.v1 import common_pb2, kernel_pb2, runtime_pb2, runtime_pb2_grpc

log = logging.getLogger(__name__)

# The scheduler's service name for these calls.
MODEL_CALLS = "runtime:unary"


async def forward_score(
    registry: Registry,
    request: runtime_pb2.RuntimeServiceScoreRequest,
    timeout: float | None,
    caller: str,
) -> runtime_pb2.RuntimeServiceScoreResponse:
    """A serving runtime's Score; its error re-raised as ours, naming `caller` and the hop."""
    runtime = registry.pick(common_pb2.SERVICE_KIND_RUNTIME)
    stub = runtime_pb2_grpc.RuntimeServiceStub(runtime.channel)
    try:
        reply: runtime_pb2.RuntimeServiceScoreResponse = await stub.Score(
            request, timeout=timeout, metadata=outgoing_metadata()
        )
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(
            error, f"Score for {caller} on {runtime.info.name} at {runtime.info.address}"
        ) from error
    return reply


async def forward_embed(
    registry: Registry,
    request: runtime_pb2.RuntimeServiceEmbedRequest,
    timeout: float | None,
    caller: str,
) -> runtime_pb2.RuntimeServiceEmbedResponse:
    """A serving runtime's Embed; its error re-raised as ours, naming `caller` and the hop."""
    runtime = registry.pick(common_pb2.SERVICE_KIND_RUNTIME)
    stub = runtime_pb2_grpc.RuntimeServiceStub(runtime.channel)
    try:
        reply: runtime_pb2.RuntimeServiceEmbedResponse = await stub.Embed(
            request, timeout=timeout, metadata=outgoing_metadata()
        )
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(
            error, f"Embed for {caller} on {runtime.info.name} at {runtime.info.address}"
        ) from error
    return reply


def _timeout(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.001, deadline - time.monotonic())


class ModelCalls:
    """The kernel's Score and Embed: admission by their own scheduler, then a runtime."""

    def __init__(self, registry: Registry, headroom: Headroom, config: SchedulerConfig) -> None:
        self.registry = registry
        self.headroom = headroom
        self.scheduler = Scheduler(config)
        self._ready: dict[str, asyncio.Future[None]] = {}

    async def score(
        self, request: kernel_pb2.ScoreRequest, tenant: str, deadline: float | None
    ) -> kernel_pb2.ScoreResponse:
        async with self._admitted(tenant, Priority.from_proto(request.priority), deadline):
            reply = await forward_score(
                self.registry,
                runtime_pb2.RuntimeServiceScoreRequest(
                    model=request.model, context=request.context, continuation=request.continuation
                ),
                _timeout(deadline),
                f"tenant {tenant}",
            )
        return kernel_pb2.ScoreResponse(tokens=reply.tokens)

    async def embed(
        self, request: kernel_pb2.EmbedRequest, tenant: str, deadline: float | None
    ) -> kernel_pb2.EmbedResponse:
        async with self._admitted(tenant, Priority.from_proto(request.priority), deadline):
            reply = await forward_embed(
                self.registry,
                runtime_pb2.RuntimeServiceEmbedRequest(model=request.model, inputs=request.inputs),
                _timeout(deadline),
                f"tenant {tenant}",
            )
        return kernel_pb2.EmbedResponse(embeddings=reply.embeddings)

    @contextlib.asynccontextmanager
    async def _admitted(
        self, tenant: str, priority: Priority, deadline: float | None
    ) -> AsyncIterator[None]:
        """Hold one of the calls' slots: admitted (or refused at once), then queued until the
        scheduler dispatches it, or until its deadline passes (DEADLINE_EXCEEDED)."""
        self.headroom.check(priority)
        call_id = uuid.uuid4().hex
        now = time.monotonic()
        self.scheduler.admit(Ticket(call_id, tenant, priority, MODEL_CALLS, now, deadline), now)
        ready = self._ready[call_id] = asyncio.get_running_loop().create_future()
        try:
            self._dispatch()
            try:
                await asyncio.wait_for(ready, _timeout(deadline))
            except TimeoutError:
                raise DeadlineExceeded(
                    f"the call waited in the kernel's {priority.label} queue past its deadline",
                    reason="DEADLINE_EXCEEDED",
                ) from None
            yield
        finally:
            self._ready.pop(call_id, None)
            if not self.scheduler.release(call_id):
                self.scheduler.cancel(call_id)
            self._dispatch()

    def _dispatch(self) -> None:
        """Start every call the scheduler lets run now; fail those whose deadline passed."""
        while True:
            dispatch = self.scheduler.dispatch(time.monotonic())
            for expired in dispatch.expired:
                waiter = self._ready.get(expired.task_id)
                if waiter is not None and not waiter.done():
                    waiter.set_exception(TimeoutError())
            if dispatch.ticket is None:
                return
            waiter = self._ready.get(dispatch.ticket.task_id)
            if waiter is None or waiter.done():  # its caller left meanwhile
                self.scheduler.release(dispatch.ticket.task_id)
                continue
            waiter.set_result(None)
