"""What the kernel adds over calling the runtime directly, beside a bare proxy, as JSON.

    python bench/kernel.py [--quick] [--soak-s 300] [--requests 1000] [--concurrency 32]
                           [--duration-s 10] [--refusals 200] [--max-queued 0] [--prompt ping]
                           [--models DIR] [--phases bare,stages_off,stages_on] [--start-orders 2]

Every process is real, started here on free ports, with the echo runtime (`runtime_engine =
"echo"`: the stack's runtime process streams the prompt back, no model), so what is measured
is everything around the model. Three phases:

  bare        an echo runtime alone (`llmos serve runtime`) and bench/bare_proxy.py in front of
              it: receive, forward, return — the floor any Python broker can reach;
  stages_off  `llmos up` with the echo runtime and a default pipeline policy with no service
              stages (LLMOS_POLICY_STAGES and LLMOS_POLICY_MANDATORY empty; kernel/policy.py):
              admission, scheduler, task store, trace, but no plugin, safety or privacy stage;
  stages_on   `llmos up` with the echo runtime and the default policy's stages (while the
              safety and privacy services are unbuilt, each of their stages is a round trip
              answered UNIMPLEMENTED and traced "not_available"; the two plugin stages are
              traced "not_available" without a call).

In each phase the same workload goes to the runtime directly and through the broker (the
proxy, or the kernel), so each broker is compared with a baseline measured under the same
conditions. bare and stages_off, the two the targets compare, are up at the same time and
measured together, interleaved: a VM's speed drifts by a fifth from minute to minute (seen
2026-11-30), and measured one phase after the other that drift went into the kernel/proxy
ratios. And of two stacks started one after the other the second was the faster, so a full
run measures them twice, half the calls and time each, started in one order and then in
the other, and pools the samples (`start_orders` in the JSON; --start-orders 1, the
default of --quick, keeps one). stages_on runs after them, alone (its services would share
the CPUs otherwise):

  latency     --requests Generate calls one at a time, timed from issuing the call to the end
              of its stream. The prompt (--prompt, one word by default) comes back as one
              message: a unary-ish call. The targets' calls (direct and broker; with bare and
              stages_off, all four) alternate in blocks of a tenth of them, each block after
              10 untimed calls (its process was idle meanwhile), so drift in the machine's
              load hits them alike. `added.p50_ms` / `added.p99_ms` are the broker's
              percentile minus its own direct one.
  throughput  --concurrency clients on one channel, each issuing its next call as soon as the
              last ends, for --duration-s per target, cut into 5 windows taken in turn with
              the other targets' (one window when they would be under a second): completed
              calls per second at saturation, errors by status code, latency under that
              load, the CPU time each process (client, broker, runtime, the stages'
              services) spent per call (from /proc), and `cores_busy`, their CPU time over
              the wall time.

Both kernel phases report:

  stage_cost  per trace stage (admit, each pipeline stage, runtime:generate), the durations
              its trace steps record (GetTrace on the latency run's tasks) and their
              decisions. In stages_on, `marginal_p50_ms` = stages_on added p50 minus
              stages_off added p50: the stages' cost as the client sees it.

stages_on also measures:

  refusal     the runtime process is frozen (SIGSTOP), so the tasks the kernel dispatches
              hang in it; interactive Submits fill the kernel's queue until it refuses; then
              --refusals interactive Generate calls are timed until their RESOURCE_EXHAUSTED
              arrives. The runtime is resumed (SIGCONT) and the queued tasks drain. The queue
              holds the kernel's default 256 interactive tasks, or --max-queued (both kernel
              phases run with it: `kernel_max_queued`).
  soak        --concurrency clients through the kernel for --soak-s seconds while the kernel
              process's resident memory (VmRSS) is read every second: start, end, max and the
              least-squares slope over the whole run and over its second half.

`targets` sets the figures against the work item's: the kernel with stages off within 2x the
proxy's added p50 and at >= 60% of its throughput; a full queue refusing within 5 ms (p99);
memory flat, taken here as a second-half slope within +-1 MiB/min. Figures, not assertions:
the client shares the CPUs with what it measures, and other work on the machine skews every
figure (the load averages at start and end are reported). --quick is a smoke run of every
phase in about half a minute, with a 32-task queue so that the refusal's fill and drain are
short. --phases runs only the phases named (an A/B comparison of the kernel's own path needs
only bare and stages_off); `targets` then holds the targets those phases measure.

Each phase's data directory is new; the safety service exports its encoder into its
`models/` folder on start (seconds, counted in that phase's `ready_s`). --models DIR links
DIR as every phase's `models/` folder instead, so an export made before is reused (the test
suite passes its shared one).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmos.kernel.stack import STACK
from llmos.services.errors import error_info
from llmos.v1 import common_pb2, kernel_pb2, kernel_pb2_grpc, runtime_pb2, runtime_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
METRICS_OFFSET = 1000  # processes may serve /metrics on their gRPC port + 1000
READY_TIMEOUT_S = 120.0
DRAIN_TIMEOUT_S = 120.0
# Untimed calls at the start of each latency block (see `latency`).
BLOCK_WARMUP = 10
# Windows each target's saturation time is cut into, taken in turn with the other targets'
# (one window when they would be shorter than MIN_WINDOW_S, as in --quick).
THROUGHPUT_ROUNDS = 5
MIN_WINDOW_S = 1.0
FILL_BATCH = 16
MAX_FILL = 50_000
FLAT_MIB_PER_MIN = 1.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
QUICK = {
    "requests": 40,
    "warmup": 5,
    "concurrency": 8,
    "duration_s": 0.5,
    "refusals": 10,
    "soak_s": 2.0,
    "max_queued": 32,
    "start_orders": 1,
}
FULL = {
    "requests": 1000,
    "warmup": 50,
    "concurrency": 32,
    "duration_s": 10.0,
    "refusals": 200,
    "soak_s": 300.0,
    "max_queued": 0,
    "start_orders": 2,
}

Call = Callable[[], Awaitable[str]]  # one Generate; returns the task id ("" direct)


def progress(message: str) -> None:
    print(f"bench/kernel: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def latency_summary(seconds: list[float], errors: collections.Counter[str]) -> dict[str, Any]:
    return {
        "calls": len(seconds),
        "errors": dict(errors),
        "p50_ms": ms(percentile(seconds, 0.5)),
        "p90_ms": ms(percentile(seconds, 0.9)),
        "p99_ms": ms(percentile(seconds, 0.99)),
        "max_ms": ms(max(seconds, default=None)),
        "mean_ms": ms(statistics.fmean(seconds)) if seconds else None,
    }


def added(broker: dict[str, Any], direct: dict[str, Any]) -> dict[str, float | None]:
    def minus(key: str) -> float | None:
        if broker[key] is None or direct[key] is None:
            return None
        return round(float(broker[key]) - float(direct[key]), 3)

    return {"p50_ms": minus("p50_ms"), "p99_ms": minus("p99_ms")}


def slope_per_min(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) samples, in MiB per minute."""
    if len(samples) < 2:
        return None
    mean_t = statistics.fmean(t for t, _ in samples)
    mean_v = statistics.fmean(v for _, v in samples)
    spread = sum((t - mean_t) ** 2 for t, _ in samples)
    if spread == 0:
        return None
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in samples) / spread


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, digits)


