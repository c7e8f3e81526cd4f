"""Tasks through the real stack: Submit and its records, WatchTask, ListTasks, CancelTask,
GetTrace, bad input, and a kernel killed with SIGKILL losing nothing."""

from __future__ import annotations

import os
import signal
import time
import uuid

import grpc
import psutil
import pytest
from stacktools import Stack

from llmos.services.errors import error_info
from llmos.v1 import common_pb2, kernel_pb2

pytestmark = pytest.mark.model  # the real default model, converted once per session

GREEDY = common_pb2.SamplingParams(temperature=0.0, max_tokens=12)
LONG = common_pb2.SamplingParams(temperature=0.7, max_tokens=400, seed=4)
# Long enough to be running when the kernel is killed a moment after it started (seconds
# at the model's ~20 tokens/s), short enough that running it again after the restart
# costs the suite little: each token of it is generated twice.
INTERRUPTED = common_pb2.SamplingParams(temperature=0.7, max_tokens=120, seed=4)


def tenant_metadata(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("x-llmos-tenant", tenant),)


def submit(stack: Stack, prompt: str, sampling=GREEDY, tenant: str = "default", **fields) -> str:
    request = kernel_pb2.GenerateRequest(prompt=prompt, sampling=sampling, **fields)
    with stack.channel() as channel:
        reply = stack.kernel(channel).Submit(
            kernel_pb2.SubmitRequest(request=request), timeout=10, metadata=tenant_metadata(tenant)
        )
    assert reply.task_id
    return reply.task_id


def get(stack: Stack, task_id: str) -> kernel_pb2.GetTaskResponse:
    with stack.channel() as channel:
        return stack.kernel(channel).GetTask(kernel_pb2.GetTaskRequest(task_id=task_id), timeout=10)


def wait_final(stack: Stack, task_id: str, timeout_s: float = 90) -> kernel_pb2.GetTaskResponse:
    final = {
        common_pb2.TASK_STATE_SUCCEEDED,
        common_pb2.TASK_STATE_FAILED,
        common_pb2.TASK_STATE_CANCELLED,
        common_pb2.TASK_STATE_REFUSED,
    }
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        reply = get(stack, task_id)
        if reply.task.state in final:
            return reply
        time.sleep(0.2)
    pytest.fail(f"task {task_id} did not finish in {timeout_s}s")


def wait_state(stack: Stack, task_id: str, state: int, timeout_s: float = 30) -> None:
    started = time.monotonic()
    while get(stack, task_id).task.state != state:
        assert time.monotonic() - started < timeout_s, f"task never reached {state}"
        time.sleep(0.05)


def test_submit_returns_at_once_and_the_task_runs_on(stack: Stack) -> None:
    started = time.monotonic()
    task_id = submit(stack, "What is the capital of France?")
    assert time.monotonic() - started < 2, "Submit must not wait for the work"
    done = wait_final(stack, task_id)
    assert done.task.state == common_pb2.TASK_STATE_SUCCEEDED
    # The default policy leaves places to the model (privacy_entities: every type but
    # LOCATION), so it is asked about France, not "<LOCATION_1>".
    assert "Paris" in done.output
    assert done.task.usage.completion_tokens > 0
    assert done.task.finish_reason in (
        common_pb2.FINISH_REASON_STOP,
        common_pb2.FINISH_REASON_LENGTH,
    )


def test_the_default_policy_redacts_people_and_emails_but_not_places(stack: Stack) -> None:
    task_id = submit(stack, "Write to Zoë Martin at zoe@example.org about Paris.")
    assert wait_final(stack, task_id).task.state == common_pb2.TASK_STATE_SUCCEEDED
    with stack.channel() as channel:
        trace = stack.kernel(channel).GetTrace(
            kernel_pb2.GetTraceRequest(task_id=task_id), timeout=10
        )
    (redact,) = [step for step in trace.steps if step.stage == "privacy:redact"]
    assert redact.decision == "redacted"
    assert redact.evidence["entities"] == "EMAIL_ADDRESS:1,PERSON:1"  # not LOCATION


