"""pyproject.toml: every package listed, torch only in the runtime extra, ranges not pins.

The repository maps kernel/, services/, plugins/ and protos/llmos into the one name `llmos`
with setuptools' package-dir, and lists the packages by hand: a sub-package missing from
the list works in an editable install but is silently left out of a wheel or image.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers")
EXTRAS = ("runtime", "safety", "privacy", "hardware", "dev", "all")
# Imported by the kernel process and the CLI; none may pull the model runtime's libraries.
LIGHT_MODULES = (
    "llmos.kernel.server",
    "llmos.kernel.cli",
    "llmos.kernel.stack",
    "llmos.services.serve",
    # Imported by every process for its /metrics, the echo runtime included.
    "llmos.services.metrics",
    "llmos.kernel.metrics",
    "llmos.services.runtime.metrics",
)


@cache
def pyproject() -> dict[str, Any]:
    with (REPO / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


def extras() -> dict[str, list[str]]:
    optional: dict[str, list[str]] = pyproject()["project"]["optional-dependencies"]
    return optional


def requirements(group: str | None = None) -> list[Requirement]:
    """The base dependencies (group None) or one extra's, parsed."""
    project = pyproject()["project"]
    raw = project["dependencies"] if group is None else extras()[group]
    return [Requirement(line) for line in raw]


# ---------------------------------------------------------------- packages


def _distribution_files(relative: Path) -> list[Path]:
    """The pyproject.toml files that would make a folder (or one above it, inside the
    package-dir root) a distribution of its own."""
    return [
        Path(*relative.parts[:depth], "pyproject.toml") for depth in range(len(relative.parts) + 1)
    ]


def discovered_packages() -> dict[str, Path]:
    """Every folder with an __init__.py under a package-dir root, by its installed name."""
    mapping: dict[str, str] = pyproject()["tool"]["setuptools"]["package-dir"]
    found: dict[str, Path] = {}
    for name, folder in mapping.items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            relative = init.parent.relative_to(root)
            if any(part.startswith((".", "__")) for part in relative.parts):
                continue
            # A folder below a pyproject.toml of its own is a separate distribution (the
            # first-party plugins, the plugin template), not a package of llmos.
            if any((root / part).is_file() for part in _distribution_files(relative)):
                continue
            found[".".join([name, *relative.parts])] = init.parent
    return found


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    found = discovered_packages()
    missing = sorted(set(found) - listed)
    assert not missing, (
        "these folders have an __init__.py but are missing from [tool.setuptools] packages "
        f"in pyproject.toml, so a wheel would leave them out: {missing}"
    )


def test_every_listed_package_is_a_folder_with_an_init() -> None:
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    stale = sorted(listed - set(discovered_packages()))
    assert not stale, f"pyproject.toml lists packages with no folder and __init__.py: {stale}"


def test_package_dir_maps_the_top_level_folders_under_llmos() -> None:
    mapping = pyproject()["tool"]["setuptools"]["package-dir"]
    assert mapping == {
        "llmos": "protos/llmos",
        "llmos.kernel": "kernel",
        "llmos.services": "services",
        "llmos.plugins": "plugins",
    }


# ---------------------------------------------------------------- no torch in the kernel


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_importing_kernel_and_serve_modules_does_not_import_torch(module: str) -> None:
    probe = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    heavy = json.loads(result.stdout.strip().splitlines()[-1])
    assert not heavy, f"importing {module} imports {heavy[:5]}: the kernel image has no torch"


# ---------------------------------------------------------------- extras and versions


def test_the_extras_exist() -> None:
    assert set(EXTRAS) <= set(extras()), f"missing extras: {sorted(set(EXTRAS) - set(extras()))}"


def test_torch_is_only_in_the_runtime_extra() -> None:
    def names(group: str | None) -> set[str]:
        return {requirement.name.lower() for requirement in requirements(group)}

    assert "torch" in names("runtime")
    for group in [None, *extras()]:
        if group == "runtime":
            continue
        assert not names(group) & set(HEAVY), f"{group or 'dependencies'} pulls torch"


def test_all_installs_every_service_extra() -> None:
    (everything,) = requirements("all")
    assert everything.name == pyproject()["project"]["name"]
    assert everything.extras == set(extras()) - {"all", "dev"}


def test_dependencies_are_ranges_not_pins() -> None:
    pinned = [
        f"{group or 'dependencies'}: {requirement}"
        for group in [None, *extras()]
        for requirement in requirements(group)
        if any(spec.operator in ("==", "===") for spec in requirement.specifier)
    ]
    assert not pinned, f"pin versions in constraints.txt, not in pyproject.toml: {pinned}"


def test_constraints_fall_inside_the_declared_ranges() -> None:
    declared = [requirement for group in [None, *extras()] for requirement in requirements(group)]
    lines = (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines()
    for line in lines:
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        pin = Requirement(text)
        for version in [spec.version for spec in pin.specifier if spec.operator == "=="]:
            for requirement in declared:
                if requirement.name.lower() == pin.name.lower():
                    assert requirement.specifier.contains(version, prereleases=True), (
                        f"constraints.txt pins {pin}, outside pyproject.toml's {requirement}"
                    )
