"""bench/ab.py lays each side's code out as the installed package, and a process with that
folder first on PYTHONPATH imports that code, not the checkout's editable install (else an
A/B would measure the same code twice and find it equal)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType

from benchtools import bench_module

REPO = Path(__file__).resolve().parents[2]


def _ab() -> ModuleType:
    return bench_module("ab.py")


def _imported_from(site: Path, module: str) -> str:
    found = subprocess.run(
        [sys.executable, "-c", f"import {module} as m; print(m.__file__)"],
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    return found.stdout.strip()


def test_a_revision_is_laid_out_as_installed_and_imported_first(tmp_path: Path) -> None:
    ab = _ab()
    described = ab.lay_out("HEAD", tmp_path)
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert described == head
    site = tmp_path / "site"
    store = site / "llmos" / "kernel" / "store" / "sqlite.py"
    committed = subprocess.run(
        ["git", "-C", str(REPO), "show", "HEAD:kernel/store/sqlite.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert store.read_text() == committed
    assert _imported_from(site, "llmos.kernel.store.sqlite") == str(store)
    assert _imported_from(site, "llmos.v1.kernel_pb2") == str(
        site / "llmos" / "v1" / "kernel_pb2.py"
    )


def _scratch_repo(root: Path) -> Path:
    """A git repository with the project's kind of package-dir mapping and one commit."""
    repo = root / "repo"
    (repo / "protos" / "pkg").mkdir(parents=True)
    (repo / "core").mkdir()
    (repo / "pyproject.toml").write_text(
        '[tool.setuptools]\npackage-dir = { "pkg" = "protos/pkg", "pkg.core" = "core" }\n'
    )
    (repo / "protos" / "pkg" / "__init__.py").write_text("")
    (repo / "core" / "__init__.py").write_text("VERSION = 'committed'\n")

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=True)

    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    return repo


def test_each_side_is_its_revision_or_the_worktree_with_uncommitted_changes(
    tmp_path: Path,
) -> None:
    ab = _ab()
    repo = _scratch_repo(tmp_path)
    (repo / "core" / "__init__.py").write_text("VERSION = 'changed'\n")
    (repo / "core" / "new.py").write_text("NEW = True\n")  # untracked, not ignored

    committed = ab.lay_out("HEAD", tmp_path / "a", repo=repo)
    changed = ab.lay_out(ab.WORKTREE, tmp_path / "b", repo=repo)

    assert changed == f"{committed}+worktree"
    a_core, b_core = (tmp_path / side / "site" / "pkg" / "core" for side in ("a", "b"))
    assert (a_core / "__init__.py").read_text() == "VERSION = 'committed'\n"
    assert not (a_core / "new.py").exists()
    assert (b_core / "__init__.py").read_text() == "VERSION = 'changed'\n"
    assert (b_core / "new.py").read_text() == "NEW = True\n"