# ---------------------------------------------------------------------------- processes


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port_block(size: int) -> int:
    """A base port with base..base+size-1 free, and the same block METRICS_OFFSET higher."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((HOST, 0))
            base = int(probe.getsockname()[1])
        ports = [base + i for i in range(size)]
        ports += [port + METRICS_OFFSET for port in ports]
        if max(ports) < 65535 and all(_bindable(port) for port in ports):
            return base
    raise RuntimeError("no block of free ports found")


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text(encoding="ascii").split()]


def kernel_pid(supervisor: int) -> int:
    """The `llmos serve kernel` child of an `llmos up` supervisor."""
    for child in children_of(supervisor):
        argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if b"serve" in argv and b"kernel" in argv:
            return child
    raise RuntimeError(f"no kernel process under pid {supervisor}")


@dataclasses.dataclass
class Processes:
    """Child processes of one phase, their logs, and how to stop them."""

    workdir: Path
    running: list[tuple[str, subprocess.Popen[bytes]]] = dataclasses.field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}
            )
        self.running.append((name, process))
        return process

    def check_alive(self) -> None:
        for name, process in self.running:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.workdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> float:
        """SIGTERM in reverse start order; returns the seconds it took."""
        started = time.monotonic()
        for _, process in reversed(self.running):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.running.clear()
        return time.monotonic() - started


def echo_env(data_dir: Path, **settings: str) -> dict[str, str]:
    return {
        "LLMOS_RUNTIME_ENGINE": "echo",
        "LLMOS_DATA_DIR": str(data_dir),
        "LLMOS_LOG_FORMAT": "json",
        # The refusal run freezes the runtime for a few seconds: keep its registration.
        "LLMOS_LEASE_S": "60",
        "PYTHONUNBUFFERED": "1",
        **{f"LLMOS_{name.upper()}": value for name, value in settings.items()},
    }


async def wait_for(what: str, ready: Callable[[], Awaitable[bool]], procs: Processes) -> float:
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT_S:
        procs.check_alive()
        with contextlib.suppress(grpc.aio.AioRpcError):
            if await ready():
                return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {READY_TIMEOUT_S:.0f}s")


async def serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=1
        )
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def stack_ready(address: str) -> bool:
    """Every process of the stack registered with the kernel and SERVING."""
    expected = {spec.name for spec in STACK if spec.name != "kernel"}
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await kernel_pb2_grpc.KernelServiceStub(channel).ListServices(
            kernel_pb2.ListServicesRequest(), timeout=1
        )
    healthy = {s.name for s in reply.services if s.health == common_pb2.SERVICE_HEALTH_SERVING}
    return expected <= healthy


async def registered(kernel_address: str) -> dict[str, kernel_pb2.ServiceInfo]:
    """The services the kernel registered, by name: addresses (for direct calls) and pids."""
    async with grpc.aio.insecure_channel(kernel_address) as channel:
        reply = await kernel_pb2_grpc.KernelServiceStub(channel).ListServices(
            kernel_pb2.ListServicesRequest(), timeout=5
        )
    return {service.name: service for service in reply.services}


# ---------------------------------------------------------------------------- calls


def runtime_call(channel: grpc.aio.Channel, prompt: str) -> Call:
    """Generate on a RuntimeService (the runtime itself, or the proxy in front of it)."""
    stub = runtime_pb2_grpc.RuntimeServiceStub(channel)
    request = runtime_pb2.RuntimeServiceGenerateRequest(prompt=prompt)

    async def call() -> str:
        last = runtime_pb2.RuntimeServiceGenerateResponse()
        async for last in stub.Generate(request, timeout=30):  # noqa: B007
            pass
        if last.finish_reason != common_pb2.FINISH_REASON_STOP:
            raise RuntimeError(f"unexpected end: {last}")
        return ""

    return call


def kernel_call(channel: grpc.aio.Channel, prompt: str) -> Call:
    """Generate on the kernel: a task through the pipeline to the runtime and back."""
    stub = kernel_pb2_grpc.KernelServiceStub(channel)
    request = kernel_pb2.GenerateRequest(prompt=prompt)

    async def call() -> str:
        task_id = ""
        last = kernel_pb2.GenerateResponse()
        async for last in stub.Generate(request, timeout=30):
            task_id = task_id or last.task_id
        if last.finish_reason != common_pb2.FINISH_REASON_STOP:
            raise RuntimeError(f"unexpected end: {last}")
        return task_id

    return call


def error_name(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return str(error.code().name)
    return type(error).__name__


@dataclasses.dataclass
class Timings:
    seconds: list[float] = dataclasses.field(default_factory=list)
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    task_ids: list[str] = dataclasses.field(default_factory=list)

    async def time(self, call: Call) -> None:
        started = time.perf_counter()
        try:
            task_id = await call()
        except (grpc.aio.AioRpcError, RuntimeError) as error:
            self.errors[error_name(error)] += 1
            return
        self.seconds.append(time.perf_counter() - started)
        if task_id:
            self.task_ids.append(task_id)

    def absorb(self, other: Timings) -> None:
        self.seconds.extend(other.seconds)
        self.errors.update(other.errors)
        self.task_ids.extend(other.task_ids)


async def latency(
    calls: dict[str, Call], requests: int, warmup: int, blocks: int = 10
) -> dict[str, Timings]:
    """Sequential calls per target, alternating targets block by block. Each block starts
    with a few untimed calls (`BLOCK_WARMUP`, at most `warmup`): a process idle while the
    others' blocks ran finds its caches cold, and its first calls measured that."""
    for call in calls.values():
        for _ in range(warmup):
            await Timings().time(call)
    timings = {name: Timings() for name in calls}
    per_block = max(1, requests // blocks)
    done = 0
    while done < requests:
        count = min(per_block, requests - done)
        for name, call in calls.items():
            for _ in range(min(BLOCK_WARMUP, warmup)):
                await Timings().time(call)
            for _ in range(count):
                await timings[name].time(call)
        done += count
    return timings


async def saturate(call: Call, concurrency: int, duration_s: float) -> tuple[Timings, float]:
    """`concurrency` clients back to back for `duration_s`; returns timings and wall time."""
    timings = Timings()
    started = time.perf_counter()
    deadline = started + duration_s

    async def client() -> None:
        while time.perf_counter() < deadline:
            await timings.time(call)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return timings, time.perf_counter() - started


@dataclasses.dataclass
class Load:
    """One target's saturation windows, added up: its calls, wall time and CPU per process."""

    timings: Timings = dataclasses.field(default_factory=Timings)
    wall_s: float = 0.0
    cpu_s: collections.defaultdict[str, float] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(float)
    )

    async def window(
        self, call: Call, concurrency: int, seconds: float, pids: dict[str, int]
    ) -> None:
        """Saturate for `seconds` more, counting what each process in `pids` spent."""
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        timings, wall = await saturate(call, concurrency, seconds)
        for name, pid in pids.items():
            self.cpu_s[name] += cpu_seconds(pid) - before[name]
        self.timings.absorb(timings)
        self.wall_s += wall

    def absorb(self, other: Load) -> None:
        self.timings.absorb(other.timings)
        self.wall_s += other.wall_s
        for name, seconds in other.cpu_s.items():
            self.cpu_s[name] += seconds

    def summary(self, concurrency: int) -> dict[str, Any]:
        """Saturation figures, with the CPU time each process spent per completed call."""
        calls = len(self.timings.seconds)
        return {
            "concurrency": concurrency,
            "wall_s": round(self.wall_s, 3),
            "calls_per_s": round(calls / self.wall_s, 1),
            **latency_summary(self.timings.seconds, self.timings.errors),
            "cpu_ms_per_call": {
                name: round(1000 * seconds / calls, 3) if calls else None
                for name, seconds in self.cpu_s.items()
            },
            "cores_busy": round(sum(self.cpu_s.values()) / self.wall_s, 2),
        }


