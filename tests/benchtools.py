"""Load a bench/ script as a module for a unit test (bench/ holds scripts, not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def bench_module(script: str) -> ModuleType:
    """bench/`script` as a module named `bench_<stem>`. bench/ is on sys.path meanwhile (a
    script may import its neighbours, as ab.py imports kernel.py), and the module is in
    sys.modules while it runs (dataclasses look their module up as they are made)."""
    name = f"bench_{Path(script).stem}"
    spec = importlib.util.spec_from_file_location(name, BENCH / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
        sys.path.remove(str(BENCH))
    return module
