"""The request pipeline's service stages, each a small object with one method.

DESIGN.md's request path is admit → plugins:before → safety:input → privacy:redact →
runtime:generate → safety:output → privacy:restore → plugins:after → record. The kernel
runs the admit, runtime and record steps itself (kernel/tasks.py); the stages here call
the safety and privacy services. Each returns the trace step it produced.

Failure policy, one rule for every stage: a stage whose service is down (no serving
instance, or UNAVAILABLE) fails closed — the task is refused with UNAVAILABLE — unless the
policy marks it fail-open, in which case the trace says "failed_open". A service that
answers UNIMPLEMENTED has not been built yet: the stage is "not_available", skipped, and
traced as such. The plugin stages join when the plugins work item lands.

Which stages run is the `kernel_stages` setting (all four by default), applied once at start
by `configure`: leaving stages out is for measuring the kernel without them
(bench/kernel.py), until per-tenant policy decides the stage list.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

import grpc

from llmos.kernel.registry import Registry
from llmos.services.channels import outgoing_metadata
from llmos.services.config import Settings
from llmos.services.errors import InvalidArgument, LlmosError, Unavailable
from llmos.services.timing import now_timestamp, since
from llmos.v1 import (
    common_pb2,
    privacy_pb2,
    privacy_pb2_grpc,
    safety_pb2,
    safety_pb2_grpc,
)

log = logging.getLogger(__name__)

STAGE_NAMES = ("safety:input", "privacy:redact", "safety:output", "privacy:restore")
_enabled: frozenset[str] = frozenset(STAGE_NAMES)


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What a stage may read: the task and the text on its side of the model."""

    task_id: str
    tenant: str
    text: str
    deadline_s: float | None


Call = Callable[[grpc.aio.Channel, StageContext, float | None], Awaitable[object]]


def _safety_check(direction: safety_pb2.Direction.ValueType) -> Call:
    async def call(channel: grpc.aio.Channel, ctx: StageContext, timeout: float | None) -> object:
        stub = safety_pb2_grpc.SafetyServiceStub(channel)
        request = safety_pb2.SafetyServiceCheckRequest(
            text=ctx.text, direction=direction, tenant=ctx.tenant
        )
        return await stub.Check(request, timeout=timeout, metadata=outgoing_metadata())

    return call


async def _privacy_redact(
    channel: grpc.aio.Channel, ctx: StageContext, timeout: float | None
) -> object:
    stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
    request = privacy_pb2.PrivacyServiceRedactRequest(
        text=ctx.text, tenant=ctx.tenant, conversation_id=ctx.task_id
    )
    return await stub.Redact(request, timeout=timeout, metadata=outgoing_metadata())


async def _privacy_restore(
    channel: grpc.aio.Channel, ctx: StageContext, timeout: float | None
) -> object:
    stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
    request = privacy_pb2.PrivacyServiceRestoreRequest(
        text=ctx.text, tenant=ctx.tenant, conversation_id=ctx.task_id
    )
    return await stub.Restore(request, timeout=timeout, metadata=outgoing_metadata())


@dataclasses.dataclass(frozen=True)
class ServiceStage:
    """One call to a service on the request path, with its failure policy."""

    name: str
    kind: common_pb2.ServiceKind.ValueType
    call: Call
    fail_open: bool = False
    timeout_s: float = 5.0

    async def run(self, registry: Registry, ctx: StageContext) -> common_pb2.TraceStep:
        """Run the stage; raise Unavailable when it must fail closed."""
        started, clock = now_timestamp(), time.monotonic()
        step = common_pb2.TraceStep(stage=self.name, started_at=started)
        try:
            entry = registry.pick(self.kind)
            step.service = entry.info.name
            timeout = self.timeout_s
            if ctx.deadline_s is not None:
                timeout = max(0.001, min(timeout, ctx.deadline_s - time.monotonic()))
            await self.call(entry.channel, ctx, timeout)
            step.decision, step.reason = "allow", "checked"
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                step.decision = "not_available"
                step.reason = "the service does not implement this stage yet; skipped"
            elif error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                self._fail(step, f"{error.code().name}: {error.details()}")
            else:
                raise LlmosError(
                    f"{self.name}: {error.details()}", reason="STAGE_FAILED"
                ) from error
        except Unavailable as error:
            self._fail(step, error.message)
        step.duration.CopyFrom(since(clock))
        return step

    def _fail(self, step: common_pb2.TraceStep, why: str) -> None:
        if not self.fail_open:
            raise Unavailable(
                f"{self.name} is required and its service is down ({why}); the request is "
                "refused (fail closed)",
                reason="STAGE_UNAVAILABLE",
                metadata={"stage": self.name},
            )
        step.decision, step.reason = "failed_open", f"service down, policy allows: {why}"


def configure(settings: Settings) -> None:
    """Apply `kernel_stages` for this process; an unknown name stops the kernel at start,
    since a misspelt stage would otherwise be silently skipped."""
    global _enabled  # noqa: PLW0603 -- one kernel per process; set once, before serving
    unknown = sorted(set(settings.kernel_stages) - set(STAGE_NAMES))
    if unknown:
        raise InvalidArgument(
            f"kernel_stages names unknown stages {unknown}; known: {', '.join(STAGE_NAMES)}",
            reason="BAD_SETTING",
        )
    _enabled = frozenset(settings.kernel_stages)
    skipped = [name for name in STAGE_NAMES if name not in _enabled]
    if skipped:
        log.warning(
            "pipeline stages turned off by the kernel_stages setting: %s; every request "
            "skips them (meant for measurements)",
            ", ".join(skipped),
        )


def enabled_stages() -> tuple[str, ...]:
    """The stages requests run through, in pipeline order."""
    return tuple(name for name in STAGE_NAMES if name in _enabled)


def before_model() -> tuple[ServiceStage, ...]:
    stages = (
        ServiceStage(
            "safety:input",
            common_pb2.SERVICE_KIND_SAFETY,
            _safety_check(safety_pb2.DIRECTION_INPUT),
        ),
        ServiceStage("privacy:redact", common_pb2.SERVICE_KIND_PRIVACY, _privacy_redact),
    )
    return tuple(stage for stage in stages if stage.name in _enabled)


def after_model() -> tuple[ServiceStage, ...]:
    stages = (
        ServiceStage(
            "safety:output",
            common_pb2.SERVICE_KIND_SAFETY,
            _safety_check(safety_pb2.DIRECTION_OUTPUT),
        ),
        ServiceStage("privacy:restore", common_pb2.SERVICE_KIND_PRIVACY, _privacy_restore),
    )
    return tuple(stage for stage in stages if stage.name in _enabled)
