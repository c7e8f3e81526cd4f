"""bench/kernel.py --quick end to end: every phase runs against real processes and the JSON
has every figure. Figures are never asserted (bench/README.md): only that they exist, that
no call failed, and that the stage switch and the full queue did what they should."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from stacktools import REPO

PIPELINE = {
    "plugins:before",
    "safety:input",
    "privacy:redact",
    "safety:output",
    "privacy:restore",
    "plugins:after",
}


def quick_run(shared_data_dir: Path, *extra: str) -> dict[str, Any]:
    """`bench/kernel.py --quick` with the session's models folder (its safety encoder is
    exported once, not once a phase); its JSON report, once it exited 0."""
    models = str(shared_data_dir / "models")
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "kernel.py"), "--quick", "--models", models, *extra],
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_quick_run_prints_every_figure(shared_data_dir: Path) -> None:
    """Every phase, and bare and stages_off in both start orders (a full run's default):
    each of those two is measured twice, half the calls each, and every figure pools the
    two halves."""
    report = quick_run(shared_data_dir, "--start-orders", "2")
    assert report["start_orders"] == [["bare", "stages_off"], ["stages_off", "bare"]]

    half = report["plan"]["requests"] // 2
    pairs = {"bare": ("direct", "proxy"), "stages_off": ("direct", "kernel")}
    pairs["stages_on"] = pairs["stages_off"]
    for phase, targets in pairs.items():
        result = report[phase]
        calls = report["plan"]["requests"] if phase == "stages_on" else 2 * half
        for target in targets:
            latency, load = result["latency"][target], result["throughput"][target]
            assert latency["calls"] == calls, (phase, target)
            assert latency["errors"] == {} and load["errors"] == {}, (phase, target)
            assert latency["p50_ms"] > 0 and load["calls_per_s"] > 0, (phase, target)
        assert set(result["added"]) == {"p50_ms", "p99_ms"}

    traced = {
        phase: set(report[phase]["stage_cost"]["stages"]) for phase in ("stages_off", "stages_on")
    }
    assert traced["stages_off"] == {"admit", "runtime:generate"}
    assert traced["stages_on"] == {"admit", "runtime:generate"} | PIPELINE

    refusal = report["stages_on"]["refusal"]
    assert refusal["reasons"] == {"RESOURCE_EXHAUSTED/QUEUE_FULL": report["plan"]["refusals"]}
    assert refusal["tasks_accepted_before_full"] > 0

    soak = report["stages_on"]["soak"]
    assert soak["errors"] == {} and soak["calls"] > 0
    assert 0 < soak["rss_mib_start"] <= soak["rss_mib_max"]

    assert set(report["targets"]) == {
        "kernel_stages_off_added_p50_over_proxy",
        "kernel_stages_off_throughput_over_proxy",
        "stages_marginal_p50_ms",
        "full_queue_refusal_p99_ms",
        "memory_flat_second_half_mib_per_min",
    }


def test_phases_runs_only_those_named(shared_data_dir: Path) -> None:
    """--phases bare: only the runtime and the proxy start, no kernel stack, and no target
    is reported (each compares a kernel phase with bare)."""
    report = quick_run(shared_data_dir, "--phases", "bare")
    assert report["plan"]["phases"] == ["bare"]
    assert "stages_off" not in report and "stages_on" not in report
    assert report["start_orders"] == [["bare"]]
    latency = report["bare"]["latency"]["proxy"]
    assert latency["calls"] == report["plan"]["requests"] and latency["errors"] == {}
    assert report["targets"] == {}