# ---------------------------------------------------------------------------- phases


@dataclasses.dataclass(frozen=True)
class Plan:
    prompt: str
    requests: int
    warmup: int
    concurrency: int
    duration_s: float
    refusals: int
    soak_s: float
    max_queued: int  # the kernels' kernel_max_queued; 0: the kernel's default
    start_orders: int  # bare and stages_off measured in one start order, or in both
    phases: tuple[str, ...] = ("bare", "stages_off", "stages_on")  # those run, in this order


@dataclasses.dataclass
class Targets:
    """One comparison, up and ready: the calls to the baseline (named first) and to the
    broker (named last), and the processes whose CPU time per call the throughput reports."""

    calls: dict[str, Call]
    pids: dict[str, int]


Measured = tuple[dict[str, Timings], dict[str, Load]]  # by "group/target"


async def measure(plan: Plan, groups: dict[str, Targets]) -> dict[str, dict[str, Any]]:
    """Latency and throughput of every target of every group (phase), interleaved (see
    `collect`). Each group's result: its latency, its broker's added latency and its
    throughput."""
    return summarize(plan, groups, await collect(plan, groups))


async def collect(plan: Plan, groups: dict[str, Targets]) -> Measured:
    """The latency run alternates all targets block by block, and the saturation time of
    each is cut into `THROUGHPUT_ROUNDS` windows taken in turn (in alternating order), so
    a drift in the machine's speed meets every target alike."""
    calls = {
        f"{group}/{name}": call for group, t in groups.items() for name, call in t.calls.items()
    }
    timings = await latency(calls, plan.requests, plan.warmup)
    rounds = THROUGHPUT_ROUNDS if plan.duration_s / THROUGHPUT_ROUNDS >= MIN_WINDOW_S else 1
    loads = {key: Load() for key in calls}
    order = list(calls)
    for turn in range(rounds):
        for key in order if turn % 2 == 0 else order[::-1]:
            group = key.split("/", 1)[0]
            pids = {"client": os.getpid(), **groups[group].pids}
            await loads[key].window(calls[key], plan.concurrency, plan.duration_s / rounds, pids)
    return timings, loads


