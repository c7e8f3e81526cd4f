"""What operators switched off with `llmos plugins disable`, kept across kernel restarts.

One small JSON file, `<data_dir>/plugins/state.json`: `{"disabled": ["name", ...]}`.
`llmos plugins disable NAME` adds the plugin's name and `enable` removes it, so a plugin
an operator turned off stays off after a restart (and one turned back on starts). A
plugin the kernel disabled itself after repeated crashes is not written here: a restart
gives it a fresh start, as a restart of any crashing process would.

Every write is atomic (a temporary file in the same folder, flushed to disk, then
renamed over the old one), so a kernel killed mid-write leaves the old list or the new
one, never half of one. An unreadable file is reported once and treated as empty: a
damaged state file must not stop the kernel from starting.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = "state.json"


class PluginState:
    """The operator-disabled plugin names, read at start and written on every change."""

    def __init__(self, plugins_dir: Path) -> None:
        self.path = plugins_dir / FILE_NAME
        self.disabled: set[str] = self._read()

    def _read(self) -> set[str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return set()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            log.error("plugin state %s unreadable, ignored: %s", self.path, error)
            return set()
        names = data.get("disabled", []) if isinstance(data, dict) else []
        return {name for name in names if isinstance(name, str)}

    def set_disabled(self, name: str, disabled: bool) -> None:
        """Record `name` as disabled by an operator (or not), on disk before returning."""
        before = set(self.disabled)
        if disabled:
            self.disabled.add(name)
        else:
            self.disabled.discard(name)
        if self.disabled != before:
            self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"disabled": sorted(self.disabled)}, indent=2) + "\n"
        handle, partial = tempfile.mkstemp(prefix=".state-", dir=self.path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            raise
