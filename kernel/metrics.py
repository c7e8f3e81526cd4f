"""The kernel's Prometheus metrics: its instruments, and the small functions that record them.

The task runner calls the recording functions at the moments they name (a task entering a
state, a ticket dispatched, a trace step written, an admission refused); nothing here
decides anything. The scheduler stays pure logic: the queue-depth and running gauges are
read from it at scrape time by a collector (`watch_scheduler`), not pushed into it.

Imported by the kernel process only (`llmos.services.metrics.KIND_COLLECTORS`), so every
family below is on the kernel's /metrics from its start, at zero where a label set is known
in advance (priority classes, task states).

The names, types and labels are listed in docs/operator-guide.md#metrics (a contract
test keeps that table equal to what is defined here).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmos.kernel.scheduler import DEFAULT_QUEUE_LIMITS, Priority, Scheduler
from llmos.v1 import common_pb2

# Waits from well under a dispatch loop turn to the longest deadline a client is likely
# to give; aging moves a batch ticket up a class every `kernel_aging_s` (5 s).
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Stages run from a local call of a millisecond to a whole generation of a minute.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

QUEUE_WAIT = Histogram(
    "llmos_kernel_queue_wait_seconds",
    "Time a task waited in the scheduler's queue, from admission to dispatch, by the "
    "priority class it was admitted with.",
    ["priority"],
    buckets=QUEUE_WAIT_BUCKETS,
)
TASKS = Counter(
    "llmos_kernel_tasks_total",
    "Tasks that entered each state (queued, running, succeeded, failed, cancelled, "
    "refused); a re-queued or recovered task counts again.",
    ["state"],
)
STAGE_DURATION = Histogram(
    "llmos_kernel_stage_duration_seconds",
    "Duration of each stage on a task's request path (admit, safety:input, "
    "runtime:generate, ...), by the decision recorded in its trace step.",
    ["stage", "decision"],
    buckets=STAGE_BUCKETS,
)
REFUSED = Counter(
    "llmos_kernel_admissions_refused_total",
    "Requests the scheduler refused at admission (a full class queue, a deadline already "
    "passed), by priority class and reason.",
    ["priority", "reason"],
)

# Plugin hook calls: a local Unix-socket call of ~1 ms up to the 60 s manifest limit.
PLUGIN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)
PLUGIN_CALLS = Counter(
    "llmos_kernel_plugin_calls_total",
    "Calls the kernel made to plugin hosts, by plugin, hook (llmos_before_request, "
    "llmos_after_request, llmos_on_task_event, tool, command) and outcome (ok, failed, "
    "timeout; dropped: a task event not delivered because the plugin was not running or "
    "its queue was full).",
    ["plugin", "hook", "outcome"],
)
PLUGIN_CALL_DURATION = Histogram(
    "llmos_kernel_plugin_call_duration_seconds",
    "Duration of each call to a plugin host as the kernel saw it (gRPC included), by plugin "
    "and hook.",
    ["plugin", "hook"],
    buckets=PLUGIN_BUCKETS,
)
PLUGIN_VIOLATIONS = Counter(
    "llmos_kernel_plugin_violations_total",
    "Plugin results the kernel dropped or refused because the manifest did not allow them "
    "(a change without modify_prompt / modify_output, a malformed answer, a bad tool schema).",
    ["plugin"],
)
PLUGIN_RESTARTS = Counter(
    "llmos_kernel_plugin_restarts_total",
    "Plugin hosts that exited or were killed (a crash, or a hook past its timeout) and were "
    "restarted with backoff or, after repeated crashes, disabled.",
    ["plugin"],
)

STATE_LABELS = {
    value: name.removeprefix("TASK_STATE_").lower()
    for name, value in common_pb2.TaskState.items()
    if value != common_pb2.TASK_STATE_UNSPECIFIED
}

# The labelled children, looked up once: `labels()` takes a lock and builds a key on every
# call, and these are recorded several times per task.
_QUEUE_WAITS = {priority: QUEUE_WAIT.labels(priority.label) for priority in Priority}
_TASKS = {state: TASKS.labels(label) for state, label in STATE_LABELS.items()}
# Stage durations by (stage, decision): a few dozen pairs, added as they are first seen.
_STAGES: dict[tuple[str, str], Histogram] = {}


def task_entered(state: common_pb2.TaskState.ValueType) -> None:
    """A task was stored in `state` (created QUEUED, or a transition succeeded)."""
    child = _TASKS.get(state)
    if child is None:
        child = TASKS.labels(STATE_LABELS.get(state, "unspecified"))
    child.inc()


def task_dispatched(priority: Priority, waited_s: float) -> None:
    """The scheduler dispatched a ticket admitted with `priority` after `waited_s` queued."""
    _QUEUE_WAITS[priority].observe(max(0.0, waited_s))


def stage_ran(step: common_pb2.TraceStep) -> None:
    """A trace step was written: its duration, by stage and decision.

    Steps without a duration (the `record` step marks a moment, not a span) are left out,
    so they do not pile up in the lowest bucket.
    """
    if not step.HasField("duration"):
        return
    key = (step.stage, step.decision or "none")
    child = _STAGES.get(key)
    if child is None:
        child = _STAGES[key] = STAGE_DURATION.labels(*key)
    child.observe(step.duration.seconds + step.duration.nanos / 1e9)


def plugin_known(plugin: str) -> None:
    """Show a plugin's counters at zero from the kernel's start, before anything happens."""
    PLUGIN_VIOLATIONS.labels(plugin)
    PLUGIN_RESTARTS.labels(plugin)


def plugin_called(plugin: str, hook: str, outcome: str, seconds: float | None = None) -> None:
    """One call to a plugin host ended with `outcome`; `seconds` when it was made at all."""
    PLUGIN_CALLS.labels(plugin, hook, outcome).inc()
    if seconds is not None:
        PLUGIN_CALL_DURATION.labels(plugin, hook).observe(max(0.0, seconds))


def plugin_violated(plugin: str, count: int = 1) -> None:
    PLUGIN_VIOLATIONS.labels(plugin).inc(count)


def plugin_restarted(plugin: str) -> None:
    PLUGIN_RESTARTS.labels(plugin).inc()


def admission_refused(priority: Priority, reason: str) -> None:
    """The scheduler refused a request at admission; `reason` is the error's reason."""
    REFUSED.labels(priority.label, reason).inc()


