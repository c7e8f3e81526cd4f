"""Capability rules for plugin hooks: what a plugin is sent, and what of its answer counts.

Pure logic (no I/O), so every rule is unit-tested without a plugin host:

- what goes out: a plugin without `read_prompt` is never sent the prompt or the messages,
  one without `read_output` never the output (the kernel leaves them out of the call; the
  host passes None);
- what comes back: a result is None/{} (no change) or a dict with `prompt` / `output`
  (a string) and `verdict` ({"action": "block" | "allow", "reason": str}). A field the
  manifest does not allow (a changed prompt without `modify_prompt`) is dropped and
  reported as a violation; a malformed result (wrong type, unknown key) is a
  `BadPluginResult` naming the plugin and the field, which the kernel treats as a failed
  call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llmos.plugins.manifest import Manifest
from llmos.services.errors import LlmosError

BEFORE = "llmos_before_request"
AFTER = "llmos_after_request"
# What each hook may return, and the capability each field needs.
RESULT_FIELDS = {
    BEFORE: {"prompt": "modify_prompt", "verdict": ""},
    AFTER: {"output": "modify_output", "verdict": ""},
}
ACTIONS = ("allow", "block")


class BadPluginResult(LlmosError):
    """A plugin answered with something that is not a valid result."""

    default_reason = "PLUGIN_BAD_RESULT"


@dataclasses.dataclass(frozen=True)
class Checked:
    """A result after the manifest's rules: what to apply, and what was dropped."""

    # The new text (prompt or output), or None when it stays as it was.
    text: str | None = None
    blocked: bool = False
    reason: str = ""
    # Capabilities the plugin lacked for what it tried, e.g. ("modify_prompt",).
    violations: tuple[str, ...] = ()


def hook_arguments(
    manifest: Manifest,
    hook: str,
    *,
    tenant: str,
    task_id: str,
    prompt: str,
    messages: list[dict[str, str]] | None = None,
    output: str | None = None,
) -> dict[str, Any]:
    """The arguments `manifest`'s plugin is sent for `hook`: only what it may read."""
    arguments: dict[str, Any] = {"tenant": tenant, "task_id": task_id}
    if manifest.grants("read_prompt"):
        arguments["prompt"] = prompt
        if hook == BEFORE and messages is not None:
            arguments["messages"] = messages
    if hook == AFTER and manifest.grants("read_output") and output is not None:
        arguments["output"] = output
    return arguments


def check_result(manifest: Manifest, hook: str, text: str, result: Any) -> Checked:
    """Apply the manifest to `result`, the answer to `hook` about `text` (the prompt
    before the model, the output after it)."""
    plugin = manifest.name

    def bad(field: str, why: str) -> BadPluginResult:
        return BadPluginResult(
            f"plugin {plugin!r} answered {hook} with a bad result: field {field!r} {why}",
            metadata={"plugin": plugin, "field": field},
        )

    if result is None:
        return Checked()
    if not isinstance(result, dict):
        raise bad("result", f"must be an object, got {type(result).__name__}")
    allowed = RESULT_FIELDS[hook]
    for key in result:
        if key not in allowed:
            raise bad(key, f"is not a result field of {hook}; known: {', '.join(allowed)}")
    violations: list[str] = []
    new_text: str | None = None
    field = "prompt" if hook == BEFORE else "output"
    if field in result:
        value = result[field]
        if not isinstance(value, str):
            raise bad(field, f"must be a string, got {type(value).__name__}")
        if value != text:
            if manifest.grants(allowed[field]):
                new_text = value
            else:
                violations.append(allowed[field])
    blocked, reason = _verdict(result.get("verdict"), bad) if "verdict" in result else (False, "")
    return Checked(text=new_text, blocked=blocked, reason=reason, violations=tuple(violations))


def _verdict(verdict: Any, bad: Any) -> tuple[bool, str]:
    """(blocked, reason) from a result's `verdict`; `bad(field, why)` makes the error."""
    if not isinstance(verdict, dict):
        raise bad("verdict", f"must be an object, got {type(verdict).__name__}")
    action = verdict.get("action")
    if action not in ACTIONS:
        raise bad("verdict.action", f"must be one of {', '.join(ACTIONS)}, got {action!r}")
    reason = verdict.get("reason", "")
    if not isinstance(reason, str):
        raise bad("verdict.reason", f"must be a string, got {type(reason).__name__}")
    unknown = sorted(set(verdict) - {"action", "reason"})
    if unknown:
        raise bad(f"verdict.{unknown[0]}", "is not a verdict field; known: action, reason")
    return action == "block", reason
