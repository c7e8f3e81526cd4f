"""The plugin manifest: what a plugin is, which hooks it implements and what it may do.

A manifest is the `[tool.llmos.plugin]` table of the plugin's pyproject.toml, or the same
keys at the top level of an `llmos-plugin.toml` (which a wheel ships as package data):

    [tool.llmos.plugin]
    name = "faq"                       # ^[a-z][a-z0-9_-]{0,39}$
    version = "0.1.0"
    api_versions = ["1"]               # plugin API versions it supports
    hooks = ["llmos_startup", "llmos_before_request"]
    description = "..."                # optional

    [tool.llmos.plugin.capabilities]   # every one false unless granted here
    read_prompt = true
    modify_prompt = true
    call_model = true
    network = false
    storage = { quota_mb = 20 }        # or false

    [tool.llmos.plugin.limits]
    timeout_ms = 500                   # each hook call; default 1000, at most 60000
    memory_mb = 512                    # the host's address space; default 1024

Validation is pure (no I/O but reading the file in `load_manifest_file`, and never the
plugin's code) and every error is a `ManifestError` (INVALID_ARGUMENT, reason BAD_MANIFEST)
naming the plugin and the field (`capabilities.modify_prompt`, `hooks[1]`).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmos.plugins.hookspecs import API_VERSION, HOOK_REQUIRES, HOOKS
from llmos.services.errors import InvalidArgument

CAPABILITIES = (
    "read_prompt",
    "modify_prompt",
    "read_output",
    "modify_output",
    "call_model",
    "register_tools",
    "network",
    "storage",
)
# A capability that changes something needs the one that reads it.
NEEDS = {"modify_prompt": "read_prompt", "modify_output": "read_output"}
NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
FIELDS = ("name", "version", "api_versions", "hooks", "description", "capabilities", "limits")
LIMITS = {"timeout_ms": (1, 60_000, 1000), "memory_mb": (64, 65_536, 1024)}
MAX_QUOTA_MB = 1 << 20
MANIFEST_FILE = "llmos-plugin.toml"


class ManifestError(InvalidArgument):
    """A manifest that cannot be used: the message and metadata name plugin and field."""

    default_reason = "BAD_MANIFEST"


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A validated manifest. Frozen: the kernel shares it between tasks."""

    name: str
    version: str
    api_versions: tuple[str, ...]
    hooks: tuple[str, ...]
    capabilities: frozenset[str]
    storage_quota_mb: int = 0
    timeout_ms: int = 1000
    memory_mb: int = 1024
    description: str = ""

    def grants(self, capability: str) -> bool:
        return capability in self.capabilities

    def implements(self, hook: str) -> bool:
        return hook in self.hooks

    def to_json(self) -> dict[str, Any]:
        """The manifest in its TOML shape (what GetManifest serves and `plugins info` prints)."""
        capabilities: dict[str, Any] = {name: name in self.capabilities for name in CAPABILITIES}
        if "storage" in self.capabilities:
            capabilities["storage"] = {"quota_mb": self.storage_quota_mb}
        return {
            "name": self.name,
            "version": self.version,
            "api_versions": list(self.api_versions),
            "hooks": list(self.hooks),
            "description": self.description,
            "capabilities": capabilities,
            "limits": {"timeout_ms": self.timeout_ms, "memory_mb": self.memory_mb},
        }


def _error(plugin: str, field: str, message: str, source: str) -> ManifestError:
    where = f" ({source})" if source else ""
    return ManifestError(
        f"plugin {plugin!r} manifest{where}: field {field!r} {message}",
        metadata={"plugin": plugin, "field": field, "source": source},
    )


