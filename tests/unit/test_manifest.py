"""The manifest's validation (pure): a good manifest, defaults, and every bad field named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmos.plugins.manifest import ManifestError, load_manifest_file, parse_manifest

GOOD: dict[str, Any] = {
    "name": "faq",
    "version": "0.1.0",
    "api_versions": ["1"],
    "hooks": ["llmos_startup", "llmos_before_request"],
    "capabilities": {
        "read_prompt": True,
        "modify_prompt": True,
        "call_model": True,
        "network": False,
        "storage": {"quota_mb": 20},
    },
    "limits": {"timeout_ms": 500, "memory_mb": 256},
}


def test_a_good_manifest_and_its_defaults() -> None:
    manifest = parse_manifest(GOOD)
    assert manifest.capabilities == {"read_prompt", "modify_prompt", "call_model", "storage"}
    assert (manifest.storage_quota_mb, manifest.timeout_ms, manifest.memory_mb) == (20, 500, 256)
    assert manifest.to_json()["capabilities"]["storage"] == {"quota_mb": 20}
    assert parse_manifest(manifest.to_json()) == manifest  # GetManifest's form reads back

    bare = parse_manifest({"name": "x", "version": "1", "api_versions": ["1"]})
    assert (bare.hooks, bare.capabilities, bare.timeout_ms, bare.memory_mb) == (
        (),
        set(),
        1000,
        1024,
    )


def changed(**fields: Any) -> dict[str, Any]:
    return {**GOOD, **fields}


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        (changed(name="FAQ"), "name", "lower case"),
        (changed(version=""), "version", "non-empty"),
        (changed(api_versions=["2"]), "api_versions", "plugin API version '1'"),
        (changed(api_versions="1"), "api_versions", "list of strings"),
        (changed(hooks=["llmos_startup", "llmos_befor_request"]), "hooks[1]", "unknown hook"),
        (changed(hooks=["llmos_startup", "llmos_startup"]), "hooks", "twice"),
        (changed(hooks=["llmos_register_tools"]), "capabilities.register_tools", "must be true"),
        (
            changed(capabilities={"modify_prompt": True}),
            "capabilities.modify_prompt",
            "read_prompt",
        ),
        (changed(capabilities={"read_output": 1}), "capabilities.read_output", "true or false"),
        (changed(capabilities={"telepathy": True}), "capabilities.telepathy", "not a capability"),
        (changed(capabilities={"storage": True}), "capabilities.storage", "needs a quota"),
        (
            changed(capabilities={"storage": {"quota_mb": 0}}),
            "capabilities.storage.quota_mb",
            "1 to",
        ),
        (changed(limits={"timeout_ms": 0}), "limits.timeout_ms", "from 1 to 60000"),
        (changed(limits={"memory_mb": True}), "limits.memory_mb", "whole number"),
        (changed(limits={"cpu": 1}), "limits.cpu", "not a limit"),
        (changed(extra=1), "extra", "not a manifest field"),
    ],
)
def test_a_bad_field_is_named(data: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ManifestError) as refused:
        parse_manifest(data, source="pyproject.toml")
    assert refused.value.reason == "BAD_MANIFEST"
    assert refused.value.metadata["field"] == field
    assert f"field {field!r}" in refused.value.message and words in refused.value.message
    assert refused.value.metadata["plugin"] in ("faq", "?")


def test_files_pyproject_and_llmos_plugin_toml(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\n[tool.llmos.plugin]\nname = "x"\nversion = "1"\n'
        'api_versions = ["1"]\n',
        encoding="utf-8",
    )
    assert load_manifest_file(pyproject).name == "x"
    plain = tmp_path / "llmos-plugin.toml"
    plain.write_text('name = "y"\nversion = "1"\napi_versions = ["1"]\n', encoding="utf-8")
    assert load_manifest_file(plain).name == "y"

    pyproject.write_text('[project]\nname = "x"\n', encoding="utf-8")
    with pytest.raises(ManifestError, match=r"'tool\.llmos\.plugin' is missing"):
        load_manifest_file(pyproject, entry_point="x")
    plain.write_text("name = ", encoding="utf-8")
    with pytest.raises(ManifestError, match="cannot be read"):
        load_manifest_file(plain)
