"""The whole stack (`llmos up`) with the echo runtime: everything around the model, no model.

`runtime_engine = "echo"` makes the stack's runtime process stream the prompt back, so these
tests need no converted model (no `model` marker) and the stack is healthy in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from stacktools import Stack, start_stack, stop_stack

from llmos.v1 import common_pb2, kernel_pb2


@pytest.fixture(scope="module")
def echo_stack(shared_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_path = tmp_path_factory.mktemp("echo-stack") / "llmos-up.log"
    env = {
        "LLMOS_RUNTIME_ENGINE": "echo",
        "LLMOS_METRICS_PORT": "-1",  # only the gRPC block is known to be free
    }
    stack = start_stack(shared_data_dir, log_path, env=env)
    try:
        stack.wait_healthy(timeout_s=60)
        yield stack
    finally:
        stop_stack(stack)


def generate(stack: Stack, prompt: str) -> list[kernel_pb2.GenerateResponse]:
    with stack.channel() as channel:
        request = kernel_pb2.GenerateRequest(prompt=prompt)
        return list(stack.kernel(channel).Generate(request, timeout=30))


def test_generate_through_the_kernel_streams_the_prompt_back(echo_stack: Stack) -> None:
    # Through the real safety service (which reads this as benign; "hello from the echo
    # runtime" it scores as a prompt injection, one of its known false positives).
    pieces = generate(echo_stack, "the weather is mild today")

    assert pieces[0].task_id, "the first message carries the task id"
    assert "".join(p.text for p in pieces) == "the weather is mild today"
    assert [p.text for p in pieces if p.text] == ["the ", "weather ", "is ", "mild ", "today"]
    assert {p.model for p in pieces} - {""} == {"echo"}
    last = pieces[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 5)


def test_the_task_is_stored_and_traced_like_a_model_task(echo_stack: Stack) -> None:
    task_id = generate(echo_stack, "trace me")[0].task_id
    with echo_stack.channel() as channel:
        kernel = echo_stack.kernel(channel)
        task = kernel.GetTask(kernel_pb2.GetTaskRequest(task_id=task_id), timeout=10)
        trace = kernel.GetTrace(kernel_pb2.GetTraceRequest(task_id=task_id), timeout=10)

    assert task.task.state == common_pb2.TASK_STATE_SUCCEEDED
    assert task.output == "trace me"
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
    generate_step = trace.steps[stages.index("runtime:generate")]
    assert generate_step.service == "runtime"
    assert generate_step.decision == "completed"
    # The default policy chose the stages; the safety service allows, the privacy service
    # finds no PII (so there is nothing to restore: "skipped"), and no plugin is installed
    # ("skipped"), each naming the policy.
    assert trace.steps[0].evidence["policy"] == "default"
    expected = {
        "plugins:before": "skipped",
        "safety:input": "allow",
        "privacy:redact": "allow",
        "safety:output": "allow",
        "privacy:restore": "skipped",
        "plugins:after": "skipped",
    }
    for step in trace.steps[1:-1]:
        if step.stage != "runtime:generate":
            assert (step.decision, step.evidence["policy"]) == (expected[step.stage], "default")
    assert trace.steps[stages.index("safety:input")].evidence["safety_policy_version"]


def test_models_and_the_cli_see_the_echo_engine(echo_stack: Stack) -> None:
    with echo_stack.channel() as channel:
        models = echo_stack.kernel(channel).ListModels(kernel_pb2.ListModelsRequest(), timeout=10)
    assert [m.name for m in models.models] == ["echo"]

    done = echo_stack.llmos("generate", "said twice")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "said twice"


def test_calls_that_need_a_model_say_so(echo_stack: Stack) -> None:
    done = echo_stack.llmos("generate", "hi", "--model", "SmolLM2-135M-Instruct")
    assert done.returncode != 0
    assert "MODEL_NOT_FOUND" in done.stderr
    assert "echo engine" in done.stderr
