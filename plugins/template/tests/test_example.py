"""The plugin in a real plugin host, as the kernel runs it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from llmos.plugins.testing import HostClient

PLUGIN = Path(__file__).resolve().parents[1]


def test_the_prompt_is_tagged(llmos_plugin: Callable[..., HostClient]) -> None:
    host = llmos_plugin(PLUGIN)
    result = host.call_hook("llmos_before_request", prompt="hello", tenant="acme", task_id="1")
    assert result == {"prompt": "[acme] hello"}


def test_the_manifest_is_served(llmos_plugin: Callable[..., HostClient]) -> None:
    host = llmos_plugin(PLUGIN)
    assert host.manifest()["capabilities"]["modify_prompt"] is True