def test_watch_replays_from_any_offset(stack: Stack) -> None:
    task_id = submit(stack, "Name three colours.")
    wait_final(stack, task_id)
    with stack.channel() as channel:
        kernel = stack.kernel(channel)
        everything = list(
            kernel.WatchTask(kernel_pb2.WatchTaskRequest(task_id=task_id), timeout=30)
        )
        tail = list(
            kernel.WatchTask(kernel_pb2.WatchTaskRequest(task_id=task_id, offset=3), timeout=30)
        )
    offsets = [event.offset for event in everything]
    assert offsets == list(range(len(everything)))
    states = [e.state for e in everything if not e.text]
    assert (
        states[0] == common_pb2.TASK_STATE_QUEUED and states[-1] == common_pb2.TASK_STATE_SUCCEEDED
    )
    assert "".join(e.text for e in everything) == get(stack, task_id).output
    assert tail == everything[3:]


def test_trace_records_every_stage_in_order(stack: Stack) -> None:
    task_id = submit(stack, "Say hi.")
    wait_final(stack, task_id)
    with stack.channel() as channel:
        trace = stack.kernel(channel).GetTrace(
            kernel_pb2.GetTraceRequest(task_id=task_id), timeout=10
        )
    stages = [step.stage for step in trace.steps]
    assert stages == [
        "admit",
        "plugins:before",
        "safety:input",
        "privacy:redact",
        "runtime:generate",
        "safety:output",
        "privacy:restore",
        "plugins:after",
        "record",
    ]
    by_stage = {step.stage: step for step in trace.steps}
    # The safety service checks the prompt and the trace holds its verdict with evidence.
    assert by_stage["safety:input"].decision == "allow"
    assert by_stage["safety:input"].evidence["verdict"]
    assert by_stage["safety:input"].service == "safety"
    assert by_stage["runtime:generate"].decision == "completed"
    assert int(by_stage["runtime:generate"].evidence["completion_tokens"]) > 0
    assert by_stage["record"].decision == "succeeded"


def test_cli_submit_tasks_and_trace(stack: Stack) -> None:
    submitted = stack.llmos("submit", "Say hello.", "--max-tokens", "6", "--temperature", "0")
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    wait_final(stack, task_id)
    listed = stack.llmos("tasks", "--limit", "50")
    assert listed.returncode == 0 and task_id in listed.stdout
    traced = stack.llmos("trace", task_id)
    assert traced.returncode == 0, traced.stderr
    assert "runtime:generate" in traced.stdout and "SUCCEEDED" in traced.stdout


def test_list_filters_by_tenant_and_pages_without_gaps(stack: Stack) -> None:
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    ids = {submit(stack, f"Say the number {n}.", tenant=tenant) for n in range(5)}
    for task_id in ids:
        wait_final(stack, task_id)
    seen: list[str] = []
    token = ""
    with stack.channel() as channel:
        kernel = stack.kernel(channel)
        while True:
            page = kernel.ListTasks(
                kernel_pb2.ListTasksRequest(tenant=tenant, page_size=2, page_token=token),
                timeout=10,
            )
            seen += [task.task_id for task in page.tasks]
            assert all(task.tenant == tenant for task in page.tasks)
            token = page.next_page_token
            if not token:
                break
        succeeded = kernel.ListTasks(
            kernel_pb2.ListTasksRequest(tenant=tenant, state=common_pb2.TASK_STATE_FAILED),
            timeout=10,
        )
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))
    assert list(succeeded.tasks) == []


def test_cancel_a_running_task_frees_the_runtime(stack: Stack) -> None:
    task_id = submit(stack, "Write a very long essay about mountains.", sampling=LONG)
    wait_state(stack, task_id, common_pb2.TASK_STATE_RUNNING)
    with stack.channel() as channel:
        reply = stack.kernel(channel).CancelTask(
            kernel_pb2.CancelTaskRequest(task_id=task_id), timeout=10
        )
    assert reply.state == common_pb2.TASK_STATE_CANCELLED
    assert get(stack, task_id).task.usage.completion_tokens == 0  # never completed
    stack.wait_runtime_idle(timeout_s=3)  # the runtime dropped the sequence