def summarize(plan: Plan, groups: dict[str, Targets], measured: Measured) -> dict[str, Any]:
    timings, loads = measured
    results: dict[str, dict[str, Any]] = {}
    for group, t in groups.items():
        names = list(t.calls)
        summaries = {}
        for name in names:
            timing = timings[f"{group}/{name}"]
            summaries[name] = latency_summary(timing.seconds, timing.errors)
        results[group] = {
            "latency": summaries,
            "added": added(summaries[names[-1]], summaries[names[0]]),
            "throughput": {
                name: loads[f"{group}/{name}"].summary(plan.concurrency) for name in names
            },
            "_task_ids": timings[f"{group}/{names[-1]}"].task_ids,
        }
    return results


def data_dir(phase_dir: Path, models: Path | None) -> Path:
    """A phase's new data directory; with `models`, its `models/` folder is that one."""
    path = phase_dir / "data"
    path.mkdir()
    if models is not None:
        (path / "models").symlink_to(models.resolve(), target_is_directory=True)
    return path


@contextlib.asynccontextmanager
async def bare_targets(
    plan: Plan, workdir: Path, models: Path | None
) -> AsyncIterator[tuple[Targets, float]]:
    """An echo runtime and the bare proxy in front of it, ready; the seconds that took."""
    procs = Processes(workdir / "bare")
    procs.workdir.mkdir()
    base = free_port_block(3)
    runtime, proxy = f"{HOST}:{base + 1}", f"{HOST}:{base + 2}"
    try:
        started = time.monotonic()
        # No kernel at `base`: the runtime's registration retries quietly once a second.
        runtime_process = procs.start(
            "runtime",
            [sys.executable, "-m", "llmos.kernel.cli", "serve", "runtime", "--port", str(base)],
            echo_env(data_dir(procs.workdir, models)),
        )
        proxy_argv = [sys.executable, str(REPO / "bench" / "bare_proxy.py")]
        proxy_process = procs.start(
            "proxy", [*proxy_argv, "--listen", proxy, "--target", runtime], {}
        )
        pids = {"runtime": runtime_process.pid, "proxy": proxy_process.pid}
        await wait_for("the echo runtime", lambda: serving(runtime), procs)
        async with (
            grpc.aio.insecure_channel(runtime) as direct,
            grpc.aio.insecure_channel(proxy) as through,
        ):
            calls = {
                "direct": runtime_call(direct, plan.prompt),
                "proxy": runtime_call(through, plan.prompt),
            }
            await wait_for("the proxy", probe(calls["proxy"]), procs)
            progress("bare: runtime and proxy ready")
            yield Targets(calls, pids), time.monotonic() - started
    finally:
        procs.stop()