def _strings(plugin: str, field: str, raw: Any, source: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise _error(plugin, field, f"must be a list of strings, got {raw!r}", source)
    return tuple(raw)


def _whole(plugin: str, field: str, raw: Any, bounds: tuple[int, int], source: str) -> int:
    low, high = bounds
    if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:
        raise _error(
            plugin, field, f"must be a whole number from {low} to {high}, got {raw!r}", source
        )
    return raw


def parse_manifest(data: Mapping[str, Any], *, source: str = "", entry_point: str = "") -> Manifest:
    """Validate `data` (the `[tool.llmos.plugin]` table); `source` names the file and
    `entry_point` the plugin until its own name is known, for the errors."""
    plugin = entry_point or "?"
    if not isinstance(data, Mapping):
        raise _error(plugin, "tool.llmos.plugin", "must be a table", source)
    raw_name = data.get("name")
    if not isinstance(raw_name, str) or not NAME.match(raw_name):
        raise _error(
            plugin, "name", f"must match {NAME.pattern} (lower case), got {raw_name!r}", source
        )
    plugin = raw_name
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise _error(
            plugin, unknown[0], f"is not a manifest field; known: {', '.join(FIELDS)}", source
        )
    version = data.get("version")
    if not isinstance(version, str) or not version.strip():
        raise _error(plugin, "version", f"must be a non-empty string, got {version!r}", source)
    api_versions = _strings(plugin, "api_versions", data.get("api_versions"), source)
    if API_VERSION not in api_versions:
        raise _error(
            plugin,
            "api_versions",
            f"lists {list(api_versions)}, and this llmos serves plugin API version "
            f"{API_VERSION!r} only",
            source,
        )
    hooks = _hooks(plugin, data.get("hooks", []), source)
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _error(plugin, "description", f"must be a string, got {description!r}", source)
    capabilities, quota = _capabilities(plugin, data.get("capabilities", {}), source)
    for hook in hooks:
        needed = HOOK_REQUIRES.get(hook)
        if needed is not None and needed not in capabilities:
            raise _error(
                plugin, f"capabilities.{needed}", f"must be true to implement {hook}", source
            )
    limits = data.get("limits", {})
    if not isinstance(limits, Mapping):
        raise _error(plugin, "limits", f"must be a table, got {limits!r}", source)
    unknown = sorted(set(limits) - set(LIMITS))
    if unknown:
        raise _error(
            plugin, f"limits.{unknown[0]}", f"is not a limit; known: {', '.join(LIMITS)}", source
        )
    values = {
        key: _whole(plugin, f"limits.{key}", limits.get(key, default), (low, high), source)
        for key, (low, high, default) in LIMITS.items()
    }
    return Manifest(
        name=plugin,
        version=version,
        api_versions=api_versions,
        hooks=hooks,
        capabilities=capabilities,
        storage_quota_mb=quota,
        description=description,
        **values,
    )


def _capabilities(plugin: str, raw: Any, source: str) -> tuple[frozenset[str], int]:
    if not isinstance(raw, Mapping):
        raise _error(plugin, "capabilities", f"must be a table, got {raw!r}", source)
    granted: set[str] = set()
    quota = 0
    for key, value in raw.items():
        field = f"capabilities.{key}"
        if key not in CAPABILITIES:
            raise _error(
                plugin, field, f"is not a capability; known: {', '.join(CAPABILITIES)}", source
            )
        if key == "storage" and isinstance(value, Mapping):
            if set(value) != {"quota_mb"}:
                raise _error(plugin, field, "must be false or { quota_mb = N }", source)
            quota = _whole(
                plugin, f"{field}.quota_mb", value["quota_mb"], (1, MAX_QUOTA_MB), source
            )
            granted.add(key)
        elif key == "storage" and value is True:
            raise _error(plugin, field, "needs a quota: write storage = { quota_mb = N }", source)
        elif not isinstance(value, bool):
            raise _error(plugin, field, f"must be true or false, got {value!r}", source)
        elif value:
            granted.add(key)
    for capability, needed in NEEDS.items():
        if capability in granted and needed not in granted:
            raise _error(
                plugin,
                f"capabilities.{capability}",
                f"needs {needed} too: a plugin cannot change what it may not read",
                source,
            )
    return frozenset(granted), quota


def manifest_table(path: Path, data: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The manifest table in a parsed file: `[tool.llmos.plugin]` of a pyproject.toml,
    the whole of an llmos-plugin.toml; None when a pyproject.toml has none."""
    if path.name != "pyproject.toml":
        return data
    table = data.get("tool", {}).get("llmos", {}).get("plugin")
    return table if isinstance(table, Mapping) else None


def load_manifest_file(path: Path, *, entry_point: str = "") -> Manifest:
    """Read and validate the manifest in `path` (pyproject.toml or llmos-plugin.toml)."""
    plugin = entry_point or "?"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise _error(plugin, "tool.llmos.plugin", f"cannot be read: {error}", str(path)) from error
    table = manifest_table(path, data)
    if table is None:
        raise _error(plugin, "tool.llmos.plugin", "is missing", str(path))
    return parse_manifest(table, source=str(path), entry_point=entry_point)


def _hooks(plugin: str, raw: Any, source: str) -> tuple[str, ...]:
    hooks = _strings(plugin, "hooks", raw, source)
    for index, hook in enumerate(hooks):
        if hook not in HOOKS:
            raise _error(
                plugin,
                f"hooks[{index}]",
                f"names unknown hook {hook!r}; known: {', '.join(HOOKS)}",
                source,
            )
    if len(set(hooks)) != len(hooks):
        raise _error(plugin, "hooks", "names a hook twice", source)
    return hooks
