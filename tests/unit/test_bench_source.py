"""bench/kernel.py records which code a run measured: the commit, and the tracked files under
kernel/ or services/ that differ from it, so that a figure taken with an edit in the tree
is never read as the commit's."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import ModuleType

from benchtools import bench_module


def _bench_kernel() -> ModuleType:
    return bench_module("kernel.py")


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def _repo(tmp_path: Path, files: list[str]) -> Path:
    _git(tmp_path, "init", "-q")
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "first")
    return tmp_path


def test_one_edited_kernel_file_is_reported(tmp_path: Path) -> None:
    """The case that went unreported: a single edited file, the first (and only) line of
    git's answer."""
    repo = _repo(tmp_path, ["kernel/store/sqlite.py", "docs/a.md"])
    (repo / "kernel/store/sqlite.py").write_text("x = 2\n")
    source = _bench_kernel().source(repo)
    assert source == {
        "commit": _git(repo, "rev-parse", "--short", "HEAD"),
        "uncommitted_code": ["kernel/store/sqlite.py"],
    }


def test_staged_code_edits_count_and_other_files_do_not(tmp_path: Path) -> None:
    repo = _repo(tmp_path, ["kernel/a.py", "services/b.py", "docs/c.md", "bench/d.py"])
    for name in ("kernel/a.py", "services/b.py", "docs/c.md", "bench/d.py"):
        (repo / name).write_text("x = 3\n")
    _git(repo, "add", "services/b.py")
    (repo / "kernel/new.py").write_text("untracked\n")
    assert _bench_kernel().source(repo)["uncommitted_code"] == ["kernel/a.py", "services/b.py"]


def test_a_clean_tree_reports_no_edits(tmp_path: Path) -> None:
    repo = _repo(tmp_path, ["kernel/a.py"])
    assert _bench_kernel().source(repo)["uncommitted_code"] == []