def test_a_generate_client_that_leaves_cancels_its_task(stack: Stack) -> None:
    with stack.channel() as channel:
        call = stack.kernel(channel).Generate(
            kernel_pb2.GenerateRequest(prompt="Write a long story.", sampling=LONG), timeout=60
        )
        task_id = next(call).task_id
        next(call)
        call.cancel()
    assert wait_final(stack, task_id, 20).task.state == common_pb2.TASK_STATE_CANCELLED


@pytest.mark.parametrize(
    "call",
    [
        lambda k: k.GetTask(kernel_pb2.GetTaskRequest(task_id="nope"), timeout=10),
        lambda k: k.GetTrace(kernel_pb2.GetTraceRequest(task_id="nope"), timeout=10),
        lambda k: k.CancelTask(kernel_pb2.CancelTaskRequest(task_id="nope"), timeout=10),
        lambda k: list(k.WatchTask(kernel_pb2.WatchTaskRequest(task_id="nope"), timeout=10)),
    ],
)
def test_unknown_task_ids_are_not_found(stack: Stack, call) -> None:
    with stack.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        call(stack.kernel(channel))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in caught.value.details()


def test_bad_page_token_and_priority_are_invalid(stack: Stack) -> None:
    with stack.channel() as channel:
        kernel = stack.kernel(channel)
        with pytest.raises(grpc.RpcError) as caught:
            kernel.ListTasks(kernel_pb2.ListTasksRequest(page_token="garbage!"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).reason == "BAD_PAGE_TOKEN"
        with pytest.raises(grpc.RpcError) as caught:
            kernel.Submit(
                kernel_pb2.SubmitRequest(
                    request=kernel_pb2.GenerateRequest(prompt="hi", priority=7)  # type: ignore[arg-type]
                ),
                timeout=10,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).reason == "INVALID_PRIORITY"


def test_a_killed_kernel_loses_no_accepted_task(stack: Stack) -> None:
    running = submit(stack, "Write a long poem about the sea.", sampling=INTERRUPTED)
    wait_state(stack, running, common_pb2.TASK_STATE_RUNNING)
    queued = [submit(stack, f"Count to {n}.") for n in (3, 4)]
    # Every child's command line holds "llmos.kernel.cli"; the kernel's is "serve kernel".
    kernel = next(
        p
        for p in psutil.Process(stack.process.pid).children()
        if " serve kernel" in " ".join(p.cmdline())
    )
    os.kill(kernel.pid, signal.SIGKILL)
    stack.wait_healthy(60)
    for task_id in [running, *queued]:
        # Re-queued after the crash and run again once the services re-registered.
        final = wait_final(stack, task_id, 180)
        assert final.task.state == common_pb2.TASK_STATE_SUCCEEDED, final.task.error
    with stack.channel() as channel:
        events = list(
            stack.kernel(channel).WatchTask(
                kernel_pb2.WatchTaskRequest(task_id=running), timeout=30
            )
        )
    states = [e.state for e in events if not e.text]
    assert states.count(common_pb2.TASK_STATE_RUNNING) == 2, "it ran, was interrupted, ran again"


def test_cancel_task_ends_a_generate_stream_with_finish_reason_cancelled(stack: Stack) -> None:
    with stack.channel() as channel:
        kernel = stack.kernel(channel)
        call = kernel.Generate(
            kernel_pb2.GenerateRequest(prompt="Write a long story.", sampling=LONG), timeout=60
        )
        task_id = next(call).task_id
        next(call)
        kernel.CancelTask(kernel_pb2.CancelTaskRequest(task_id=task_id), timeout=10)
        rest = list(call)
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_CANCELLED
    final = get(stack, task_id)
    assert final.task.state == common_pb2.TASK_STATE_CANCELLED and final.task.error
