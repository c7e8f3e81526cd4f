"""Metrics, the pure parts: where each process serves them, and what the kernel's and the
runtime's recording functions record (read back from the registry a scrape would read).

The endpoint itself, over HTTP from real processes, is tested in
tests/integration/test_metrics.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.protobuf.duration_pb2 import Duration
from prometheus_client import REGISTRY

from llmos.kernel import metrics as kernel_metrics
from llmos.kernel.scheduler import Priority, Scheduler, SchedulerConfig, Ticket
from llmos.services.config import METRICS_PORT_OFFSET, Settings, load_settings
from llmos.services.errors import InvalidArgument
from llmos.services.runtime.metrics import StreamMeter
from llmos.services.runtime.sequences import Event
from llmos.v1 import common_pb2


def value(name: str, **labels: str) -> float:
    """The sample's current value; 0 for a series not created yet."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------- which port


def test_by_default_a_process_serves_metrics_on_its_grpc_port_plus_the_offset() -> None:
    settings = Settings()
    assert METRICS_PORT_OFFSET == 1000
    assert settings.metrics_port_for(50051) == 51051  # the kernel
    assert settings.metrics_port_for(50052) == 51052  # the runtime, and so on


def test_an_explicit_metrics_port_is_the_kernels_and_the_others_add_their_offset() -> None:
    settings = Settings(port=6000, metrics_port=9100)
    assert settings.metrics_port_for(6000) == 9100
    assert settings.metrics_port_for(6001) == 9101
    assert settings.metrics_port_for(6005) == 9105


def test_minus_one_turns_the_endpoint_off() -> None:
    assert Settings(metrics_port=-1).metrics_port_for(50051) is None


@pytest.mark.parametrize(
    ("settings", "grpc_port"),
    [
        (Settings(metrics_port=-2), 50051),
        (Settings(), 65000),  # 66000 is no port
        (Settings(port=6000, metrics_port=65535), 6001),
    ],
)
def test_impossible_metrics_ports_are_refused(settings: Settings, grpc_port: int) -> None:
    with pytest.raises(InvalidArgument) as raised:
        settings.metrics_port_for(grpc_port)
    assert raised.value.reason == "BAD_SETTING"


def test_the_metrics_port_is_a_setting_like_the_others() -> None:
    settings = load_settings({"data_dir": "/nonexistent"}, env={"LLMOS_METRICS_PORT": "-1"})
    assert settings.metrics_port == -1


# ---------------------------------------------------------------- the kernel's metrics


def test_a_task_entering_a_state_counts_under_that_state() -> None:
    before = value("llmos_kernel_tasks_total", state="succeeded")
    kernel_metrics.task_entered(common_pb2.TASK_STATE_SUCCEEDED)
    kernel_metrics.task_entered(common_pb2.TASK_STATE_SUCCEEDED)
    assert value("llmos_kernel_tasks_total", state="succeeded") == before + 2


def test_every_task_state_is_exported_from_the_start() -> None:
    for state in ("queued", "running", "succeeded", "failed", "cancelled", "refused"):
        assert REGISTRY.get_sample_value("llmos_kernel_tasks_total", {"state": state}) is not None


def test_a_dispatch_observes_the_queue_wait_of_its_class() -> None:
    name = "llmos_kernel_queue_wait_seconds"
    count = value(f"{name}_count", priority="batch")
    total = value(f"{name}_sum", priority="batch")
    kernel_metrics.task_dispatched(Priority.BATCH, 0.75)
    assert value(f"{name}_count", priority="batch") == count + 1
    assert value(f"{name}_sum", priority="batch") == pytest.approx(total + 0.75)
    assert value(f"{name}_bucket", priority="batch", le="0.5") == value(
        f"{name}_bucket", priority="batch", le="0.25"
    )


def test_a_trace_step_observes_its_duration_by_stage_and_decision() -> None:
    name = "llmos_kernel_stage_duration_seconds"
    labels = {"stage": "safety:input", "decision": "not_available"}
    count = value(f"{name}_count", **labels)
    step = common_pb2.TraceStep(
        stage="safety:input", decision="not_available", duration=Duration(nanos=2_000_000)
    )
    kernel_metrics.stage_ran(step)
    assert value(f"{name}_count", **labels) == count + 1
    assert value(f"{name}_bucket", **labels, le="0.0025") >= 1


def test_a_trace_step_without_a_duration_is_not_a_latency() -> None:
    name = "llmos_kernel_stage_duration_seconds_count"
    before = value(name, stage="record", decision="succeeded")
    kernel_metrics.stage_ran(common_pb2.TraceStep(stage="record", decision="succeeded"))
    assert value(name, stage="record", decision="succeeded") == before


