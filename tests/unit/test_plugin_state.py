"""The operator-disabled plugin list kept across restarts (kernel/plugin_state.py): what is
written, what a new kernel reads back, and that a damaged file does not stop a start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmos.kernel.plugin_state import FILE_NAME, PluginState


def test_disabled_names_are_written_and_read_back(tmp_path: Path) -> None:
    state = PluginState(tmp_path / "plugins")
    assert state.disabled == set()
    assert not state.path.exists()  # nothing written until something changes

    state.set_disabled("faq", True)
    state.set_disabled("guard", True)
    state.set_disabled("faq", False)

    assert json.loads(state.path.read_text(encoding="utf-8")) == {"disabled": ["guard"]}
    assert PluginState(tmp_path / "plugins").disabled == {"guard"}  # as a restart reads it
    assert [p.name for p in (tmp_path / "plugins").iterdir()] == [FILE_NAME]  # no temp left


@pytest.mark.parametrize("text", ["{not json", '["a list"]', '{"disabled": [1, "ok"]}', "\xff"])
def test_a_damaged_file_is_ignored_not_fatal(tmp_path: Path, text: str) -> None:
    (tmp_path / FILE_NAME).write_text(text, encoding="latin-1")
    expected = {"ok"} if "ok" in text else set()
    assert PluginState(tmp_path).disabled == expected