class SchedulerCollector(Collector):
    """Reads the scheduler's queue depths and running counts when Prometheus scrapes.

    The scrape runs on the metrics server's thread while the event loop changes the
    scheduler; it only reads a few ints from dicts whose keys do not change
    (`Scheduler.depth`, `Scheduler.running`), which is safe under the GIL.
    """

    def __init__(self) -> None:
        self.scheduler: Scheduler | None = None
        self.services: tuple[str, ...] = ()

    def describe(self) -> Iterable[Metric]:
        # Names without reading the scheduler: lets the registry check for clashes.
        return self._families()

    def collect(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "llmos_kernel_queue_depth",
            "Tasks waiting in the scheduler's queue, by the priority class they were "
            "admitted with.",
            labels=["priority"],
        )
        limit = GaugeMetricFamily(
            "llmos_kernel_queue_limit",
            "Tasks a priority class's queue holds before admission refuses with QUEUE_FULL.",
            labels=["priority"],
        )
        running = GaugeMetricFamily(
            "llmos_kernel_running_tasks",
            "Tasks dispatched to a service and not yet finished, by service.",
            labels=["service"],
        )
        scheduler = self.scheduler
        if scheduler is not None:
            for label, count in scheduler.depth().items():
                depth.add_metric([label], count)
            for priority in Priority:
                configured = scheduler.config.queue_limits.get(priority)
                limit.add_metric([priority.label], configured or DEFAULT_QUEUE_LIMITS[priority])
            for service in self.services:
                running.add_metric([service], scheduler.running(service))
        yield depth
        yield limit
        yield running


SCHEDULER = SchedulerCollector()
REGISTRY.register(SCHEDULER)


def watch_scheduler(scheduler: Scheduler, services: Iterable[str]) -> None:
    """Report `scheduler`'s queues, and its running tickets for each of `services`.

    One kernel per process: a second call replaces the first scheduler.
    """
    SCHEDULER.scheduler = scheduler
    SCHEDULER.services = tuple(services)