def probe(call: Call) -> Callable[[], Awaitable[bool]]:
    async def ready() -> bool:
        try:
            await call()
        except grpc.aio.AioRpcError:
            return False
        return True

    return ready


@contextlib.asynccontextmanager
async def stack(
    workdir: Path, name: str, models: Path | None, **settings: str
) -> AsyncIterator[tuple[int, int, float]]:
    """`llmos up` with the echo runtime; yields the kernel port, the supervisor pid and the
    seconds it took until every process was registered and SERVING."""
    procs = Processes(workdir / name)
    procs.workdir.mkdir()
    port = free_port_block(len(STACK))
    started = time.monotonic()
    supervisor = procs.start(
        "llmos-up",
        [sys.executable, "-m", "llmos.kernel.cli", "up", "--port", str(port)],
        echo_env(data_dir(procs.workdir, models), **settings),
    )
    try:
        await wait_for(f"{name} stack", lambda: stack_ready(f"{HOST}:{port}"), procs)
        yield port, supervisor.pid, time.monotonic() - started
    finally:
        stop_s = procs.stop()
        progress(f"{name}: stack stopped in {stop_s:.1f}s")


@dataclasses.dataclass
class KernelStack:
    """A stack under test: its targets, and what the kernel phases' other figures need."""

    name: str
    targets: Targets
    ready_s: float
    channel: grpc.aio.Channel  # to the kernel
    runtime_pid: int


@contextlib.asynccontextmanager
async def kernel_stack(
    plan: Plan, workdir: Path, models: Path | None, stages_on: bool
) -> AsyncIterator[KernelStack]:
    """`llmos up` with the echo runtime, the pipeline stages on or off, ready."""
    name = "stages_on" if stages_on else "stages_off"
    # Stages off: the default policy runs none, so none can be mandatory either.
    settings = {} if stages_on else {"policy_stages": "", "policy_mandatory": ""}
    if plan.max_queued:
        settings["kernel_max_queued"] = str(plan.max_queued)
    async with stack(workdir, name, models, **settings) as (port, supervisor, ready_s):
        kernel_address = f"{HOST}:{port}"
        services = await registered(kernel_address)
        runtime = services["runtime"]
        pids = {"kernel": kernel_pid(supervisor), "runtime": runtime.pid}
        if stages_on:
            pids |= {name: services[name].pid for name in ("safety", "privacy")}
        async with (
            grpc.aio.insecure_channel(runtime.address) as direct,
            grpc.aio.insecure_channel(kernel_address) as kernel,
        ):
            calls = {
                "direct": runtime_call(direct, plan.prompt),
                "kernel": kernel_call(kernel, plan.prompt),
            }
            progress(f"{name}: stack ready in {ready_s:.1f}s")
            yield KernelStack(name, Targets(calls, pids), ready_s, kernel, runtime.pid)


async def kernel_figures(
    plan: Plan, kernel: KernelStack, measured: dict[str, Any]
) -> dict[str, Any]:
    """A kernel phase's report: what `measure` found, what its traces record, and with the
    stages on the refusal of a full queue and the memory soak."""
    task_ids = measured.pop("_task_ids")
    result = {"ready_s": round(kernel.ready_s, 2), **measured}
    result["stage_cost"] = await stage_cost(kernel.channel, task_ids[:200])
    if kernel.name == "stages_on":
        progress(f"{kernel.name}: refusal of a full queue")
        result["refusal"] = await refusal(kernel.channel, kernel.runtime_pid, plan)
        progress(f"{kernel.name}: soak for {plan.soak_s:.0f}s")
        result["soak"] = await soak(
            kernel.targets.calls["kernel"], kernel.targets.pids["kernel"], plan
        )
    return result


