"""What plugins cost: the plugin list at kernel start, a hook call over gRPC, a hung hook.

Prints one JSON object on stdout (progress on stderr). Every figure comes from real
processes and real gRPC, nothing in-process stands in for a host:

- `plugin_list_ms`: `PluginHosts(...)` construction in a fresh interpreter, i.e. reading
  the entry points and every manifest without importing plugin code, with the repository's
  test plugins and first-party plugins installed (N plugins, `plugins`), median of runs;
  `plugin_list_empty_ms` is the same with none installed. The difference is what the plugin
  list adds to kernel start-up (target: <= 100 ms).
- `hook_call_ms`: CallHook round trips from the kernel's channel code (grpc.aio, Unix
  socket, no retries) to a real plugin host running the template plugin; p50 and p99
  (target: p50 <= 2 ms).
- `hung_hook_ms`: how long the kernel's stage waits for the `hang` test plugin, whose
  manifest says 300 ms, p50 and max over a few calls (target: about its timeout). The host
  is killed after each hang, as the kernel does, and restarted.

Usage: .venv/bin/python bench/plugins.py [--calls 2000] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from llmos.plugins.testing import install_source, pythonpath, run_host  # noqa: E402

PLUGIN_DIRS = [
    *sorted((REPO / "tests" / "plugins").iterdir()),
    REPO / "plugins" / "firstparty" / "llmos-faq",
    REPO / "plugins" / "firstparty" / "llmos-policy-guard",
    REPO / "plugins" / "template",
]
LIST_SNIPPET = """
import time, json
from llmos.services.config import load_settings
from llmos.kernel.registry import Registry
settings = load_settings(env={})
started = time.perf_counter()
from llmos.kernel.plugins import PluginHosts
hosts = PluginHosts(settings, Registry(15, 1 << 20))
print(json.dumps({"total_ms": (time.perf_counter() - started) * 1000,
                  "list_ms": hosts.load_ms, "plugins": len(hosts.plugins)}))
"""


def progress(message: str) -> None:
    print(f"bench/plugins: {message}", file=sys.stderr, flush=True)


def plugin_list(path: str, runs: int) -> dict[str, float]:
    lists, totals, count = [], [], 0
    for _ in range(runs):
        env = {**os.environ, "PYTHONPATH": path}
        done = subprocess.run(
            [sys.executable, "-c", LIST_SNIPPET],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=120,
        )
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        lists.append(figures["list_ms"])
        totals.append(figures["total_ms"])
        count = figures["plugins"]
    return {
        "list_ms_p50": statistics.median(lists),
        "with_import_ms_p50": statistics.median(totals),
        "plugins": count,
    }


async def hook_calls(socket: str, calls: int) -> list[float]:
    from llmos.kernel.plugins import _host_channel
    from llmos.v1 import plugin_pb2, plugin_pb2_grpc

    channel = _host_channel(socket, 16 * 1024 * 1024)
    stub = plugin_pb2_grpc.PluginHostServiceStub(channel)
    request = plugin_pb2.PluginHostServiceCallHookRequest(hook="llmos_before_request")
    request.arguments.update({"prompt": "hello", "tenant": "t", "task_id": "1"})
    for _ in range(50):  # warm up
        await stub.CallHook(request, timeout=5)
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        await stub.CallHook(request, timeout=5)
        samples.append((time.perf_counter() - started) * 1000)
    await channel.close()
    return samples


async def hung_calls(socket: str, timeout_s: float) -> float:
    import grpc

    from llmos.kernel.plugins import _host_channel
    from llmos.v1 import plugin_pb2, plugin_pb2_grpc

    channel = _host_channel(socket, 16 * 1024 * 1024)
    stub = plugin_pb2_grpc.PluginHostServiceStub(channel)
    request = plugin_pb2.PluginHostServiceCallHookRequest(hook="llmos_before_request")
    request.arguments.update({"tenant": "t", "task_id": "1"})
    started = time.perf_counter()
    try:
        await stub.CallHook(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
    elapsed = (time.perf_counter() - started) * 1000
    await channel.close()
    return elapsed


def percentile(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--hangs", type=int, default=5)
    args = parser.parse_args()
    site = Path(tempfile.mkdtemp(prefix="llmos-bench-plugins-"))
    installed = [install_source(path, site / "site") for path in PLUGIN_DIRS]
    progress(f"plugin list with {len(installed)} installed plugins")
    with_plugins = plugin_list(pythonpath(*installed), args.runs)
    without = plugin_list(os.environ.get("PYTHONPATH", ""), args.runs)
    progress(f"{args.calls} hook calls to the template plugin's host")
    with run_host(REPO / "plugins" / "template") as host:
        samples = asyncio.run(hook_calls(host.socket, args.calls))
    progress(f"{args.hangs} hung hooks (manifest timeout 300 ms)")
    hung = []
    for _ in range(args.hangs):
        with run_host(REPO / "tests" / "plugins" / "hang") as host:
            hung.append(asyncio.run(hung_calls(host.socket, 0.3)))
            host.process.kill()  # as the kernel does with a host whose hook hung
    result = {
        "plugins_installed": with_plugins["plugins"],
        "plugin_list_ms": round(with_plugins["list_ms_p50"], 2),
        "plugin_list_empty_ms": round(without["list_ms_p50"], 2),
        "plugin_list_added_ms": round(with_plugins["list_ms_p50"] - without["list_ms_p50"], 2),
        "plugin_supervisor_import_and_list_ms": round(with_plugins["with_import_ms_p50"], 2),
        "hook_call_ms": {
            "p50": round(statistics.median(samples), 3),
            "p99": round(percentile(samples, 0.99), 3),
            "calls": len(samples),
        },
        "hung_hook_ms": {
            "timeout": 300,
            "p50": round(statistics.median(hung), 1),
            "max": round(max(hung), 1),
        },
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
