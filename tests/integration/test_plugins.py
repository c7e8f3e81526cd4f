"""Plugins on real processes: a kernel, the echo runtime and one real plugin host per plugin.

The test plugins (tests/plugins/) are installed into a folder of this module's own with
`llmos.plugins.testing.install_source` (distribution metadata and entry points, as an
editable install writes them) and reach the kernel through PYTHONPATH, so nothing is
installed into the environment. The pipeline policy runs the plugin stages only (safety
and privacy are not started); the tenant `lenient` makes plugins:before fail open.

Each test enables the plugins it needs and disables the others through the kernel's
EnablePlugin / DisablePlugin, which also shows that both take effect without a restart.
The echo runtime streams the prompt back, so the output shows the prompt the model got.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from prometheus_client.parser import text_string_to_metric_families
from stacktools import STACK_SIZE, Served, Stack, free_port_block

from llmos.plugins.testing import install_source, pythonpath
from llmos.services.errors import error_info
from llmos.v1 import common_pb2, kernel_pb2

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
GUARD = PLUGINS.parents[1] / "plugins" / "firstparty" / "llmos-policy-guard"
NAMES = (
    "bad-manifest",
    "blind",
    "calculator",
    "crash-hook",
    "crash-import",
    "garbage",
    "hang",
    "hog",
    "rewriter",
    "shouter",
    "slow-events",
    "sneaky",
    "witness",
)
CONFIG = """
tool_grants = ["default:calculator.*", "default:hog.*"]
plugin_max_crashes = 3

[policy]
stages = ["plugins:before", "plugins:after"]
mandatory = []