async def stage_cost(channel: grpc.aio.Channel, task_ids: list[str]) -> dict[str, Any]:
    """Per stage: the durations and decisions its trace steps record."""
    stub = kernel_pb2_grpc.KernelServiceStub(channel)
    durations: dict[str, list[float]] = collections.defaultdict(list)
    decisions: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for task_id in task_ids:
        reply = await stub.GetTrace(kernel_pb2.GetTraceRequest(task_id=task_id), timeout=10)
        for step in reply.steps:
            if step.HasField("duration"):
                durations[step.stage].append(step.duration.ToTimedelta().total_seconds())
            decisions[step.stage][step.decision] += 1
    return {
        "tasks": len(task_ids),
        "stages": {
            stage: {
                "p50_ms": ms(percentile(values, 0.5)),
                "p99_ms": ms(percentile(values, 0.99)),
                "decisions": dict(decisions[stage]),
            }
            for stage, values in durations.items()
        },
    }


async def refusal(channel: grpc.aio.Channel, pid: int, plan: Plan) -> dict[str, Any]:
    """Freeze the runtime, fill the kernel's interactive queue, time the refusals."""
    stub = kernel_pb2_grpc.KernelServiceStub(channel)
    interactive = common_pb2.PRIORITY_INTERACTIVE
    task = kernel_pb2.GenerateRequest(prompt=plan.prompt, priority=interactive)
    accepted, fill_refusals = 0, 0
    timings = Timings()
    reasons: collections.Counter[str] = collections.Counter()
    retry_after: list[float] = []
    os.kill(pid, signal.SIGSTOP)
    try:
        fill_started = time.monotonic()
        while not fill_refusals and accepted < MAX_FILL:
            replies = await asyncio.gather(
                *(
                    stub.Submit(kernel_pb2.SubmitRequest(request=task), timeout=30)
                    for _ in range(FILL_BATCH)
                ),
                return_exceptions=True,
            )
            for reply in replies:
                if isinstance(reply, grpc.aio.AioRpcError):
                    if reply.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise reply
                    fill_refusals += 1
                elif isinstance(reply, BaseException):
                    raise reply
                else:
                    accepted += 1
        fill_s = time.monotonic() - fill_started
        for _ in range(plan.refusals):
            started = time.perf_counter()
            try:
                async for _piece in stub.Generate(task, timeout=30):
                    break
                timings.errors["ACCEPTED"] += 1  # the queue had room after all
            except grpc.aio.AioRpcError as error:
                timings.seconds.append(time.perf_counter() - started)
                info = error_info(error)
                reasons[f"{error.code().name}/{info.reason if info else '?'}"] += 1
                if info is not None and "retry_after_ms" in info.metadata:
                    retry_after.append(float(info.metadata["retry_after_ms"]))
    finally:
        os.kill(pid, signal.SIGCONT)
    drain_s = await drain(stub)
    return {
        "how": "runtime frozen with SIGSTOP; interactive Submits until RESOURCE_EXHAUSTED",
        "tasks_accepted_before_full": accepted,
        "fill_s": round(fill_s, 3),
        "refused_generate": latency_summary(timings.seconds, timings.errors),
        "reasons": dict(reasons),
        "retry_after_ms_p50": percentile(retry_after, 0.5),
        "drain_after_resume_s": round(drain_s, 2),
    }


async def drain(stub: kernel_pb2_grpc.KernelServiceAsyncStub) -> float:
    """Seconds until no task is queued or running."""
    started = time.monotonic()
    states = (common_pb2.TASK_STATE_QUEUED, common_pb2.TASK_STATE_RUNNING)
    while time.monotonic() - started < DRAIN_TIMEOUT_S:
        pending = 0
        for state in states:
            reply = await stub.ListTasks(
                kernel_pb2.ListTasksRequest(state=state, page_size=1), timeout=10
            )
            pending += len(reply.tasks)
        if not pending:
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    raise RuntimeError(f"tasks still pending {DRAIN_TIMEOUT_S:.0f}s after the runtime resumed")


