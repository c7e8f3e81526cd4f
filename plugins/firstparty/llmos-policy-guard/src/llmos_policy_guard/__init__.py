"""policy-guard: refuse prompts that match the operator's patterns, with a verdict.

Settings, in `<data_dir>/plugins/policy-guard.toml`:

    patterns = ["(?i)\\bwire transfer\\b", "(?i)password"]   # Python regular expressions
    reason = "this assistant does not handle payments"        # optional

It needs `read_prompt` only: it answers with a verdict and never changes the prompt.
"""

from __future__ import annotations

import re
from typing import Any

from llmos.plugins.hookspecs import hookimpl

_patterns: list[re.Pattern[str]] = []
_settings = {"reason": "the prompt matches a blocked pattern"}


def configure(config: dict[str, Any]) -> None:
    """Compile the patterns; a bad one stops the plugin at start, naming it."""
    patterns = config.get("patterns", [])
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ValueError("policy-guard: setting 'patterns' must be a list of strings")
    compiled = []
    for index, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f"policy-guard: patterns[{index}] {pattern!r}: {error}") from error
    _patterns[:] = compiled
    _settings["reason"] = str(config.get("reason", _settings["reason"]))


def verdict(prompt: str) -> dict[str, Any] | None:
    """A block verdict naming the first matching pattern, or None."""
    for pattern in _patterns:
        if pattern.search(prompt):
            return {
                "verdict": {
                    "action": "block",
                    "reason": f"{_settings['reason']} ({pattern.pattern})",
                }
            }
    return None


@hookimpl
def llmos_startup(config: dict[str, Any]) -> None:
    configure(config)


@hookimpl
def llmos_before_request(prompt: str | None) -> dict[str, Any] | None:
    return verdict(prompt or "")
