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

The service stages use their services' answers: `safety:input` puts the verdict and its
evidence in the trace and, when the verdict blocks, returns the refusal text
(kernel/safety.py) — the task then ends SUCCEEDED with FINISH_REASON_SAFETY and the runtime
is never called; `privacy:redact` returns the redacted request (kernel/privacy.py), which
is what the runtime gets, with entity types and counts (never values) in the trace. The
stages on the other side of the model, `safety:output` and `privacy:restore`, work on the
runtime's stream as it flows, so they are not stages here: kernel/output.py runs them
with the same failure policy, and `for_policy` returns only `plugins:after` after the model.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Protocol

import grpc

from llmos.kernel import privacy, safety
from llmos.kernel.policy import DEFAULT_TIMEOUT_S, TenantPolicy
from llmos.kernel.registry import Registry
from llmos.services.errors import LlmosError, Unavailable
from llmos.services.timing import duration, now_timestamp, since
from llmos.v1 import common_pb2, kernel_pb2


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
    # The output is held from the client until plugins:after has run (a plugin with
    # modify_output is enabled), so a plugin's change to it can be applied.
    output_held: bool = False


@dataclasses.dataclass(frozen=True)
class StageResult:
    """What a stage did: its trace steps, the request it passes on (None: unchanged) and
    the error that refuses the task (raised once the steps are in the trace)."""

    steps: tuple[common_pb2.TraceStep, ...]
    request: kernel_pb2.GenerateRequest | None = None
    error: LlmosError | None = None
    # The refusal the client reads instead of the model's output (safety:input blocked):
    # not an error, the task succeeds with FINISH_REASON_SAFETY.
    refusal: str | None = None
    # The request carries pseudonyms: the output must be restored for the client.
    restore: bool = False
    # The blind index of the prompt's data subjects, for the task store (privacy:redact).
    subjects: tuple[bytes, ...] = ()
    # plugins:after changed the (held) output: the client gets this instead.
    output: str | None = None


class Stage(Protocol):
    """A step of the request path the policy chooses: run it, get what it did."""

    @property
    def name(self) -> str: ...

    async def run(self, registry: Registry, ctx: StageContext) -> StageResult: ...


class Plugins(Protocol):
    """The kernel's plugin supervisor, as the plugin stages use it (kernel/plugins.py)."""

    async def run_stage(self, stage: PluginStage, ctx: StageContext) -> StageResult: ...

    def holds_output(self) -> bool: ...

    def task_event(
        self,
        task_id: str,
        tenant: str,
        state: str,
        reason: str,
        note: Callable[[common_pb2.TraceStep], Awaitable[None]] | None = None,
    ) -> None: ...


@dataclasses.dataclass(frozen=True)
class Answer:
    """What a stage's service said, as its trace step and its `StageResult` record it."""

    decision: str = "allow"
    reason: str = "checked"
    evidence: Mapping[str, str] = dataclasses.field(default_factory=dict)
    request: kernel_pb2.GenerateRequest | None = None
    refusal: str | None = None
    restore: bool = False
    subjects: tuple[bytes, ...] = ()


Call = Callable[[grpc.aio.Channel, StageContext, float | None], Awaitable[Answer]]


async def _safety_input(
    channel: grpc.aio.Channel, ctx: StageContext, timeout: float | None
) -> Answer:
    """Check the prompt; a blocking verdict refuses the request with its category."""
    if not ctx.text.strip():  # the service refuses empty text; there is nothing to judge
        return Answer(reason="nothing to check: the prompt is empty")
    verdict = await safety.check_input(channel, ctx.text, ctx.tenant, timeout)
    step = safety.verdict_step("safety:input", "", verdict, "")
    return Answer(
        step.decision,
        step.reason,
        {key: value for key, value in step.evidence.items() if key != "policy"},
        refusal=None if verdict.allowed else safety.refusal(verdict),
    )


