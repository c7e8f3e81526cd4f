"""Two versions of the kernel side by side at saturation: a paired A/B, as JSON.

    python bench/ab.py A B [--pairs 16] [--window-s 3] [--concurrency 32] [--requests 400]
                           [--prompt ping] [--models DIR] [--b-first]

A and B are git revisions, or `WORKTREE` for the checkout as it is (uncommitted changes
included). Each is laid out as the installed package would be (pyproject.toml's
`package-dir`) in a folder of its own and put first on PYTHONPATH for its stack: two
`llmos up` stacks with the echo runtime and the pipeline stages off, as bench/kernel.py's
stages_off phase, up at the same time on their own ports and data directories.

Why paired windows: on these shared 2-core machines the speed drifts by a fifth from minute
to minute, more than most changes a round tries (bench/kernel.py's module doc), so two runs
of bench/kernel.py one after the other cannot tell a 3% change from noise. Here the
saturation time is cut into `--pairs` pairs of `--window-s` windows, one per stack,
taken back to back in ABBA order (A first in even pairs, B first in odd ones); each pair's
ratio B/A of completed calls per second meets the same minute of the machine. Reported:
each side's median calls/s and kernel CPU per call, and the pairs' median ratio, its
spread, and how many pairs B won. The same code on both sides gives the noise floor.

`--requests` sequential calls, alternating A and B one by one, give each side's p50 and p99
of a unary-ish Generate (0 skips them).

The stack started second tends to measure faster (HEAD against itself, 2026-12-01: B/A
1.018, 10 of 16 pairs; bench/kernel.py's doc saw the same), so a small difference is worth
a second run with `--b-first`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel as bench  # bench/kernel.py: its stacks, calls and timings

WORKTREE = "WORKTREE"


def lay_out(rev: str, into: Path, repo: Path = bench.REPO) -> str:
    """Lay `rev`'s packages (of `repo`) out under `into/site` as installed; the commit it
    names."""
    source = into / "source"
    source.mkdir(parents=True)

    def git(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=True)

    if rev == WORKTREE:
        for name in git("ls-files", "-co", "--exclude-standard", "-z").stdout.split(b"\0"):
            origin = repo / os.fsdecode(name)
            if name and origin.is_file():
                (source / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, source / os.fsdecode(name))
        described = git("rev-parse", "--short", "HEAD").stdout.decode().strip() + "+worktree"
    else:
        subprocess.run(
            ["tar", "-x", "-C", str(source)], input=git("archive", rev).stdout, check=True
        )
        described = git("rev-parse", "--short", rev).stdout.decode().strip()
    config = tomllib.loads((source / "pyproject.toml").read_text())
    mapping: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    site = into / "site"
    # Parents before children, so a child's folder lands inside its parent's copy.
    for package, folder in sorted(mapping.items(), key=lambda item: item[0].count(".")):
        target = site.joinpath(*package.split("."))
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source / folder, target)
    return described


@contextlib.contextmanager
def first_on_path(site: Path) -> Iterator[None]:
    """Processes started inside import `site`'s packages (their children inherit it)."""
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), *([previous] if previous else [])])
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous


async def sequential(calls: dict[str, bench.Call], requests: int) -> dict[str, dict[str, Any]]:
    """`requests` calls per side, alternating sides call by call."""
    timings = {name: bench.Timings() for name in calls}
    for call in calls.values():  # warm both
        for _ in range(20):
            await bench.Timings().time(call)
    for _ in range(requests):
        for name, call in calls.items():
            await timings[name].time(call)
    return {name: bench.latency_summary(t.seconds, t.errors) for name, t in timings.items()}


async def saturation(
    stacks: dict[str, bench.KernelStack], pairs: int, window_s: float, concurrency: int
) -> dict[str, Any]:
    """Paired windows in ABBA order; each side's figures and the pairs' ratios B/A."""
    rates: dict[str, list[float]] = {name: [] for name in stacks}
    cpu_ms: dict[str, list[float]] = {name: [] for name in stacks}
    errors: dict[str, collections.Counter[str]] = {name: collections.Counter() for name in stacks}
    names = list(stacks)
    for pair in range(pairs):
        for name in names if pair % 2 == 0 else names[::-1]:
            stack, window = stacks[name], bench.Load()
            kernel = {"kernel": stack.targets.pids["kernel"]}
            await window.window(stack.targets.calls["kernel"], concurrency, window_s, kernel)
            done = len(window.timings.seconds)
            rates[name].append(done / window.wall_s)
            cpu_ms[name].append(1000 * window.cpu_s["kernel"] / max(done, 1))
            errors[name].update(window.timings.errors)
    a, b = names
    ratios = [rb / ra for ra, rb in zip(rates[a], rates[b], strict=True)]
    return {
        "per_side": {
            name: {
                "calls_per_s_median": round(statistics.median(rates[name]), 1),
                "kernel_cpu_ms_per_call_median": round(statistics.median(cpu_ms[name]), 3),
                "errors": dict(errors[name]),
            }
            for name in names
        },
        "ratio_b_over_a": {
            "median": round(statistics.median(ratios), 4),
            "mean": round(statistics.fmean(ratios), 4),
            "min": round(min(ratios), 4),
            "max": round(max(ratios), 4),
            "pairs_b_faster": sum(ratio > 1 for ratio in ratios),
            "pairs": len(ratios),
        },
        "windows_calls_per_s": {name: [round(rate, 1) for rate in rates[name]] for name in names},
    }


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    revisions = {"A": args.a, "B": args.b}
    described = {name: lay_out(rev, workdir / f"code-{name}") for name, rev in revisions.items()}
    plan = bench.Plan(
        prompt=args.prompt,
        requests=args.requests,
        warmup=20,
        concurrency=args.concurrency,
        duration_s=0.0,
        refusals=0,
        soak_s=0.0,
        max_queued=0,
        start_orders=1,
        phases=("stages_off",),
    )
    async with contextlib.AsyncExitStack() as stacks:
        entered: dict[str, bench.KernelStack] = {}
        for name in ("B", "A") if args.b_first else ("A", "B"):
            (workdir / name).mkdir()
            with first_on_path(workdir / f"code-{name}" / "site"):
                entered[name] = await stacks.enter_async_context(
                    bench.kernel_stack(plan, workdir / name, args.models, stages_on=False)
                )
        entered = {name: entered[name] for name in ("A", "B")}  # ratios are B over A
        bench.progress("ab: both stacks ready")
        report: dict[str, Any] = {
            "source": bench.source(),
            "machine": bench.machine(),
            "revisions": {name: f"{revisions[name]} ({described[name]})" for name in revisions},
            "concurrency": args.concurrency,
            "window_s": args.window_s,
            "started_first": "B" if args.b_first else "A",
        }
        if args.requests:
            report["sequential"] = await sequential(
                {name: s.targets.calls["kernel"] for name, s in entered.items()}, args.requests
            )
        bench.progress("ab: saturation")
        report["saturation"] = await saturation(
            entered, args.pairs, args.window_s, args.concurrency
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help=f"git revision, or {WORKTREE}")
    parser.add_argument("b", help=f"git revision, or {WORKTREE}")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--window-s", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--prompt", default="ping")
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument(
        "--b-first", action="store_true", help="start B's stack first (A's is, by default)"
    )
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llmos-ab-") as workdir:
        report = asyncio.run(run(args, Path(workdir)))
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
