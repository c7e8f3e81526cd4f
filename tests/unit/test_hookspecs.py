"""The hookspecs: every hook documented in the one template and tested (the datasette idea),
and each hook's contract as pluggy sees it, in process (the plugin host's side is tested
on real hosts in tests/integration/test_plugin_host.py and test_plugins.py)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pluggy
import pytest

from llmos.plugins import hookspecs
from llmos.plugins.hookspecs import HOOKS, hookimpl

TESTS = Path(__file__).resolve().parents[1]
DOCS = TESTS.parent / "docs" / "plugins.md"
FIELDS = (":result:", ":firstresult:", ":capability:", ":versionadded:")


def manager(*plugins: object) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for plugin in plugins:
        pm.register(plugin)
    pm.check_pending()
    return pm


def declared_hooks() -> list[str]:
    return [
        name
        for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("llmos_")
    ]


def test_hooks_lists_every_hookspec_with_the_prefix() -> None:
    assert sorted(HOOKS) == sorted(declared_hooks())
    assert all(name.startswith("llmos_") for name in HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_has_a_docstring_in_the_template(name: str) -> None:
    function = getattr(hookspecs, name)
    doc = inspect.getdoc(function) or ""
    assert doc, f"{name} has no docstring"
    for field in FIELDS:
        assert field in doc, f"{name}'s docstring lacks {field}"
    for parameter in inspect.signature(function).parameters:
        assert f":param {parameter}:" in doc, f"{name}'s docstring lacks :param {parameter}:"


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_has_a_test_and_a_docs_entry(name: str) -> None:
    source = "\n".join(path.read_text(encoding="utf-8") for path in TESTS.rglob("test_*.py"))
    assert re.search(rf"def test_hook_{name}\b", source), f"no test named test_hook_{name}"
    assert f"`{name}`" in DOCS.read_text(encoding="utf-8"), f"{name} is not in docs/plugins.md"


def test_a_misspelt_hook_is_caught_at_registration() -> None:
    class Typo:
        @hookimpl
        def llmos_befor_request(self) -> None: ...

    with pytest.raises(pluggy.PluginValidationError, match="llmos_befor_request"):
        manager(Typo())


def test_hook_llmos_startup() -> None:
    seen: dict[str, Any] = {}

    class Plugin:
        @hookimpl
        def llmos_startup(self, config: dict[str, Any]) -> None:  # a subset of the arguments
            seen.update(config)

    manager(Plugin()).hook.llmos_startup(config={"patterns": ["x"]}, context=None)
    assert seen == {"patterns": ["x"]}


def test_hook_llmos_before_request() -> None:
    class Plugin:
        @hookimpl
        def llmos_before_request(self, prompt: str | None) -> dict[str, Any]:
            return {"prompt": f"[faq] {prompt}"}

    results = manager(Plugin()).hook.llmos_before_request(
        prompt="hi", messages=None, tenant="t", task_id="1"
    )
    assert results == [{"prompt": "[faq] hi"}]  # not firstresult: a list, one per plugin


def test_hook_llmos_after_request() -> None:
    class Plugin:
        @hookimpl
        def llmos_after_request(self, output: str | None) -> dict[str, Any] | None:
            return {"verdict": {"action": "block", "reason": "no"}} if output == "bad" else None

    pm = manager(Plugin())
    arguments = {"prompt": "p", "tenant": "t", "task_id": "1"}
    assert pm.hook.llmos_after_request(output="bad", **arguments)[0]["verdict"]["action"] == "block"
    assert pm.hook.llmos_after_request(output="good", **arguments) == []


def test_hook_llmos_on_task_event() -> None:
    events: list[tuple[str, str]] = []

    class Plugin:
        @hookimpl
        def llmos_on_task_event(self, task_id: str, state: str) -> None:
            events.append((task_id, state))

    manager(Plugin()).hook.llmos_on_task_event(task_id="1", tenant="t", state="FAILED", reason="x")
    assert events == [("1", "FAILED")]


def test_hook_llmos_register_tools() -> None:
    tools: list[str] = []

    class Plugin:
        @hookimpl
        def llmos_register_tools(self, register: Any) -> None:
            register("add", "Adds.", {"type": "object"}, lambda data: {})

    manager(Plugin()).hook.llmos_register_tools(
        register=lambda name, description, schema, function: tools.append(name)
    )
    assert tools == ["add"]


def test_hook_llmos_register_commands() -> None:
    commands: dict[str, Any] = {}

    class Plugin:
        @hookimpl
        def llmos_register_commands(self, register: Any) -> None:
            register("hello", "Says hello.", lambda args: "hello " + " ".join(args))

    manager(Plugin()).hook.llmos_register_commands(
        register=lambda name, help, function: commands.update({name: function})
    )
    assert commands["hello"](["you"]) == "hello you"
