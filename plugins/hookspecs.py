"""The hooks a plugin may implement: every hook's name, arguments, result and capability.

Hooks are pluggy hooks with the prefix `llmos_`, grouped by lifecycle: start-up, before and
after a request, task events, registration. Each docstring follows one template, which
tests/unit/test_hookspecs.py checks for every hook (and that each hook has a test):

    One line: what the hook is for.

    :param NAME: what it is (one line per parameter).
    :result: what to return, or "None".
    :firstresult: yes or no, and what that means here.
    :capability: the manifest capability the hook needs, or "none".
    :versionadded: the plugin API version that introduced it.

A plugin runs in its own plugin-host process (llmos.plugins.host); the kernel calls its
hooks over gRPC with JSON-like arguments, so every argument and result is plain JSON data
(dicts, lists, strings, numbers, booleans, None) except the registration callbacks, which
the host hands in. The kernel checks what comes back against the plugin's manifest: a
result the manifest does not allow is dropped and recorded as a violation, never applied.

Registration hooks take a callback (`register`), as in simonw/llm: an implementation
accepts any subset of a hook's arguments, so adding an argument later breaks nobody.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "llmos"
# The plugin API version this llmos serves; a manifest lists the versions it supports.
API_VERSION = "1"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

JSON = dict[str, Any]


# ---------------------------------------------------------------- start-up


@hookspec
def llmos_startup(config: JSON, context: Any) -> None:
    """Prepare the plugin once its host has loaded it, before any other hook is called.

    :param config: the operator's settings for this plugin, from
        ``<data_dir>/plugins/<name>.toml`` (an empty dict when there is none).
    :param context: a ``llmos.plugins.host.PluginContext``: ``embed(texts)`` through the
        runtime (raises PermissionDenied without ``call_model``) and ``storage_dir`` (None
        without ``storage``).
    :result: None. An exception stops the host, which the kernel records as a crash.
    :firstresult: no; the host has one plugin, and its return value is ignored.
    :capability: none (what it may use through ``context`` follows the manifest).
    :versionadded: 1
    """


# ---------------------------------------------------------------- a request


@hookspec
def llmos_before_request(
    prompt: str | None, messages: list[JSON] | None, tenant: str, task_id: str
) -> JSON | None:
    """Read or change a request's prompt, or refuse it, before the safety stage sees it.

    :param prompt: the prompt (for a chat request, its last message's content); None
        without ``read_prompt``.
    :param messages: a chat request's messages as ``{"role", "content"}`` dicts, read-only;
        None for a plain prompt or without ``read_prompt``.
    :param tenant: the tenant the request belongs to.
    :param task_id: the kernel's task id, for the plugin's own logs.
    :result: None (no change), or a dict with ``prompt`` (the new prompt; needs
        ``modify_prompt``) and/or ``verdict`` (``{"action": "block" | "allow", "reason":
        str}``; a block refuses the request with PERMISSION_DENIED / REFUSED_BY_PLUGIN).
    :firstresult: no; every enabled plugin runs, in name order, each seeing the prompt as
        the one before left it. A block stops the request at once.
    :capability: ``read_prompt`` to receive the prompt, ``modify_prompt`` to change it.
    :versionadded: 1
    """


@hookspec
def llmos_after_request(
    prompt: str | None, output: str | None, tenant: str, task_id: str
) -> JSON | None:
    """Read a request's output once the model has finished, or refuse the result.

    :param prompt: the prompt the model answered; None without ``read_prompt``.
    :param output: the whole output; None without ``read_output``.
    :param tenant: the tenant the request belongs to.
    :param task_id: the kernel's task id.
    :result: None, or a dict with ``verdict`` (a block fails the task with
        PERMISSION_DENIED / REFUSED_BY_PLUGIN) and/or ``output`` (the new output; needs
        ``modify_output``). While an enabled plugin implementing this hook holds
        ``modify_output``, the kernel holds each request's output until the hooks have
        run, then delivers the output as they left it (a stream gets it in one piece).
    :firstresult: no; every enabled plugin runs, in name order.
    :capability: ``read_output`` to receive the output (``read_prompt`` for the prompt).
    :versionadded: 1
    """


# ---------------------------------------------------------------- task events


@hookspec
def llmos_on_task_event(task_id: str, tenant: str, state: str, reason: str) -> None:
    """Learn that a task changed state (for metering or notifications).

    Called after the state is stored, in the background: the task never waits for it, and
    a failure or timeout (the manifest's ``timeout_ms``) is counted and logged, never
    passed on to the task. Events reach one plugin in the order they happened.

    :param task_id: the task.
    :param tenant: its tenant.
    :param state: the state it entered: ``QUEUED``, ``RUNNING``, ``SUCCEEDED``,
        ``FAILED`` or ``CANCELLED``.
    :param reason: why, when it did not succeed (empty otherwise).
    :result: None; a return value is ignored.
    :firstresult: no; every enabled plugin implementing it is told.
    :capability: none.
    :versionadded: 1
    """


# ---------------------------------------------------------------- registration


@hookspec
def llmos_register_tools(register: Callable[..., None]) -> None:
    """Offer tools: functions clients call through the kernel's InvokeTool.

    :param register: call ``register(name, description, input_schema, function)`` once per
        tool; ``input_schema`` is a JSON Schema (an object schema) the kernel validates
        every input against, and ``function(input: dict) -> dict`` runs the tool.
    :result: None.
    :firstresult: no.
    :capability: ``register_tools``.
    :versionadded: 1
    """


@hookspec
def llmos_register_commands(register: Callable[..., None]) -> None:
    """Offer commands for the ``llmos`` command line, run inside the plugin's host.

    ``llmos plugins commands`` lists them; ``llmos plugins run PLUGIN NAME [ARGS...]``
    runs one, with the manifest's ``timeout_ms``, and prints what it returns.

    :param register: call ``register(name, help, function)`` once per command (``name``
        lower case, letters, digits, ``-`` and ``_``); ``function(args: list[str]) -> str``
        gets the words after the name and returns the text to print.
    :result: None.
    :firstresult: no.
    :capability: none.
    :versionadded: 1
    """


# Every hook, in the order above; the manifest's `hooks` must name these.
HOOKS: tuple[str, ...] = (
    "llmos_startup",
    "llmos_before_request",
    "llmos_after_request",
    "llmos_on_task_event",
    "llmos_register_tools",
    "llmos_register_commands",
)
# The capability a plugin must hold to implement a hook at all (others need none to run).
HOOK_REQUIRES: dict[str, str] = {"llmos_register_tools": "register_tools"}
