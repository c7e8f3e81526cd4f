"""The request pipeline's service stages, each a small object with one method.

DESIGN.md's request path is admit → plugins:before → safety:input → privacy:redact →
runtime:generate → safety:output → privacy:restore → plugins:after → record. The kernel
runs the admit, runtime and record steps itself (kernel/tasks.py); the stages here are the
others, built for a tenant's policy (kernel/policy.py) by `for_policy`. Each `run` returns
the trace step it produced, with the policy named in its evidence.

Failure policy, one rule for every stage: a stage whose service is down (no serving
instance, or UNAVAILABLE / DEADLINE_EXCEEDED) fails closed — the task is refused with
UNAVAILABLE — unless the policy marks it fail-open, in which case the trace says
"failed_open". A service that answers UNIMPLEMENTED has not been built yet: the stage is
"not_available", skipped, and traced as such.

The plugin stages (`PluginStage`) call the enabled plugins' hosts through the kernel's
plugin supervisor (kernel/plugins.py), one trace step per plugin called; they may change
the request (a plugin's new prompt) or refuse it (a plugin's block verdict), so every
stage returns a `StageResult`: its steps, the request as it leaves the stage, and the error
that refuses the task, if any (raised after the steps are traced).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import grpc

from llmos.kernel.policy import DEFAULT_TIMEOUT_S, TenantPolicy
from llmos.kernel.registry import Registry
from llmos.services.channels import outgoing_metadata
from llmos.services.errors import LlmosError, Unavailable
from llmos.services.timing import duration, now_timestamp, since
from llmos.v1 import (
    common_pb2,
    kernel_pb2,
    privacy_pb2,
    privacy_pb2_grpc,
    safety_pb2,
    safety_pb2_grpc,
)


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What a stage may read: the task and the text on its side of the model."""

    task_id: str
    tenant: str
    text: str
    deadline_s: float | None
    # The request as the stages before left it (the plugin stages read and change it).
    request: kernel_pb2.GenerateRequest | None = None
    # The model's whole output, for the stages after the model.
    output: str | None = None
    plugins: Plugins | None = None


@dataclasses.dataclass(frozen=True)
class StageResult:
    """What a stage did: its trace steps, the request it passes on (None: unchanged) and
    the error that refuses the task (raised once the steps are in the trace)."""

    steps: tuple[common_pb2.TraceStep, ...]
    request: kernel_pb2.GenerateRequest | None = None
    error: LlmosError | None = None


class Stage(Protocol):
    """A step of the request path the policy chooses: run it, get what it did."""

    @property
    def name(self) -> str: ...

    async def run(self, registry: Registry, ctx: StageContext) -> StageResult: ...


class Plugins(Protocol):
    """The kernel's plugin supervisor, as the plugin stages use it (kernel/plugins.py)."""

    async def run_stage(self, stage: PluginStage, ctx: StageContext) -> StageResult: ...


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
    # The policy that put it on the path, named in every step's evidence.
    policy: str
    fail_open: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S

    async def run(self, registry: Registry, ctx: StageContext) -> StageResult:
        """Run the stage; raise Unavailable when it must fail closed."""
        return StageResult((await self._step(registry, ctx),))

    async def _step(self, registry: Registry, ctx: StageContext) -> common_pb2.TraceStep:
        started, clock = now_timestamp(), time.monotonic()
        step = common_pb2.TraceStep(stage=self.name, started_at=started)
        step.evidence["policy"] = self.policy
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
                f"refused (fail closed, policy {self.policy})",
                reason="STAGE_UNAVAILABLE",
                metadata={"stage": self.name, "policy": self.policy},
            )
        step.decision = "failed_open"
        step.reason = f"service down; policy {self.policy} lets this stage fail open: {why}"


@dataclasses.dataclass(frozen=True)
class PluginStage:
    """plugins:before or plugins:after: every enabled plugin implementing `hook`, called
    through its host with its manifest's timeout. A plugin that fails (crash, hang, a bad
    answer) refuses the task unless the policy makes the stage fail open."""

    name: str
    hook: str
    policy: str
    fail_open: bool = False

    async def run(self, registry: Registry, ctx: StageContext) -> StageResult:
        if ctx.plugins is None:  # a runner built without plugins (unit tests)
            return StageResult(
                (
                    common_pb2.TraceStep(
                        stage=self.name,
                        started_at=now_timestamp(),
                        duration=duration(0.0),
                        decision="skipped",
                        reason="this kernel runs no plugin supervisor",
                        evidence={"policy": self.policy},
                    ),
                )
            )
        return await ctx.plugins.run_stage(self, ctx)


PLUGIN_HOOKS = {"plugins:before": "llmos_before_request", "plugins:after": "llmos_after_request"}


_SERVICES: dict[str, tuple[common_pb2.ServiceKind.ValueType, Call]] = {
    "safety:input": (common_pb2.SERVICE_KIND_SAFETY, _safety_check(safety_pb2.DIRECTION_INPUT)),
    "privacy:redact": (common_pb2.SERVICE_KIND_PRIVACY, _privacy_redact),
    "safety:output": (common_pb2.SERVICE_KIND_SAFETY, _safety_check(safety_pb2.DIRECTION_OUTPUT)),
    "privacy:restore": (common_pb2.SERVICE_KIND_PRIVACY, _privacy_restore),
}


def _stage(name: str, policy: TenantPolicy) -> Stage:
    if name in PLUGIN_HOOKS:
        return PluginStage(
            name, PLUGIN_HOOKS[name], policy=policy.name, fail_open=name in policy.fail_open
        )
    kind, call = _SERVICES[name]
    return ServiceStage(
        name,
        kind,
        call,
        policy=policy.name,
        fail_open=name in policy.fail_open,
        timeout_s=policy.timeout_s,
    )


def services_required(
    policies: Iterable[TenantPolicy],
) -> frozenset[common_pb2.ServiceKind.ValueType]:
    """The service kinds some policy runs a fail-closed stage on: without them serving, a
    task of that policy would be refused, so recovered tasks wait for them."""
    return frozenset(
        _SERVICES[name][0]
        for policy in policies
        for name in policy.stages
        if name in _SERVICES and name not in policy.fail_open
    )


@functools.cache
def for_policy(policy: TenantPolicy) -> tuple[tuple[Stage, ...], tuple[Stage, ...]]:
    """The stages before and after the model for `policy`, built once per policy (the
    policies are fixed at start, so the cache holds a handful)."""
    return (
        tuple(_stage(name, policy) for name in policy.before_model),
        tuple(_stage(name, policy) for name in policy.after_model),
    )