async def soak(call: Call, pid: int, plan: Plan) -> dict[str, Any]:
    """Saturation through the kernel for soak_s, the kernel's RSS read every second."""
    samples: list[tuple[float, float]] = []
    started = time.monotonic()

    async def sample() -> None:
        while True:
            samples.append((time.monotonic() - started, rss_mib(pid)))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample())
    try:
        timings, wall = await saturate(call, plan.concurrency, plan.soak_s)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    samples.append((time.monotonic() - started, rss_mib(pid)))
    second_half = [s for s in samples if s[0] >= samples[-1][0] / 2]
    whole, late = slope_per_min(samples), slope_per_min(second_half)
    stride = max(1, len(samples) // 60)
    return {
        "seconds": round(wall, 1),
        "calls": len(timings.seconds),
        "calls_per_s": round(len(timings.seconds) / wall, 1),
        "errors": dict(timings.errors),
        "rss_mib_start": round(samples[0][1], 1),
        "rss_mib_end": round(samples[-1][1], 1),
        "rss_mib_max": round(max(v for _, v in samples), 1),
        "rss_slope_mib_per_min": None if whole is None else round(whole, 3),
        "rss_slope_second_half_mib_per_min": None if late is None else round(late, 3),
        "rss_samples": [[round(t, 1), round(v, 1)] for t, v in samples[::stride]],
    }


# ---------------------------------------------------------------------------- report


def target(measured: float | None, text: str, met: Callable[[float], bool]) -> dict[str, Any]:
    """One target's entry: the figure, the target as text, and whether it was met (never
    when the figure is missing)."""
    return {"measured": measured, "target": text, "met": measured is not None and met(measured)}


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """The work item's targets that the phases which ran measure."""
    bare, off, on = report.get("bare"), report.get("stages_off"), report.get("stages_on")
    result: dict[str, Any] = {}
    if bare is not None and off is not None:
        added_ratio = ratio(off["added"]["p50_ms"], bare["added"]["p50_ms"], 2)
        share = ratio(
            off["throughput"]["kernel"]["calls_per_s"], bare["throughput"]["proxy"]["calls_per_s"]
        )
        result["kernel_stages_off_added_p50_over_proxy"] = target(
            added_ratio, "<= 2", lambda value: value <= 2
        )
        result["kernel_stages_off_throughput_over_proxy"] = target(
            share, ">= 0.6", lambda value: value >= 0.6
        )
    if on is None:
        return result
    if off is not None:
        result["stages_marginal_p50_ms"] = on["stage_cost"]["marginal_p50_ms"]
    refusal_p99 = on["refusal"]["refused_generate"]["p99_ms"]
    slope = on["soak"]["rss_slope_second_half_mib_per_min"]
    result["full_queue_refusal_p99_ms"] = target(refusal_p99, "<= 5", lambda value: value <= 5)
    result["memory_flat_second_half_mib_per_min"] = target(
        slope, f"within +-{FLAT_MIB_PER_MIN}", lambda value: abs(value) <= FLAT_MIB_PER_MIN
    )
    return result


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def git(*args: str, repo: Path = REPO) -> str:
    result = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
    )
    return result.stdout.strip()


def source(repo: Path = REPO) -> dict[str, Any]:
    """The commit measured, and the tracked code files that differ from it (uncommitted
    edits to kernel/ or services/ change what is measured). Names come from `git diff
    --name-only`: `status --porcelain` starts its lines with a status column that a
    stripped output loses on the first line (a run with one edited file reported none)."""
    changed = git("diff", "--name-only", "HEAD", repo=repo).splitlines()
    return {
        "commit": git("rev-parse", "--short", "HEAD", repo=repo) or "?",
        "uncommitted_code": sorted(
            name for name in changed if name.startswith(("kernel/", "services/"))
        ),
    }