def test_a_refused_admission_counts_by_class_and_reason() -> None:
    name = "llmos_kernel_admissions_refused_total"
    before = value(name, priority="interactive", reason="QUEUE_FULL")
    kernel_metrics.admission_refused(Priority.INTERACTIVE, "QUEUE_FULL")
    assert value(name, priority="interactive", reason="QUEUE_FULL") == before + 1


@pytest.fixture
def watched() -> Iterator[Scheduler]:
    scheduler = Scheduler(SchedulerConfig(queue_limits={Priority.BATCH: 7}))
    kernel_metrics.watch_scheduler(scheduler, ["runtime"])
    yield scheduler
    kernel_metrics.SCHEDULER.scheduler = None


def ticket(task_id: str, priority: Priority) -> Ticket:
    return Ticket(task_id, "acme", priority, "runtime", enqueued_at=0.0)


def test_queue_depth_and_running_tasks_are_read_from_the_scheduler(watched: Scheduler) -> None:
    assert value("llmos_kernel_queue_depth", priority="normal") == 0
    watched.admit(ticket("a", Priority.NORMAL), 0.0)
    watched.admit(ticket("b", Priority.NORMAL), 0.0)
    watched.admit(ticket("c", Priority.BATCH), 0.0)
    assert value("llmos_kernel_queue_depth", priority="normal") == 2
    assert value("llmos_kernel_queue_depth", priority="batch") == 1
    assert value("llmos_kernel_running_tasks", service="runtime") == 0

    dispatched = watched.dispatch(0.0).ticket
    assert dispatched is not None
    assert value("llmos_kernel_queue_depth", priority="normal") == 1
    assert value("llmos_kernel_running_tasks", service="runtime") == 1
    watched.release(dispatched.task_id)
    assert value("llmos_kernel_running_tasks", service="runtime") == 0


def test_queue_limits_are_the_configured_ones_or_the_defaults(watched: Scheduler) -> None:
    assert value("llmos_kernel_queue_limit", priority="batch") == 7
    assert value("llmos_kernel_queue_limit", priority="interactive") == 256


def test_without_a_scheduler_the_gauges_have_no_series() -> None:
    assert REGISTRY.get_sample_value("llmos_kernel_queue_depth", {"priority": "normal"}) is None


# ---------------------------------------------------------------- the runtime's stream meter


def token(token_id: int) -> Event:
    return Event(text=f"t{token_id}", token_ids=[token_id])


def final(reason: common_pb2.FinishReason.ValueType, ttft: float = 0.1) -> Event:
    return Event(text="", token_ids=[], finish_reason=reason, time_to_first_token_s=ttft)


def runtime_values(model: str) -> dict[str, float]:
    return {
        "tokens": value("llmos_runtime_generated_tokens_total", model=model),
        "prompt": value("llmos_runtime_prompt_tokens_total", model=model),
        "ttft": value("llmos_runtime_time_to_first_token_seconds_count", model=model),
        "itl": value("llmos_runtime_inter_token_latency_seconds_count", model=model),
        "stop": value("llmos_runtime_requests_total", model=model, finish_reason="stop"),
        "abandoned": value("llmos_runtime_requests_total", model=model, finish_reason="abandoned"),
    }


def test_a_stream_counts_its_tokens_one_first_token_and_the_gaps_between() -> None:
    meter = StreamMeter("unit-a", arrived=0.0, prompt_tokens=11)
    for event in (token(1), token(2), token(3), final(common_pb2.FINISH_REASON_STOP)):
        meter.event(event)
    meter.close()
    assert runtime_values("unit-a") == {
        "tokens": 3,
        "prompt": 11,
        "ttft": 1,
        "itl": 2,
        "stop": 1,
        "abandoned": 0,
    }


def test_a_stream_whose_caller_leaves_early_counts_as_abandoned() -> None:
    meter = StreamMeter("unit-b", arrived=0.0, prompt_tokens=4)
    meter.event(token(1))
    meter.close()
    assert runtime_values("unit-b")["abandoned"] == 1
    assert runtime_values("unit-b")["stop"] == 0


def test_an_end_of_sequence_first_token_still_has_a_time_to_first_token() -> None:
    meter = StreamMeter("unit-c", arrived=0.0, prompt_tokens=4)
    meter.event(final(common_pb2.FINISH_REASON_STOP, ttft=0.2))
    meter.close()
    counts = runtime_values("unit-c")
    assert (counts["tokens"], counts["ttft"], counts["itl"], counts["stop"]) == (0, 1, 0, 1)


def test_a_stream_refused_before_any_token_has_no_time_to_first_token() -> None:
    meter = StreamMeter("unit-d", arrived=0.0, prompt_tokens=4)
    meter.event(final(common_pb2.FINISH_REASON_CANCELLED, ttft=0.0))
    meter.close()
    assert runtime_values("unit-d")["ttft"] == 0
    assert value("llmos_runtime_requests_total", model="unit-d", finish_reason="cancelled") == 1
