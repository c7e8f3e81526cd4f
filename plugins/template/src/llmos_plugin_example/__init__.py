"""An llmos plugin: tags each prompt with the tenant's name (read_prompt, modify_prompt)."""

from __future__ import annotations

from typing import Any

from llmos.plugins.hookspecs import hookimpl


@hookimpl
def llmos_before_request(prompt: str | None, tenant: str) -> dict[str, Any] | None:
    if prompt is None:  # the manifest lost read_prompt
        return None
    return {"prompt": f"[{tenant}] {prompt}"}
