"""Finding installed plugins: the entry-point group `llmos`, their manifests, allow and deny lists.

Nothing here imports a plugin's code (simonw/llm #1280: one plugin failing at import made
the whole CLI unusable; #732: plugins slowed start-up from 1.3 s to 10.7 s). A plugin's
manifest is found from package metadata and the file system only:

1. an `llmos-plugin.toml` among the distribution's installed files (a wheel ships it as
   package data);
2. else the entry point's module is located with `importlib.util.find_spec` on its
   top-level package (which finds, never executes), and the manifest is looked for there:
   `llmos-plugin.toml` in the package's folder, or a `pyproject.toml` with
   `[tool.llmos.plugin]` in it or up to three folders above (source and editable
   installs).

Allow and deny lists (settings `load_plugins` / `disabled_plugins`, i.e.
LLMOS_LOAD_PLUGINS / LLMOS_DISABLED_PLUGINS) match a plugin's manifest name, entry-point
name or distribution name. `load_plugins` is `*` (all) by default; empty loads none.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path

from llmos.plugins.manifest import (
    MANIFEST_FILE,
    Manifest,
    ManifestError,
    load_manifest_file,
    manifest_table,
)

GROUP = "llmos"
ALL = "*"


@dataclasses.dataclass(frozen=True)
class Discovered:
    """One entry point of the group, with its manifest or why it cannot be used."""

    entry_point: str
    # "module" or "module:attribute": what the plugin host imports.
    value: str
    distribution: str
    manifest: Manifest | None
    manifest_path: str
    error: ManifestError | None = None
    # Why configuration keeps it from loading ("" when it may load).
    blocked: str = ""

    @property
    def name(self) -> str:
        """The manifest's name, or the entry point's when the manifest is unusable."""
        return self.manifest.name if self.manifest is not None else self.entry_point

    def known_as(self) -> set[str]:
        return {self.name, self.entry_point, self.distribution}


def _distribution_manifest(dist: importlib.metadata.Distribution | None) -> Path | None:
    if dist is None:
        return None
    for file in dist.files or ():
        if file.name == MANIFEST_FILE:
            return Path(str(dist.locate_file(file)))
    return None


def _module_folder(value: str) -> Path | None:
    """The folder of the entry point's module, found without importing it."""
    module = value.partition(":")[0].strip()
    top, _, rest = module.partition(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
        for part in rest.split(".") if rest else ():
            if (folder / part).is_dir():
                folder = folder / part
        return folder
    return Path(spec.origin).parent if spec.origin else None


def _has_table(pyproject: Path) -> bool:
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return True  # let load_manifest_file report it, naming the file
    return manifest_table(pyproject, data) is not None


def find_manifest(value: str, dist: importlib.metadata.Distribution | None) -> Path | None:
    """Where the manifest of the entry point `value` is, or None."""
    shipped = _distribution_manifest(dist)
    if shipped is not None:
        return shipped
    folder = _module_folder(value)
    if folder is None:
        return None
    if (folder / MANIFEST_FILE).is_file():
        return folder / MANIFEST_FILE
    for parent in [folder, *list(folder.parents)[:3]]:
        if parent.name in ("site-packages", "dist-packages"):
            break
        pyproject = parent / "pyproject.toml"
        if pyproject.is_file() and _has_table(pyproject):
            return pyproject
    return None


def _blocked(found: Discovered, load: Sequence[str], disabled: Sequence[str]) -> str:
    names = found.known_as()
    denied = sorted(names & set(disabled))
    if denied:
        return f"named in disabled_plugins (LLMOS_DISABLED_PLUGINS): {denied[0]}"
    if ALL not in load and not names & set(load):
        shown = ", ".join(load) or "empty"
        return f"not named in load_plugins (LLMOS_LOAD_PLUGINS: {shown})"
    return ""


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=GROUP)


def discover(load: Sequence[str] = (ALL,), disabled: Sequence[str] = ()) -> list[Discovered]:
    """Every plugin of the entry-point group, in name order, manifests read and checked."""
    found: list[Discovered] = []
    seen: set[str] = set()
    for point in _entry_points():
        if point.name in seen:  # the same distribution on the path twice
            continue
        seen.add(point.name)
        dist = point.dist
        dist_name = dist.metadata["Name"] if dist is not None else ""
        path = find_manifest(point.value, dist)
        manifest: Manifest | None = None
        error: ManifestError | None = None
        if path is None:
            error = ManifestError(
                f"plugin {point.name!r} ({point.value}) has no manifest: add [tool.llmos.plugin] "
                f"to its pyproject.toml or ship an {MANIFEST_FILE} in its package",
                metadata={"plugin": point.name, "field": "tool.llmos.plugin", "source": ""},
            )
        else:
            try:
                manifest = load_manifest_file(path, entry_point=point.name)
            except ManifestError as bad:
                error = bad
        entry = Discovered(
            entry_point=point.name,
            value=point.value,
            distribution=dist_name,
            manifest=manifest,
            manifest_path=str(path or ""),
            error=error,
        )
        found.append(dataclasses.replace(entry, blocked=_blocked(entry, load, disabled)))
    names = [entry.name for entry in found]

    def points(name: str) -> list[str]:
        return sorted(e.entry_point for e in found if e.name == name)

    return sorted(
        (
            entry
            if names.count(entry.name) == 1 or entry.manifest is None
            else dataclasses.replace(
                entry,
                manifest=None,
                error=ManifestError(
                    f"plugin {entry.name!r}: two installed plugins use this name "
                    f"(entry points {points(entry.name)}); "
                    "uninstall one",
                    metadata={"plugin": entry.name, "field": "name", "source": entry.manifest_path},
                ),
            )
            for entry in found
        ),
        key=lambda entry: entry.name,
    )


def by_entry_point(name: str) -> importlib.metadata.EntryPoint:
    """The entry point `name` of the group (for the plugin host, which imports it)."""
    for point in _entry_points():
        if point.name == name:
            return point
    raise LookupError(f"no entry point {name!r} in group {GROUP!r}")
