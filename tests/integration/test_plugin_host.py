"""One plugin in a real plugin host, through the author kit's `llmos_plugin` fixture: the
template, the two first-party plugins, bad calls, and the template's own test suite."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from llmos.plugins.testing import HostClient, llmos_plugin
from llmos.services.errors import error_info

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "plugins" / "template"
GUARD = REPO / "plugins" / "firstparty" / "llmos-policy-guard"
FAQ = REPO / "plugins" / "firstparty" / "llmos-faq"
TEST_PLUGINS = REPO / "tests" / "plugins"
Start = Callable[..., HostClient]
__all__ = ["llmos_plugin"]  # the fixture, used by name below


def test_the_template_runs_in_a_host_confined_to_its_manifest(llmos_plugin: Start) -> None:
    host = llmos_plugin(TEMPLATE)

    assert host.manifest()["name"] == "example"
    assert host.isolation().startswith("own ")  # network = false: its own namespace
    reply = host.call_hook("llmos_before_request", prompt="hi", tenant="acme", task_id="1")
    assert reply == {"prompt": "[acme] hi"}


def test_the_templates_own_tests_pass(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=TEMPLATE,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


def test_bad_calls_name_the_plugin_and_the_field(llmos_plugin: Start) -> None:
    host = llmos_plugin(TEMPLATE)

    with pytest.raises(grpc.RpcError) as unknown:
        host.call_hook("llmos_befor_request", prompt="x", tenant="t", task_id="1")
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(unknown.value)
    assert info is not None and info.reason == "UNKNOWN_HOOK"
    assert dict(info.metadata) == {"plugin": "example", "field": "hook"}

    with pytest.raises(grpc.RpcError) as not_listed:
        host.call_hook("llmos_after_request", prompt="x", tenant="t", task_id="1")
    assert not_listed.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    with pytest.raises(grpc.RpcError) as no_tool:
        host.invoke_tool("nothing")
    assert no_tool.value.code() == grpc.StatusCode.NOT_FOUND
    # Nothing else was affected.
    assert host.call_hook("llmos_before_request", prompt="y", tenant="t", task_id="2") == {
        "prompt": "[t] y"
    }


def test_a_tool_input_is_checked_against_its_schema_in_the_host(llmos_plugin: Start) -> None:
    host = llmos_plugin(TEST_PLUGINS / "calculator")

    (tool,) = host.list_tools()
    assert tool.name == "add"
    assert host.invoke_tool("add", a=1, b=2) == {"sum": 3}
    with pytest.raises(grpc.RpcError) as bad:
        host.invoke_tool("add", a=1, b=2, c=3)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Additional properties are not allowed" in bad.value.details()


def test_the_policy_guard_blocks_matching_prompts_with_a_verdict(llmos_plugin: Start) -> None:
    host = llmos_plugin(GUARD, config={"patterns": ["(?i)wire transfer"], "reason": "no payments"})

    manifest = host.manifest()
    granted = {name for name, value in manifest["capabilities"].items() if value}
    assert granted == {"read_prompt"}  # it can see the prompt, never change it
    blocked = host.call_hook(
        "llmos_before_request", prompt="Please make a Wire Transfer", tenant="t", task_id="1"
    )
    assert blocked == {"verdict": {"action": "block", "reason": "no payments ((?i)wire transfer)"}}
    assert host.call_hook("llmos_before_request", prompt="hello", tenant="t", task_id="2") == {}


def test_a_bad_pattern_stops_the_policy_guard_at_start(llmos_plugin: Start) -> None:
    with pytest.raises(RuntimeError) as failed:
        llmos_plugin(GUARD, config={"patterns": ["(unclosed"]})
    assert "exited with 3" in str(failed.value)
    assert "patterns[0] '(unclosed'" in str(failed.value)


def test_the_faq_plugin_cannot_embed_without_the_kernels_model_gateway(
    llmos_plugin: Start, tmp_path: Path
) -> None:
    faq = tmp_path / "faq.toml"
    faq.write_text('[[entry]]\nquestion = "How do I reset?"\nanswer = "Settings."\n')
    # Run alone, no kernel hands it a model gateway: call_model cannot be used.
    with pytest.raises(RuntimeError) as failed:
        llmos_plugin(FAQ, config={"faq_file": str(faq)})
    assert "crashed in llmos_startup" in str(failed.value)
    assert "CAPABILITY_MISSING" in str(failed.value) or "call_model" in str(failed.value)


def test_the_faq_ranking() -> None:
    sys.path.insert(0, str(FAQ / "src"))
    try:
        import llmos_faq
    finally:
        sys.path.remove(str(FAQ / "src"))

    vectors = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
    assert llmos_faq.best([1.0, 0.1], vectors, top_k=2, min_score=0.5) == [
        (0, pytest.approx(0.995, abs=1e-3)),
        (1, pytest.approx(0.676, abs=1e-3)),
    ]
    assert llmos_faq.best([-1.0, 0.0], vectors, top_k=2, min_score=0.5) == []
    prompt = llmos_faq.with_answers("Where is my order?", ["Track it under Orders."])
    assert prompt.endswith("Customer: Where is my order?")
    assert "- Track it under Orders." in prompt


def test_the_first_party_manifests_are_valid() -> None:
    from llmos.plugins.manifest import load_manifest_file

    for root, package in ((GUARD, "llmos_policy_guard"), (FAQ, "llmos_faq")):
        manifest = load_manifest_file(root / "src" / package / "llmos-plugin.toml")
        project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
        assert manifest.name in project["entry-points"]["llmos"]
