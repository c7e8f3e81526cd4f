"""Tenant policy on real processes: a kernel and the echo runtime alone (`llmos serve`), so
the safety and privacy services are down — never registered, and no supervisor to start
them. A tenant whose policy makes safety fail-open is served, its trace saying
"failed_open" and naming the policy; every other tenant is refused UNAVAILABLE (fail closed).
No model is needed.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from stacktools import Served, Stack

from llmos.services.errors import error_info
from llmos.v1 import common_pb2, kernel_pb2

POLICY = """
# Safety down must not stop this tenant; it runs no privacy stage (a tenant may leave
# out what [policy].mandatory does not name).
[tenants.lenient]
stages = ["safety:input", "safety:output"]
fail_open = ["safety:input", "safety:output"]
timeout_s = 1.5
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("policy")
    (workdir / "data").mkdir()
    (workdir / "data" / "llmos.toml").write_text(POLICY, encoding="utf-8")
    running = Served(workdir, {"LLMOS_RUNTIME_ENGINE": "echo", "LLMOS_METRICS_PORT": "-1"})
    try:
        running.start("kernel")
        running.start("runtime")
        running.wait_registered("runtime")
        yield running
    finally:
        running.stop()


def generate(stack: Stack, prompt: str, tenant: str) -> list[kernel_pb2.GenerateResponse]:
    with stack.channel() as channel:
        return list(
            stack.kernel(channel).Generate(
                kernel_pb2.GenerateRequest(prompt=prompt),
                timeout=30,
                metadata=(("x-llmos-tenant", tenant),),
            )
        )


def trace(stack: Stack, task_id: str) -> list[common_pb2.TraceStep]:
    with stack.channel() as channel:
        reply = stack.kernel(channel).GetTrace(
            kernel_pb2.GetTraceRequest(task_id=task_id), timeout=10
        )
    return list(reply.steps)


def newest_task(stack: Stack, tenant: str) -> kernel_pb2.Task:
    with stack.channel() as channel:
        reply = stack.kernel(channel).ListTasks(
            kernel_pb2.ListTasksRequest(tenant=tenant, page_size=1), timeout=10
        )
    return reply.tasks[0]


def test_safety_is_down_in_this_stack(served: Served) -> None:
    assert set(served.stack.services()) == {"runtime"}


def test_a_tenant_whose_policy_makes_safety_fail_open_is_served(served: Served) -> None:
    pieces = generate(served.stack, "served without safety", "lenient")

    assert "".join(p.text for p in pieces) == "served without safety"
    steps = trace(served.stack, pieces[0].task_id)
    assert [s.stage for s in steps] == [
        "admit",
        "safety:input",
        "runtime:generate",
        "safety:output",
        "record",
    ]
    admit, safety_in, _, safety_out, record = steps
    assert admit.evidence["policy"] == "tenant:lenient"
    for step in (safety_in, safety_out):
        assert step.decision == "failed_open"
        assert dict(step.evidence) == {"policy": "tenant:lenient"}
        assert "none registered" in step.reason
        assert step.service == ""  # no instance ran it
    assert record.decision == "succeeded"


@pytest.mark.parametrize("tenant", ["default", "acme"])
def test_a_tenant_under_the_default_policy_is_refused_unavailable(
    served: Served, tenant: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        generate(served.stack, "refused", tenant)

    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(refused.value)
    assert info is not None and info.reason == "STAGE_UNAVAILABLE"
    assert dict(info.metadata) == {"stage": "safety:input", "policy": "default"}
    assert "fail closed, policy default" in refused.value.details()

    task = newest_task(served.stack, tenant)
    assert task.state == common_pb2.TASK_STATE_FAILED
    steps = trace(served.stack, task.task_id)
    # The plugin stage runs first, skipped with no plugin installed; safety:input fails
    # closed and writes no step of its own: record says why.
    assert [(s.stage, s.decision) for s in steps] == [
        ("admit", "dispatched"),
        ("plugins:before", "skipped"),
        ("record", "failed"),
    ]
    assert steps[0].evidence["policy"] == "default"
    assert steps[-1].reason.startswith("STAGE_UNAVAILABLE: safety:input is required")


def test_a_bad_policy_stops_the_kernel_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[tenants.acme]\nstages = ["privacy:redact"]\n', encoding="utf-8")

    done = subprocess.run(
        [sys.executable, "-m", "llmos.kernel.cli", "serve", "kernel", "--port", "1",
         "--data-dir", str(tmp_path), "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert done.returncode == 2, done.stderr
    assert "'tenants.acme.stages' leaves out ['safety:input', 'safety:output']" in done.stderr
