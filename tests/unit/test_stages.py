"""The pipeline's stages as a policy builds them: which run, and what each traces when its
service answers, is not built yet, or is down (fail closed, or fail open by policy)."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
import pytest

from llmos.kernel.policy import TenantPolicy
from llmos.kernel.registry import Registry
from llmos.kernel.stages import (
    Answer,
    PluginStage,
    ServiceStage,
    SkippedStage,
    StageContext,
    for_policy,
    services_required,
)
from llmos.services.errors import Unavailable
from llmos.v1 import common_pb2, kernel_pb2

CONTEXT = StageContext(task_id="t1", tenant="acme", text="hello", deadline_s=None)


@dataclasses.dataclass
class Instance:
    """What Registry.pick returns, as far as a stage reads it."""

    info: kernel_pb2.ServiceInfo
    channel: Any = None


class OneInstance:
    """A registry with one serving instance of every kind."""

    def pick(self, kind: common_pb2.ServiceKind.ValueType) -> Instance:
        return Instance(kernel_pb2.ServiceInfo(name="safety-1"))


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=f"{code.name} said the service"
    )


def stage(
    *, fail_open: bool = False, error: grpc.StatusCode | None = None, answer: Answer | None = None
) -> ServiceStage:
    async def call(channel: object, ctx: StageContext, timeout: float | None) -> Answer:
        if error is not None:
            raise rpc_error(error)
        return answer or Answer()

    return ServiceStage(
        "safety:input", common_pb2.SERVICE_KIND_SAFETY, call, policy="tenant:acme",
        fail_open=fail_open,
    )  # fmt: skip


def test_the_policy_chooses_the_stages_in_pipeline_order() -> None:
    before, after = for_policy(TenantPolicy("default"))
    assert [s.name for s in before] == ["plugins:before", "safety:input", "privacy:redact"]
    # safety:output and privacy:restore run on the runtime's stream (kernel/output.py)
    assert [s.name for s in after] == ["plugins:after"]
    assert isinstance(before[0], PluginStage) and isinstance(after[-1], PluginStage)
    assert (before[0].hook, after[-1].hook) == ("llmos_before_request", "llmos_after_request")

    lean = TenantPolicy(
        "tenant:lean",
        stages=("safety:input", "safety:output"),
        fail_open=frozenset({"safety:output"}),
        timeout_s=0.5,
    )
    before, after = for_policy(lean)
    assert [s.name for s in before] == ["safety:input"]
    assert after == ()
    assert isinstance(before[0], ServiceStage)
    assert before[0].fail_open is False
    assert before[0].timeout_s == 0.5
    assert before[0].policy == "tenant:lean"

    assert for_policy(TenantPolicy("off", stages=())) == ((), ())
    assert for_policy(lean) is for_policy(lean), "built once per policy"


async def test_a_plugin_stage_without_a_plugin_supervisor_is_skipped() -> None:
    stage = PluginStage("plugins:before", "llmos_before_request", "default")
    result = await stage.run(Registry(15, 1 << 20), CONTEXT)

    (step,) = result.steps
    assert (step.stage, step.decision, step.service) == ("plugins:before", "skipped", "")
    assert (result.request, result.error) == (None, None)
    assert step.HasField("duration")
    assert dict(step.evidence) == {"policy": "default"}
    assert "plugin" in step.reason


async def test_a_service_that_answers_is_allowed_and_the_policy_named() -> None:
    (step,) = (await stage().run(OneInstance(), CONTEXT)).steps  # type: ignore[arg-type]

    assert (step.decision, step.service) == ("allow", "safety-1")
    assert step.evidence["policy"] == "tenant:acme"


async def test_unimplemented_is_not_available_whatever_the_policy() -> None:
    for fail_open in (False, True):
        (step,) = (
            await stage(fail_open=fail_open, error=grpc.StatusCode.UNIMPLEMENTED).run(
                OneInstance(),  # type: ignore[arg-type]
                CONTEXT,
            )
        ).steps
        assert step.decision == "not_available"
        assert step.evidence["policy"] == "tenant:acme"


@pytest.mark.parametrize("error", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
async def test_a_down_service_fails_closed_unless_the_policy_says_open(
    error: grpc.StatusCode,
) -> None:
    with pytest.raises(Unavailable) as refused:
        await stage(error=error).run(OneInstance(), CONTEXT)  # type: ignore[arg-type]
    assert refused.value.reason == "STAGE_UNAVAILABLE"
    assert refused.value.metadata == {"stage": "safety:input", "policy": "tenant:acme"}
    assert "fail closed, policy tenant:acme" in refused.value.message

    result = await stage(fail_open=True, error=error).run(OneInstance(), CONTEXT)  # type: ignore[arg-type]
    (step,) = result.steps
    assert step.decision == "failed_open"
    assert step.evidence["policy"] == "tenant:acme"
    assert "policy tenant:acme" in step.reason and error.name in step.reason


async def test_no_registered_service_is_down_too() -> None:
    empty = Registry(15, 1 << 20)

    with pytest.raises(Unavailable) as refused:
        await stage().run(empty, CONTEXT)
    assert refused.value.reason == "STAGE_UNAVAILABLE"
    assert "none registered" in refused.value.message

    (step,) = (await stage(fail_open=True).run(empty, CONTEXT)).steps
    assert (step.decision, step.service) == ("failed_open", "")
    assert "none registered" in step.reason


async def test_an_answer_becomes_the_step_and_the_result() -> None:
    redacted = kernel_pb2.GenerateRequest(prompt="mail <EMAIL_ADDRESS_1>")
    answer = Answer(
        "redacted", "1 entities replaced", {"entities": "EMAIL_ADDRESS:1"}, redacted,
        refusal="[refused]", restore=True,
    )  # fmt: skip
    result = await stage(answer=answer).run(OneInstance(), CONTEXT)  # type: ignore[arg-type]

    (step,) = result.steps
    assert (step.decision, step.reason) == ("redacted", "1 entities replaced")
    assert dict(step.evidence) == {"policy": "tenant:acme", "entities": "EMAIL_ADDRESS:1"}
    assert (result.request, result.refusal, result.restore) == (redacted, "[refused]", True)


async def test_privacy_off_skips_redaction_and_needs_no_privacy_service() -> None:
    off = TenantPolicy("tenant:open", privacy="off")
    before, _ = for_policy(off)
    (redact,) = [s for s in before if s.name == "privacy:redact"]
    assert isinstance(redact, SkippedStage)
    (step,) = (await redact.run(Registry(15, 1 << 20), CONTEXT)).steps
    assert (step.decision, dict(step.evidence)) == ("skipped", {"policy": "tenant:open"})
    assert "privacy is off" in step.reason

    assert common_pb2.SERVICE_KIND_PRIVACY not in services_required([off])
    assert common_pb2.SERVICE_KIND_PRIVACY in services_required([TenantPolicy("default")])