async def run(plan: Plan, workdir: Path, models: Path | None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "source": source(),
        "machine": machine(),
        "plan": dataclasses.asdict(plan),
    }
    together = [name for name in ("bare", "stages_off") if name in plan.phases]
    if together:
        progress(f"{' and '.join(together)}: measured together, interleaved")
        report |= await measure_together(plan, workdir, models, together)
    if "stages_on" in plan.phases:
        progress("stages_on: kernel with the pipeline stages on")
        async with kernel_stack(plan, workdir, models, stages_on=True) as kernel:
            measured = await measure(plan, {"stages_on": kernel.targets})
            report["stages_on"] = await kernel_figures(plan, kernel, measured["stages_on"])
    on, off = report.get("stages_on"), report.get("stages_off")
    if on is not None:
        marginal = None
        if off is not None and None not in (on["added"]["p50_ms"], off["added"]["p50_ms"]):
            marginal = round(on["added"]["p50_ms"] - off["added"]["p50_ms"], 3)
        on["stage_cost"]["marginal_p50_ms"] = marginal
    report["machine"]["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    report["targets"] = targets(report)
    return report


async def measure_together(
    plan: Plan, workdir: Path, models: Path | None, together: Sequence[str]
) -> dict[str, Any]:
    """bare and stages_off, up at the same time and measured interleaved; with
    `plan.start_orders` 2, twice, half the calls and time each: started in one order, then
    in the other. Of two stacks started one after the other, the second was the faster
    (2026-11-30: 0.1 ms less added p50 with the same code in both; the kernel/proxy ratio
    2.06 and 2.11 with the proxy started first, 2.28 and 2.32 with the kernel first), so
    each broker gets each place once. Their samples are pooled."""
    orders = [list(together), list(together)[::-1]][: plan.start_orders]
    part = dataclasses.replace(
        plan,
        requests=max(1, plan.requests // len(orders)),
        duration_s=plan.duration_s / len(orders),
    )
    timings: dict[str, Timings] = collections.defaultdict(Timings)
    loads: dict[str, Load] = collections.defaultdict(Load)
    report: dict[str, Any] = {"start_orders": orders}
    for index, order in enumerate(orders):
        (workdir / f"order-{index}").mkdir()
        async with contextlib.AsyncExitStack() as up:
            groups: dict[str, Targets] = {}
            ready: dict[str, float] = {}
            kernel = None
            for name in order:
                if name == "bare":
                    groups["bare"], ready["bare"] = await up.enter_async_context(
                        bare_targets(plan, workdir / f"order-{index}", models)
                    )
                else:
                    kernel = await up.enter_async_context(
                        kernel_stack(plan, workdir / f"order-{index}", models, stages_on=False)
                    )
                    groups["stages_off"] = kernel.targets
            part_timings, part_loads = await collect(part, groups)
            for key, timing in part_timings.items():
                timings[key].absorb(timing)
            for key, load in part_loads.items():
                loads[key].absorb(load)
            if index < len(orders) - 1:
                continue
            measured = summarize(plan, groups, (timings, loads))  # all parts, pooled
            for group in measured:  # the traces to read are this stack's
                broker = list(groups[group].calls)[-1]
                measured[group]["_task_ids"] = part_timings[f"{group}/{broker}"].task_ids
            if "bare" in measured:
                measured["bare"].pop("_task_ids")
                report["bare"] = {"ready_s": round(ready["bare"], 2), **measured["bare"]}
            if kernel is not None:
                report["stages_off"] = await kernel_figures(plan, kernel, measured["stages_off"])
    return report


def parse_plan(argv: list[str] | None = None) -> tuple[Plan, bool, Path | None]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run of every phase")
    parser.add_argument("--prompt", default="ping", help="what each call sends (and gets back)")
    parser.add_argument("--requests", type=int, help="sequential calls per target (latency)")
    parser.add_argument("--warmup", type=int, help="calls per target before timing")
    parser.add_argument("--concurrency", type=int, help="clients at saturation")
    parser.add_argument("--duration-s", type=float, help="seconds of saturation per target")
    parser.add_argument("--refusals", type=int, help="Generate calls timed against a full queue")
    parser.add_argument("--soak-s", type=float, help="seconds of the memory soak (default 300)")
    parser.add_argument(
        "--max-queued", type=int, help="the kernels' kernel_max_queued (0: their default)"
    )
    parser.add_argument(
        "--start-orders",
        type=int,
        choices=(1, 2),
        help="bare and stages_off in one start order, or in both (half the calls each)",
    )
    parser.add_argument(
        "--models", type=Path, help="a models folder every phase links (its encoder export)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    parser.add_argument(
        "--phases",
        default=",".join(Plan.phases),
        help="the phases to run, comma-separated (default: all three, in that order)",
    )
    args = parser.parse_args(argv)
    named = args.phases.split(",")
    if not named or set(named) - set(Plan.phases):
        parser.error(f"--phases takes some of {', '.join(Plan.phases)}, not {args.phases!r}")
    if args.models is not None and not args.models.is_dir():
        parser.error(f"--models {args.models}: no such folder")
    defaults = QUICK if args.quick else FULL
    chosen = {
        name: value if (value := getattr(args, name)) is not None else default
        for name, default in defaults.items()
    }
    plan = Plan(
        prompt=args.prompt,
        requests=int(chosen["requests"]),
        warmup=int(chosen["warmup"]),
        concurrency=int(chosen["concurrency"]),
        duration_s=float(chosen["duration_s"]),
        refusals=int(chosen["refusals"]),
        soak_s=float(chosen["soak_s"]),
        max_queued=int(chosen["max_queued"]),
        start_orders=int(chosen["start_orders"]),
        phases=tuple(name for name in Plan.phases if name in named),
    )
    return plan, args.keep, args.models


def main() -> None:
    plan, keep, models = parse_plan()
    workdir = Path(tempfile.mkdtemp(prefix="llmos-bench-kernel-"))
    try:
        report = asyncio.run(run(plan, workdir, models))
    finally:
        if keep:
            progress(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