[tenants.lenient]
fail_open = ["plugins:before"]
"""
RUNNING = kernel_pb2.PLUGIN_STATE_RUNNING
DISABLED = kernel_pb2.PLUGIN_STATE_DISABLED


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("plugins")
    (workdir / "data").mkdir()
    (workdir / "data" / "llmos.toml").write_text(CONFIG, encoding="utf-8")
    installed = [install_source(PLUGINS / name, workdir / "site") for name in NAMES]
    installed.append(install_source(GUARD, workdir / "site"))
    (workdir / "data" / "plugins").mkdir()
    (workdir / "data" / "plugins" / "policy-guard.toml").write_text(
        'patterns = ["(?i)wire transfer"]\nreason = "no payments here"\n', encoding="utf-8"
    )
    env = {
        "LLMOS_RUNTIME_ENGINE": "echo",
        # The kernel's /metrics on the first port of a free block (the runtime's on the next).
        "LLMOS_METRICS_PORT": str(free_port_block(STACK_SIZE)),
        "PYTHONPATH": pythonpath(*installed),
    }
    running = Served(workdir, env)
    try:
        running.start("kernel")
        running.start("runtime")
        running.wait_registered("runtime")
        yield running
    finally:
        running.stop()


def kernel(stack: Stack, channel: grpc.Channel) -> object:
    return stack.kernel(channel)


def plugins(stack: Stack) -> dict[str, kernel_pb2.PluginInfo]:
    with stack.channel() as channel:
        reply = stack.kernel(channel).ListPlugins(kernel_pb2.ListPluginsRequest(), timeout=10)
    return {plugin.name: plugin for plugin in reply.plugins}


def wait_state(stack: Stack, name: str, state: int, timeout_s: float = 30) -> kernel_pb2.PluginInfo:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        plugin = plugins(stack)[name]
        if plugin.state == state:
            return plugin
        time.sleep(0.1)
    pytest.fail(f"plugin {name} not {kernel_pb2.PluginState.Name(state)}: {plugins(stack)[name]}")


def only(stack: Stack, *names: str) -> None:
    """Enable exactly `names` among the loadable plugins, at once."""
    with stack.channel() as channel:
        kernel = stack.kernel(channel)
        for name, plugin in plugins(stack).items():
            if plugin.state == kernel_pb2.PLUGIN_STATE_INVALID:
                continue
            if name in names:
                kernel.EnablePlugin(kernel_pb2.EnablePluginRequest(name=name), timeout=10)
            elif plugin.state != DISABLED:
                kernel.DisablePlugin(kernel_pb2.DisablePluginRequest(name=name), timeout=30)
    for name in names:
        wait_state(stack, name, RUNNING)


def generate(
    stack: Stack, prompt: str, tenant: str = "default"
) -> list[kernel_pb2.GenerateResponse]:
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


def newest_task(stack: Stack, tenant: str = "default") -> kernel_pb2.Task:
    with stack.channel() as channel:
        reply = stack.kernel(channel).ListTasks(
            kernel_pb2.ListTasksRequest(tenant=tenant, page_size=1), timeout=10
        )
    return reply.tasks[0]


def plugin_steps(steps: list[common_pb2.TraceStep]) -> list[tuple[str, str, str]]:
    return [
        (s.stage, s.service, s.decision)
        for s in steps
        if s.stage in ("plugins:before", "plugins:after")
    ]


def metric(served: Served, name: str, **labels: str) -> float:
    """One sample of the kernel's /metrics (0 when the label set has none yet)."""
    port = served.env["LLMOS_METRICS_PORT"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def eventually(check: Callable[[], object], what: str, timeout_s: float = 30) -> object:
    """Poll `check` until it returns something true (work the kernel does in the background)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    pytest.fail(f"not within {timeout_s}s: {what}")


def storage_lines(served: Served, plugin: str, name: str) -> list[dict[str, object]]:
    """The JSON lines a test plugin wrote to a file in its storage folder."""
    path = served.workdir / "data" / "plugins" / plugin / "storage" / name
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- discovery and state


def test_an_invalid_manifest_is_listed_invalid_naming_the_field(served: Served) -> None:
    bad = plugins(served.stack)["bad-manifest"]

    assert bad.state == kernel_pb2.PLUGIN_STATE_INVALID
    assert "'capabilities.modify_prompt'" in bad.reason and "read_prompt" in bad.reason
    assert bad.manifest_path.endswith("bad-manifest/pyproject.toml")
    with served.stack.channel() as channel, pytest.raises(grpc.RpcError) as refused:
        served.stack.kernel(channel).EnablePlugin(
            kernel_pb2.EnablePluginRequest(name="bad-manifest"), timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_plugin_that_crashes_at_import_is_disabled_and_recorded(served: Served) -> None:
    crashed = wait_state(served.stack, "crash-import", DISABLED)

    assert crashed.crashes == 3
    assert "disabled after 3 crashes" in crashed.reason
    assert "crash-import fails at import on purpose" in crashed.reason  # from its log
    # The kernel stayed up and serves with the other plugins.
    only(served.stack, "shouter")
    assert "".join(p.text for p in generate(served.stack, "still up")) == "STILL UP"


def test_unknown_plugin_names_are_not_found(served: Served) -> None:
    with served.stack.channel() as channel, pytest.raises(grpc.RpcError) as refused:
        served.stack.kernel(channel).GetPlugin(kernel_pb2.GetPluginRequest(name="nope"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(refused.value)
    assert info is not None and info.reason == "PLUGIN_NOT_FOUND"


# ---------------------------------------------------------------- capabilities


def test_a_plugin_with_modify_prompt_changes_what_the_model_gets(served: Served) -> None:
    only(served.stack, "shouter")
    labels = {"plugin": "shouter", "hook": "llmos_before_request"}
    calls = metric(served, "llmos_kernel_plugin_calls_total", outcome="ok", **labels)
    timed = metric(served, "llmos_kernel_plugin_call_duration_seconds_count", **labels)
    pieces = generate(served.stack, "hello plugins")

    assert "".join(p.text for p in pieces) == "HELLO PLUGINS"
    assert metric(served, "llmos_kernel_plugin_calls_total", outcome="ok", **labels) == calls + 1
    assert metric(served, "llmos_kernel_plugin_call_duration_seconds_count", **labels) == timed + 1
    steps = trace(served.stack, pieces[0].task_id)
    assert plugin_steps(steps) == [
        ("plugins:before", "plugin:shouter", "modified"),
        ("plugins:after", "", "skipped"),
    ]
    before = next(s for s in steps if s.stage == "plugins:before")
    assert before.evidence["plugin"] == "shouter"
    assert before.evidence["hook"] == "llmos_before_request"


def test_a_prompt_change_without_modify_prompt_is_dropped_and_recorded(served: Served) -> None:
    only(served.stack, "sneaky")
    violations = plugins(served.stack)["sneaky"].violations
    counted = metric(served, "llmos_kernel_plugin_violations_total", plugin="sneaky")
    pieces = generate(served.stack, "keep my prompt")

    assert "".join(p.text for p in pieces) == "keep my prompt"
    (before,) = [s for s in trace(served.stack, pieces[0].task_id) if s.stage == "plugins:before"]
    assert before.decision == "violation"
    assert before.evidence["violation"] == "modify_prompt"
    assert "dropped" in before.reason
    assert plugins(served.stack)["sneaky"].violations == violations + 1
    assert metric(served, "llmos_kernel_plugin_violations_total", plugin="sneaky") == counted + 1


def test_a_plugin_without_read_prompt_is_never_sent_the_prompt(served: Served) -> None:
    only(served.stack, "blind")  # its hooks raise if they get the prompt or the output
    pieces = generate(served.stack, "secret words")

    assert "".join(p.text for p in pieces) == "secret words"
    assert plugin_steps(trace(served.stack, pieces[0].task_id)) == [
        ("plugins:before", "plugin:blind", "allow"),
        ("plugins:after", "plugin:blind", "allow"),
    ]
    assert plugins(served.stack)["blind"].isolation.startswith("own ")


# ---------------------------------------------------------------- failures


def test_a_crash_in_a_hook_fails_closed_or_open_by_policy_then_disables(served: Served) -> None:
    only(served.stack, "crash-hook")

    with pytest.raises(grpc.RpcError) as refused:
        generate(served.stack, "crash please")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(refused.value)
    assert info is not None and info.reason == "PLUGIN_FAILED"
    assert dict(info.metadata) == {
        "stage": "plugins:before",
        "policy": "default",
        "plugin": "crash-hook",
    }
    task = newest_task(served.stack)
    assert task.state == common_pb2.TASK_STATE_FAILED
    steps = trace(served.stack, task.task_id)
    assert plugin_steps(steps) == [("plugins:before", "plugin:crash-hook", "failed")]
    assert "host is down" in steps[1].reason

    # The lenient tenant's policy lets plugins:before fail open: served, traced so.
    pieces = generate(served.stack, "served anyway", tenant="lenient")
    assert "".join(p.text for p in pieces) == "served anyway"
    assert plugin_steps(trace(served.stack, pieces[0].task_id))[0][2] == "failed_open"

    generate(served.stack, "third crash", tenant="lenient")
    disabled = wait_state(served.stack, "crash-hook", DISABLED)
    assert disabled.crashes == 3 and "disabled after 3 crashes" in disabled.reason
    # Disabled: no longer called, so the default tenant is served again.
    pieces = generate(served.stack, "after the crashes")
    assert plugin_steps(trace(served.stack, pieces[0].task_id))[0][2] == "skipped"


def test_a_hung_hook_costs_its_timeout_and_no_more(served: Served) -> None:
    only(served.stack, "hang")  # timeout_ms = 300
    labels = {"plugin": "hang", "hook": "llmos_before_request"}
    timeouts = metric(served, "llmos_kernel_plugin_calls_total", outcome="timeout", **labels)
    restarts = metric(served, "llmos_kernel_plugin_restarts_total", plugin="hang")

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        generate(served.stack, "hang please")
    elapsed = time.monotonic() - started

    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "timed out after 300 ms" in refused.value.details()
    assert elapsed < 3.0  # the 300 ms timeout plus a task's own cost, with room for CI
    steps = trace(served.stack, newest_task(served.stack).task_id)
    (before,) = [s for s in steps if s.stage == "plugins:before"]
    assert before.decision == "failed"
    assert 0.3 <= before.duration.ToTimedelta().total_seconds() < 1.0
    # The hung host was killed and is restarted: a crash on record.
    hang = plugins(served.stack)["hang"]
    assert hang.crashes >= 1
    assert (
        metric(served, "llmos_kernel_plugin_calls_total", outcome="timeout", **labels)
        == timeouts + 1
    )
    eventually(
        lambda: metric(served, "llmos_kernel_plugin_restarts_total", plugin="hang") > restarts,
        "the killed host counted as a restart",
    )
    only(served.stack)


def test_a_garbage_answer_is_refused_naming_the_plugin_and_field(served: Served) -> None:
    only(served.stack, "garbage")

    with pytest.raises(grpc.RpcError) as refused:
        generate(served.stack, "garbage please")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "plugin 'garbage'" in refused.value.details()
    assert "field 'prompt' must be a string" in refused.value.details()
    pieces = generate(served.stack, "lenient", tenant="lenient")
    assert "".join(p.text for p in pieces) == "lenient"


# ---------------------------------------------------------------- control


def test_disable_and_enable_take_effect_without_a_restart(served: Served) -> None:
    only(served.stack, "shouter")
    assert "".join(p.text for p in generate(served.stack, "on")) == "ON"

    off = served.stack.llmos("plugins", "disable", "shouter")
    assert off.returncode == 0, off.stderr
    assert "shouter: disabled" in off.stdout
    assert "".join(p.text for p in generate(served.stack, "off")) == "off"

    on = served.stack.llmos("plugins", "enable", "shouter")
    assert on.returncode == 0, on.stderr
    wait_state(served.stack, "shouter", RUNNING)
    assert "".join(p.text for p in generate(served.stack, "on again")) == "ON AGAIN"

    listed = served.stack.llmos("plugins", "list")
    assert listed.returncode == 0 and "shouter" in listed.stdout and "invalid" in listed.stdout
    info = served.stack.llmos("plugins", "info", "shouter")
    assert "capabilities: modify_prompt, read_prompt" in info.stdout
    assert "limits: timeout 2000 ms" in info.stdout
    missing = served.stack.llmos("plugins", "info", "nope")
    assert missing.returncode == 1 and "PLUGIN_NOT_FOUND" in missing.stderr


# ---------------------------------------------------------------- tools


def invoke(
    stack: Stack, name: str, data: dict[str, object], tenant: str = "default", task_id: str = ""
) -> dict[str, object]:
    arguments = struct_pb2.Struct()
    arguments.update(data)
    with stack.channel() as channel:
        reply = stack.kernel(channel).InvokeTool(
            kernel_pb2.InvokeToolRequest(name=name, input=arguments, task_id=task_id),
            timeout=10,
            metadata=(("x-llmos-tenant", tenant),),
        )
    return json_format.MessageToDict(reply.output)


def test_tools_are_listed_checked_and_traced(served: Served) -> None:
    only(served.stack, "calculator")
    with served.stack.channel() as channel:
        tools = served.stack.kernel(channel).ListTools(kernel_pb2.ListToolsRequest(), timeout=10)
    (tool,) = tools.tools
    assert (tool.name, tool.plugin) == ("calculator.add", "calculator")
    assert json_format.MessageToDict(tool.input_schema)["required"] == ["a", "b"]

    task_id = generate(served.stack, "a task")[0].task_id
    assert invoke(served.stack, "calculator.add", {"a": 2, "b": 3}, task_id=task_id) == {"sum": 5}
    (step,) = [s for s in trace(served.stack, task_id) if s.stage == "tool"]
    assert (step.service, step.decision) == ("plugin:calculator", "invoked")
    assert step.evidence["tool"] == "calculator.add"

    cases = [
        ("calculator.add", {"a": 2, "b": "x"}, "default", grpc.StatusCode.INVALID_ARGUMENT,
         "BAD_TOOL_INPUT"),
        ("calculator.add", {"a": 2}, "default", grpc.StatusCode.INVALID_ARGUMENT,
         "BAD_TOOL_INPUT"),
        ("calculator.sub", {}, "default", grpc.StatusCode.NOT_FOUND, "TOOL_NOT_FOUND"),
        ("calculator", {}, "default", grpc.StatusCode.INVALID_ARGUMENT, "BAD_TOOL_NAME"),
        ("calculator.add", {"a": 1, "b": 2}, "acme", grpc.StatusCode.PERMISSION_DENIED,
         "TOOL_NOT_GRANTED"),
    ]  # fmt: skip
    for name, data, tenant, code, reason in cases:
        with pytest.raises(grpc.RpcError) as refused:
            invoke(served.stack, name, data, tenant=tenant)
        assert refused.value.code() == code, (name, data)
        info = error_info(refused.value)
        assert info is not None and info.reason == reason
    with pytest.raises(grpc.RpcError) as refused:
        invoke(served.stack, "calculator.add", {"a": 2, "b": "x"})
    assert "input.b: 'x' is not of type 'number'" in refused.value.details()
    # Nothing else was affected.
    assert invoke(served.stack, "calculator.add", {"a": 1.5, "b": 1}) == {"sum": 2.5}


def test_a_block_verdict_refuses_the_request_and_is_traced(served: Served) -> None:
    only(served.stack, "policy-guard", "shouter")  # guard runs first (name order)

    with pytest.raises(grpc.RpcError) as refused:
        generate(served.stack, "make a wire transfer")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info = error_info(refused.value)
    assert info is not None and info.reason == "REFUSED_BY_PLUGIN"
    assert dict(info.metadata) == {"plugin": "policy-guard", "stage": "plugins:before"}
    assert "no payments here" in refused.value.details()
    task = newest_task(served.stack)
    assert task.state == common_pb2.TASK_STATE_FAILED
    assert plugin_steps(trace(served.stack, task.task_id)) == [
        ("plugins:before", "plugin:policy-guard", "block")
    ]  # shouter was never called

    pieces = generate(served.stack, "hello")
    assert "".join(p.text for p in pieces) == "HELLO"
    assert [d for _, _, d in plugin_steps(trace(served.stack, pieces[0].task_id))][:2] == [
        "allow",
        "modified",
    ]


# ---------------------------------------------------------------- task events


def test_task_events_reach_a_plugin_in_order(served: Served) -> None:
    only(served.stack, "witness")
    pieces = generate(served.stack, "tell the witness")
    task_id = pieces[0].task_id

    def states() -> list[object]:
        seen = [e for e in storage_lines(served, "witness", "events.jsonl")
                if e["task_id"] == task_id]  # fmt: skip
        return seen if seen and seen[-1]["state"] == "SUCCEEDED" else []

    events = eventually(states, "the witness told of the task's end")
    assert [e["state"] for e in events] == ["QUEUED", "RUNNING", "SUCCEEDED"]  # type: ignore[index, union-attr]
    assert {e["tenant"] for e in events} == {"default"}  # type: ignore[index, union-attr]
    # Delivered in the plugin's own host, not in the kernel.
    assert {e["pid"] for e in events} == {plugins(served.stack)["witness"].pid}  # type: ignore[index, union-attr]

    # A cancelled task: its final event says so, with the reason.
    with served.stack.channel() as channel:
        stub = served.stack.kernel(channel)
        submitted = stub.Submit(
            kernel_pb2.SubmitRequest(request=kernel_pb2.GenerateRequest(prompt="x")), timeout=10
        )
        stub.CancelTask(kernel_pb2.CancelTaskRequest(task_id=submitted.task_id), timeout=10)
    final = eventually(
        lambda: [e for e in storage_lines(served, "witness", "events.jsonl")
                 if e["task_id"] == submitted.task_id and e["state"] in ("CANCELLED", "SUCCEEDED")],
        "the submitted task's end",
    )  # fmt: skip
    assert final[0]["state"] in ("CANCELLED", "SUCCEEDED")  # type: ignore[index]


def test_a_failing_or_hung_event_hook_never_holds_the_task(served: Served) -> None:
    only(served.stack, "slow-events")  # raises on QUEUED, hangs past 300 ms on RUNNING
    labels = {"plugin": "slow-events", "hook": "llmos_on_task_event"}
    failed = metric(served, "llmos_kernel_plugin_calls_total", outcome="failed", **labels)
    timeouts = metric(served, "llmos_kernel_plugin_calls_total", outcome="timeout", **labels)

    pieces = generate(served.stack, "events may fail")

    assert "".join(p.text for p in pieces) == "events may fail"
    task = newest_task(served.stack)
    assert task.state == common_pb2.TASK_STATE_SUCCEEDED
    eventually(
        lambda: (
            metric(served, "llmos_kernel_plugin_calls_total", outcome="timeout", **labels)
            > timeouts
        ),
        "the hung event hook counted as a timeout",
    )
    assert metric(served, "llmos_kernel_plugin_calls_total", outcome="failed", **labels) > failed

    def notes() -> list[common_pb2.TraceStep]:
        steps = trace(served.stack, task.task_id)
        found = [s for s in steps if s.stage == "plugins:event"]
        return found if len(found) >= 2 else []

    queued, running = eventually(notes, "both failures noted in the trace")[:2]  # type: ignore[index]
    assert (queued.service, queued.decision) == ("plugin:slow-events", "failed")
    assert queued.evidence["state"] == "QUEUED"
    assert "fails on QUEUED on purpose" in queued.reason
    assert "the task was not affected" in queued.reason
    assert running.evidence["state"] == "RUNNING"
    assert "timed out after 300 ms" in running.reason
    only(served.stack)


# ---------------------------------------------------------------- commands


def test_plugin_commands_are_listed_and_run_in_the_plugins_host(served: Served) -> None:
    only(served.stack, "witness")
    listed = served.stack.llmos("plugins", "commands")
    assert listed.returncode == 0, listed.stderr
    assert "witness" in listed.stdout and "seen" in listed.stdout
    assert "How many prompts the witness saw." in listed.stdout

    ran = served.stack.llmos("plugins", "run", "witness", "seen", "a", "b")
    assert ran.returncode == 0, ran.stderr
    assert "args ['a', 'b']" in ran.stdout
    assert f"pid {plugins(served.stack)['witness'].pid}" in ran.stdout  # ran in its host
    assert f"pid {served.children['kernel'].pid}" not in ran.stdout

    cases = [
        (("nope", "seen"), "PLUGIN_NOT_FOUND", "no plugin 'nope'"),
        (("witness", "nope"), "COMMAND_NOT_FOUND", "plugin witness has no command 'nope'"),
        (("witness", "boom"), "PLUGIN_COMMAND_FAILED", "boom on purpose"),
        (("shouter", "seen"), "PLUGIN_NOT_RUNNING", "plugin shouter is not running"),
    ]
    for args, reason, message in cases:
        failed = served.stack.llmos("plugins", "run", *args)
        assert failed.returncode == 1, (args, failed.stdout)
        assert reason in failed.stderr and message in failed.stderr, failed.stderr
    missing = served.stack.llmos("plugins", "run", "witness")
    assert missing.returncode == 2 and "needs a command" in missing.stderr
    # The failed command did not take the host down.
    assert served.stack.llmos("plugins", "run", "witness", "seen").returncode == 0


# ---------------------------------------------------------------- modify_output


def submit_and_wait(stack: Stack, prompt: str) -> kernel_pb2.GetTaskResponse:
    with stack.channel() as channel:
        stub = stack.kernel(channel)
        task_id = stub.Submit(
            kernel_pb2.SubmitRequest(request=kernel_pb2.GenerateRequest(prompt=prompt)),
            timeout=10,
        ).task_id

        def finished() -> kernel_pb2.GetTaskResponse | None:
            got = stub.GetTask(kernel_pb2.GetTaskRequest(task_id=task_id), timeout=10)
            return got if got.task.state == common_pb2.TASK_STATE_SUCCEEDED else None

        return eventually(finished, f"task {task_id} succeeded")  # type: ignore[return-value]


def test_a_plugin_with_modify_output_replaces_the_output_everywhere(served: Served) -> None:
    only(served.stack, "shouter")  # no plugin may change the output: it streams live
    live = [p for p in generate(served.stack, "three words here") if p.text]
    assert len(live) == 3 and "".join(p.text for p in live) == "THREE WORDS HERE"

    only(served.stack, "rewriter")
    pieces = generate(served.stack, "three words here")
    texts = [p.text for p in pieces if p.text]
    assert texts == ["[rewritten] three words here"]  # held, then delivered changed
    assert pieces[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert pieces[-1].usage.completion_tokens == 3
    (after,) = [s for s in trace(served.stack, pieces[0].task_id) if s.stage == "plugins:after"]
    assert (after.service, after.decision) == ("plugin:rewriter", "modified")
    assert after.evidence["output_held"] == "true"
    with served.stack.channel() as channel:
        got = served.stack.kernel(channel).GetTask(
            kernel_pb2.GetTaskRequest(task_id=pieces[0].task_id), timeout=10
        )
    assert got.output == "[rewritten] three words here"

    submitted = submit_and_wait(served.stack, "submitted words")
    assert submitted.output == "[rewritten] submitted words"
    only(served.stack)


# ---------------------------------------------------------------- limits


def test_a_plugin_past_its_memory_limit_fails_its_hook_not_the_kernel(served: Served) -> None:
    only(served.stack, "hog")  # limits.memory_mb = 64
    assert "".join(p.text for p in generate(served.stack, "allocate 16")) == "allocate 16"

    with pytest.raises(grpc.RpcError) as refused:
        generate(served.stack, "allocate 4096")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "MemoryError" in refused.value.details()
    assert "limits.memory_mb = 64" in refused.value.details()
    (before,) = [
        s for s in trace(served.stack, newest_task(served.stack).task_id)
        if s.stage == "plugins:before"
    ]  # fmt: skip
    assert before.decision == "failed"
    assert "RESOURCE_EXHAUSTED" in before.reason and "limits.memory_mb" in before.reason
    # The kernel and the plugin's host are still up; the lenient tenant is served.
    pieces = generate(served.stack, "allocate 4096", tenant="lenient")
    assert "".join(p.text for p in pieces) == "allocate 4096"
    assert plugins(served.stack)["hog"].state == RUNNING


def test_a_plugin_writing_past_its_storage_quota_is_refused(served: Served) -> None:
    only(served.stack, "hog")  # storage = { quota_mb = 1 }
    assert invoke(served.stack, "hog.write", {"name": "small", "kib": 512}) == {"bytes": 524288}

    with pytest.raises(grpc.RpcError) as refused:
        invoke(served.stack, "hog.write", {"name": "big", "kib": 2048})
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(refused.value)
    assert info is not None and info.reason == "PLUGIN_LIMIT_EXCEEDED"
    assert info.metadata["field"] == "capabilities.storage.quota_mb"
    assert "storage quota of 1 MB" in refused.value.details()
    big = served.workdir / "data" / "plugins" / "hog" / "storage" / "big"
    assert big.stat().st_size == 1024 * 1024  # it stopped at the quota


def test_a_plugin_without_network_cannot_connect(served: Served) -> None:
    assert os.geteuid() == 0  # these tests run as root: the host gets its own namespace
    only(served.stack, "hog")  # no `network` capability
    assert plugins(served.stack)["hog"].isolation.startswith("own network namespace")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=3):
            pass  # reachable from here
        tried = invoke(served.stack, "hog.connect", {"host": "127.0.0.1", "port": port})
    assert tried["connected"] is False
    assert "Network is unreachable" in str(tried["error"])


# ---------------------------------------------------------------- kept across a restart


def restart_kernel(served: Served) -> None:
    kernel = served.children["kernel"]
    kernel.send_signal(signal.SIGTERM)
    kernel.wait(timeout=60)
    served.start("kernel")
    served.wait_registered("runtime")  # the runtime's lease brings it back


def test_disable_and_enable_are_kept_across_a_kernel_restart(served: Served) -> None:
    only(served.stack, "shouter")
    assert served.stack.llmos("plugins", "disable", "shouter").returncode == 0
    state = served.workdir / "data" / "plugins" / "state.json"
    assert "shouter" in json.loads(state.read_text(encoding="utf-8"))["disabled"]

    restart_kernel(served)
    shouter = plugins(served.stack)["shouter"]
    assert shouter.state == DISABLED
    assert "kept across restarts" in shouter.reason
    # A plugin the kernel disabled after crashes (crash-hook) got a fresh start: off again.
    only(served.stack)
    assert plugins(served.stack)["shouter"].state == DISABLED
    assert "".join(p.text for p in generate(served.stack, "still off")) == "still off"

    assert served.stack.llmos("plugins", "enable", "shouter").returncode == 0
    assert "shouter" not in json.loads(state.read_text(encoding="utf-8"))["disabled"]
    restart_kernel(served)
    wait_state(served.stack, "shouter", RUNNING)
    assert "".join(p.text for p in generate(served.stack, "on again")) == "ON AGAIN"