def _privacy_redact(mode: str, entities: tuple[str, ...]) -> Call:
    """Redact the request's `entities` with `mode`'s operator; the runtime gets what comes
    back."""

    async def call(channel: grpc.aio.Channel, ctx: StageContext, timeout: float | None) -> Answer:
        request = (
            kernel_pb2.GenerateRequest(prompt=ctx.text) if ctx.request is None else ctx.request
        )
        redaction = await privacy.redact_request(
            channel, request, tenant=ctx.tenant, conversation=ctx.task_id, mode=mode,
            entities=entities, timeout=timeout,
        )  # fmt: skip
        found = sum(redaction.counts.values())
        return Answer(
            "redacted" if found else "allow",
            f"{found} entities replaced before the model ({mode})" if found else "no PII found",
            redaction.evidence(),
            request=redaction.request if found else None,
            restore=redaction.restorable,
            subjects=redaction.subjects,
        )

    return call


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
        started, clock = now_timestamp(), time.monotonic()
        step = common_pb2.TraceStep(stage=self.name, started_at=started)
        step.evidence["policy"] = self.policy
        answer = Answer()
        try:
            entry = registry.pick(self.kind)
            step.service = entry.info.name
            timeout = self.timeout_s
            if ctx.deadline_s is not None:
                timeout = max(0.001, min(timeout, ctx.deadline_s - time.monotonic()))
            answer = await self.call(entry.channel, ctx, timeout)
            step.decision, step.reason = answer.decision, answer.reason
            step.evidence.update(answer.evidence)
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
        return StageResult(
            (step,),
            request=answer.request,
            refusal=answer.refusal,
            restore=answer.restore,
            subjects=answer.subjects,
        )

    def _fail(self, step: common_pb2.TraceStep, why: str) -> None:
        fail(self.name, self.policy, self.fail_open, step, why)


def fail(name: str, policy: str, fail_open: bool, step: common_pb2.TraceStep, why: str) -> None:
    """A stage's service is down: raise Unavailable (fail closed), or mark `step`
    "failed_open" when the policy lets the request through without it."""
    if not fail_open:
        raise Unavailable(
            f"{name} is required and its service is down ({why}); the request is "
            f"refused (fail closed, policy {policy})",
            reason="STAGE_UNAVAILABLE",
            metadata={"stage": name, "policy": policy},
        )
    step.decision = "failed_open"
    step.reason = f"service down; policy {policy} lets this stage fail open: {why}"


def skipped_step(name: str, policy: str, why: str) -> common_pb2.TraceStep:
    """The step of a stage the policy runs but which has nothing to do (privacy off)."""
    return common_pb2.TraceStep(
        stage=name,
        started_at=now_timestamp(),
        duration=duration(0.0),
        decision="skipped",
        reason=why,
        evidence={"policy": policy},
    )


@dataclasses.dataclass(frozen=True)
class SkippedStage:
    """A stage the policy runs whose work its settings turn off (`privacy = "off"`)."""

    name: str
    policy: str
    why: str

    async def run(self, registry: Registry, ctx: StageContext) -> StageResult:
        return StageResult((skipped_step(self.name, self.policy, self.why),))


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
                (skipped_step(self.name, self.policy, "this kernel runs no plugin supervisor"),)
            )
        return await ctx.plugins.run_stage(self, ctx)


PLUGIN_HOOKS = {"plugins:before": "llmos_before_request", "plugins:after": "llmos_after_request"}


# The service each service stage calls; the two after the model run on the stream
# (kernel/output.py), so only the two before it have a call here.
KINDS: dict[str, common_pb2.ServiceKind.ValueType] = {
    "safety:input": common_pb2.SERVICE_KIND_SAFETY,
    "privacy:redact": common_pb2.SERVICE_KIND_PRIVACY,
    "safety:output": common_pb2.SERVICE_KIND_SAFETY,
    "privacy:restore": common_pb2.SERVICE_KIND_PRIVACY,
}
ON_STREAM = ("safety:output", "privacy:restore")
PRIVACY_OFF = 'privacy is off in this policy (privacy = "off"): the model sees the text as sent'


def _stage(name: str, policy: TenantPolicy) -> Stage:
    if name in PLUGIN_HOOKS:
        return PluginStage(
            name, PLUGIN_HOOKS[name], policy=policy.name, fail_open=name in policy.fail_open
        )
    if name == "privacy:redact" and policy.privacy == "off":
        return SkippedStage(name, policy.name, PRIVACY_OFF)
    call = (
        _safety_input
        if name == "safety:input"
        else _privacy_redact(policy.privacy, policy.privacy_entities)
    )
    return ServiceStage(
        name,
        KINDS[name],
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
        KINDS[name]
        for policy in policies
        for name in policy.stages
        if name in KINDS
        and name not in policy.fail_open
        and not (name.startswith("privacy:") and policy.privacy == "off")
    )


@functools.cache
def for_policy(policy: TenantPolicy) -> tuple[tuple[Stage, ...], tuple[Stage, ...]]:
    """The stages before and after the model for `policy`, built once per policy (the
    policies are fixed at start, so the cache holds a handful). The stream's stages
    (`ON_STREAM`) are left out: kernel/output.py runs them on the runtime's stream."""
    return (
        tuple(_stage(name, policy) for name in policy.before_model),
        tuple(_stage(name, policy) for name in policy.after_model if name not in ON_STREAM),
    )
