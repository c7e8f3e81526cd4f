"""Capability rules (pure): what a plugin is sent, and which parts of its answer count."""

from __future__ import annotations

from typing import Any

import pytest

from llmos.kernel.plugin_rules import AFTER, BEFORE, BadPluginResult, check_result, hook_arguments
from llmos.plugins.manifest import Manifest


def manifest(*capabilities: str) -> Manifest:
    return Manifest("p", "1", ("1",), (BEFORE, AFTER), frozenset(capabilities))


def test_the_prompt_goes_only_to_plugins_with_read_prompt() -> None:
    common = {"tenant": "t", "task_id": "1", "prompt": "secret", "output": "out"}
    messages = [{"role": "user", "content": "secret"}]

    assert hook_arguments(manifest(), BEFORE, messages=messages, **common) == {
        "tenant": "t",
        "task_id": "1",
    }
    assert hook_arguments(manifest("read_prompt"), BEFORE, messages=messages, **common) == {
        "tenant": "t",
        "task_id": "1",
        "prompt": "secret",
        "messages": messages,
    }
    assert "output" not in hook_arguments(manifest("read_prompt"), AFTER, **common)
    assert hook_arguments(manifest("read_output"), AFTER, **common) == {
        "tenant": "t",
        "task_id": "1",
        "output": "out",
    }


def test_a_change_without_the_capability_is_a_violation() -> None:
    dropped = check_result(manifest("read_prompt"), BEFORE, "hi", {"prompt": "HI"})
    assert (dropped.text, dropped.violations) == (None, ("modify_prompt",))

    kept = check_result(manifest("read_prompt", "modify_prompt"), BEFORE, "hi", {"prompt": "HI"})
    assert (kept.text, kept.violations) == ("HI", ())

    same = check_result(manifest("read_prompt"), BEFORE, "hi", {"prompt": "hi"})
    assert (same.text, same.violations) == (None, ())  # handing it back unchanged is fine

    output = check_result(manifest("read_output"), AFTER, "o", {"output": "x"})
    assert output.violations == ("modify_output",)


def test_verdicts() -> None:
    blocked = check_result(manifest(), BEFORE, "", {"verdict": {"action": "block", "reason": "r"}})
    assert (blocked.blocked, blocked.reason) == (True, "r")
    assert not check_result(manifest(), BEFORE, "", {"verdict": {"action": "allow"}}).blocked
    assert check_result(manifest(), BEFORE, "", None) == check_result(manifest(), BEFORE, "", {})


@pytest.mark.parametrize(
    ("result", "field"),
    [
        ([1], "result"),
        ({"prompt": 42}, "prompt"),
        ({"output": "x"}, "output"),  # not a field of llmos_before_request
        ({"verdict": "block"}, "verdict"),
        ({"verdict": {"action": "deny"}}, "verdict.action"),
        ({"verdict": {"action": "block", "reason": 3}}, "verdict.reason"),
        ({"verdict": {"action": "block", "why": "x"}}, "verdict.why"),
    ],
)
def test_garbage_names_the_plugin_and_the_field(result: Any, field: str) -> None:
    with pytest.raises(BadPluginResult) as bad:
        check_result(manifest("read_prompt", "modify_prompt"), BEFORE, "hi", result)
    assert bad.value.metadata == {"plugin": "p", "field": field}
    assert "plugin 'p'" in bad.value.message and f"field {field!r}" in bad.value.message
