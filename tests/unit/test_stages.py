"""The pipeline's stages as a policy builds them: which run, and what each traces when its
service answers, is not built yet, or is down (fail closed, or fail open by policy)."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
import pytest

from llmos.kernel.policy import TenantPolicy
from llmos.kernel.registry import Registry
from llmos.kernel.stages import PluginStage, ServiceStage, StageContext, for_policy
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


def stage(*, fail_open: bool = False, error: grpc.StatusCode | None = None) -> ServiceStage:
    async def call(channel: object, ctx: StageContext, timeout: float | None) -> object:
        if error is not None:
            raise rpc_error(error)
        return None

    return ServiceStage(
        "safety:input", common_pb2.SERVICE_KIND_SAFETY, call, policy="tenant:acme",
        fail_open=fail_open,
    )  # fmt: skip


def test_the_policy_chooses_the_stages_in_pipeline_order() -> None:
    before, after = for_policy(TenantPolicy("default"))
    assert [s.name for s in before] == ["plugins:before", "safety:input", "privacy:redact"]
    assert [s.name for s in after] == ["safety:output", "privacy:restore", "plugins:after"]
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
    assert [s.name for s in after] == ["safety:output"]
    assert isinstance(before[0], ServiceStage) and isinstance(after[0], ServiceStage)
    assert (before[0].fail_open, after[0].fail_open) == (False, True)
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
