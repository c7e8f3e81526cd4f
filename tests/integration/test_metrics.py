"""Prometheus /metrics from real processes, scraped over HTTP.

First one process alone (`llmos serve safety`, no kernel, no model): where it serves its
metrics, that -1 turns them off, and that a taken metrics port stops it. Then the whole
stack (`llmos up` with the real model): every process serves its metrics at the address
it registered and `llmos status` lists, the runtime's series move when a Generate runs,
the hardware process reports the host, and every query of the Grafana dashboard selects
names the processes really export.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from promql import dashboard_queries, exported_names, query_metric_names
from stacktools import REPO, Stack, free_port_block, stack_data_dir

from llmos.kernel.stack import BY_NAME, STACK
from llmos.services.config import METRICS_PORT_OFFSET, Settings
from llmos.v1 import common_pb2, kernel_pb2

DASHBOARD = REPO / "deploy" / "grafana" / "llmos-dashboard.json"
SAFETY_OFFSET = BY_NAME["safety"].port_offset


@dataclass
class Scrape:
    """One /metrics answer, parsed."""

    text: str

    def samples(self, name: str) -> list[Sample]:
        return [
            sample
            for family in text_string_to_metric_families(self.text)
            for sample in family.samples
            if sample.name == name
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 for a series that does not exist yet."""
        for sample in self.samples(name):
            if all(sample.labels.get(key) == wanted for key, wanted in labels.items()):
                return float(sample.value)
        return 0.0


def scrape(address: str, timeout: float = 10) -> Scrape:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        return Scrape(reply.read().decode())


def wait_for_scrape(address: str, process: subprocess.Popen[bytes], log: Path) -> Scrape:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the process exited with {process.returncode}: {log.read_text()}")
        try:
            return scrape(address, timeout=2)
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    pytest.fail(f"no /metrics at {address} after 60 s; see {log}")


# ---------------------------------------------------------------- one process alone


@dataclass
class Alone:
    process: subprocess.Popen[bytes]
    port: int  # the kernel port the process was given; it serves on port + its offset
    log: Path


def serve_alone(tmp_path: Path, shared_data_dir: Path, port: int, **env: str) -> Alone:
    """`llmos serve safety` in `tmp_path`; its data directory links the session's models
    folder, where the safety encoder is exported once."""
    log = tmp_path / "safety.log"
    data_dir = stack_data_dir(shared_data_dir, tmp_path)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "llmos.kernel.cli", "serve", "safety", "--port", str(port),
             "--data-dir", str(data_dir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LLMOS_LOG_FORMAT": "json", **env},
        )  # fmt: skip
    return Alone(process, port, log)


@pytest.fixture
def alone(tmp_path: Path, shared_data_dir: Path) -> Iterator[Alone]:
    running = serve_alone(tmp_path, shared_data_dir, free_port_block(SAFETY_OFFSET + 1))
    yield running
    running.process.terminate()
    running.process.wait(timeout=30)


def test_a_process_serves_metrics_on_its_grpc_port_plus_the_offset(alone: Alone) -> None:
    grpc_port = alone.port + SAFETY_OFFSET
    metrics = wait_for_scrape(
        f"127.0.0.1:{grpc_port + METRICS_PORT_OFFSET}", alone.process, alone.log
    )
    (info,) = metrics.samples("llmos_process_info")
    assert info.labels["name"] == "safety"
    assert info.labels["kind"] == "safety"
    assert info.value == 1
    # prometheus_client's process collector: every process reports its own CPU and memory.
    assert metrics.value("process_resident_memory_bytes") > 10 * 2**20
    assert metrics.value("process_cpu_seconds_total") > 0
    # A safety process has no kernel, runtime or host families.
    assert "llmos_runtime_" not in metrics.text
    assert "llmos_kernel_" not in metrics.text
    assert "llmos_host_" not in metrics.text


def test_a_stopped_process_frees_its_metrics_port(tmp_path: Path, shared_data_dir: Path) -> None:
    running = serve_alone(tmp_path, shared_data_dir, free_port_block(SAFETY_OFFSET + 1))
    metrics_port = running.port + SAFETY_OFFSET + METRICS_PORT_OFFSET
    wait_for_scrape(f"127.0.0.1:{metrics_port}", running.process, running.log)
    running.process.terminate()
    assert running.process.wait(timeout=30) == 0
    with socket.socket() as probe:
        # Free again for the next server (which sets SO_REUSEADDR, as this probe does,
        # since the scrape's connection may still be in TIME_WAIT).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", metrics_port))
        probe.listen()


def test_metrics_port_minus_one_serves_no_metrics(tmp_path: Path, shared_data_dir: Path) -> None:
    port = free_port_block(SAFETY_OFFSET + 1)
    running = serve_alone(tmp_path, shared_data_dir, port, LLMOS_METRICS_PORT="-1")
    try:
        deadline = time.monotonic() + 60
        while "is ready" not in running.log.read_text() and time.monotonic() < deadline:
            assert running.process.poll() is None, running.log.read_text()
            time.sleep(0.2)
        metrics_port = port + SAFETY_OFFSET + METRICS_PORT_OFFSET
        with pytest.raises(urllib.error.URLError):
            scrape(f"127.0.0.1:{metrics_port}", timeout=2)
    finally:
        running.process.terminate()
        running.process.wait(timeout=30)


def test_a_taken_metrics_port_stops_the_process_and_says_why(
    tmp_path: Path, shared_data_dir: Path
) -> None:
    port = free_port_block(SAFETY_OFFSET + 1)
    metrics_port = port + SAFETY_OFFSET + METRICS_PORT_OFFSET
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", metrics_port))
        holder.listen()
        running = serve_alone(tmp_path, shared_data_dir, port)
        status = running.process.wait(timeout=60)
    output = running.log.read_text()
    assert status != 0
    assert f"cannot serve /metrics on 127.0.0.1:{metrics_port}" in output
    assert "LLMOS_METRICS_PORT" in output


# ---------------------------------------------------------------- the whole stack


def metrics_addresses(stack: Stack) -> dict[str, str]:
    """Every process's metrics address: the services' as registered, the kernel's by rule."""
    addresses = {name: info.metrics_address for name, info in stack.services().items()}
    addresses["kernel"] = f"127.0.0.1:{stack.port + METRICS_PORT_OFFSET}"
    return addresses


@pytest.mark.model
def test_every_process_registers_its_metrics_address_and_serves_there(stack: Stack) -> None:
    addresses = metrics_addresses(stack)
    assert set(addresses) == {spec.name for spec in STACK}
    for spec in STACK:
        expected = f"127.0.0.1:{spec.port(Settings(port=stack.port)) + METRICS_PORT_OFFSET}"
        assert addresses[spec.name] == expected, spec.name
        metrics = scrape(addresses[spec.name])
        (info,) = metrics.samples("llmos_process_info")
        assert info.labels["name"] == spec.name
        assert metrics.value("process_resident_memory_bytes") > 0, spec.name
        assert metrics.samples("process_cpu_seconds_total"), spec.name


@pytest.mark.model
def test_status_lists_every_metrics_address(stack: Stack) -> None:
    addresses = metrics_addresses(stack)
    report = stack.llmos("status", "--json")
    assert report.returncode == 0, report.stderr
    listed = {row["name"]: row["metrics_address"] for row in json.loads(report.stdout)["services"]}
    assert listed == addresses

    table = stack.llmos("status")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["SERVICE", "ADDRESS", "PID", "HEALTH", "METRICS"]
    assert {row.split()[0]: row.split()[-1] for row in rows} == addresses


def generate(
    stack: Stack, max_tokens: int, prompt: str = "Name three colours."
) -> kernel_pb2.GenerateResponse:
    request = kernel_pb2.GenerateRequest(
        prompt=prompt,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens),
    )
    with stack.channel() as channel:
        pieces = list(stack.kernel(channel).Generate(request, timeout=60))
    return pieces[-1]


@pytest.mark.model
def test_the_runtime_series_move_when_a_generate_runs(stack: Stack) -> None:
    address = metrics_addresses(stack)["runtime"]
    model = {"model": "SmolLM2-135M-Instruct"}
    stack.wait_runtime_idle()
    before = scrape(address)

    last = generate(stack, max_tokens=12)
    completion = last.usage.completion_tokens
    assert completion >= 2
    stack.wait_runtime_idle()
    after = scrape(address)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **model, **labels) - before.value(name, **model, **labels)

    assert moved("llmos_runtime_generated_tokens_total") == completion
    assert moved("llmos_runtime_prompt_tokens_total") == last.usage.prompt_tokens
    assert moved("llmos_runtime_time_to_first_token_seconds_count") == 1
    assert moved("llmos_runtime_inter_token_latency_seconds_count") == completion - 1
    finish = common_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_")
    assert moved("llmos_runtime_requests_total", finish_reason=finish.lower()) == 1
    # One sequence alone: every decoding step had a batch of one.
    steps = moved("llmos_runtime_batch_sequences_count")
    assert steps >= completion - 1
    assert moved("llmos_runtime_batch_sequences_sum") == steps
    # The first iteration prefills (the first token) and decodes (the second).
    assert moved("llmos_runtime_engine_steps_total") >= completion - 1
    # Alone, nothing to copy a prefix from: its prompt was run whole, as HF runs it.
    assert moved("llmos_runtime_prompt_tokens_reused_total") == 0
    # The time to first token is positive and no larger than the whole request took.
    assert 0 < moved("llmos_runtime_time_to_first_token_seconds_sum") < 60

    assert after.value("llmos_runtime_running_sequences", **model) == 0
    assert after.value("llmos_runtime_queued_sequences", **model) == 0
    assert after.value("llmos_runtime_batch_limit_sequences", **model) == 32
    assert after.value("llmos_runtime_kv_cache_budget_bytes", **model) == 1024 * 2**20
    assert after.value("llmos_runtime_model_weight_bytes", **model) > 100 * 2**20


@pytest.mark.model
def test_a_running_sequence_shows_in_the_batch_and_kv_cache_gauges(stack: Stack) -> None:
    address = metrics_addresses(stack)["runtime"]
    model = {"model": "SmolLM2-135M-Instruct"}
    stack.wait_runtime_idle()
    done = threading.Event()

    def long_answer() -> None:
        try:
            generate(stack, max_tokens=200, prompt="Write a long story about a dragon.")
        finally:
            done.set()

    worker = threading.Thread(target=long_answer)
    worker.start()
    seen_running = seen_reserved = seen_allocated = 0.0
    while not done.is_set():
        metrics = scrape(address)
        seen_running = max(seen_running, metrics.value("llmos_runtime_running_sequences", **model))
        seen_reserved = max(
            seen_reserved, metrics.value("llmos_runtime_kv_cache_reserved_bytes", **model)
        )
        seen_allocated = max(
            seen_allocated, metrics.value("llmos_runtime_kv_cache_allocated_bytes", **model)
        )
        time.sleep(0.05)
    worker.join()
    assert seen_running == 1
    assert seen_reserved > 0
    assert seen_allocated > 0
    stack.wait_runtime_idle()
    assert scrape(address).value("llmos_runtime_kv_cache_reserved_bytes", **model) == 0


@pytest.mark.model
def test_the_kernel_exports_its_scheduler_and_task_families(stack: Stack) -> None:
    metrics = scrape(metrics_addresses(stack)["kernel"])
    names = exported_names(metrics.text)
    for family in (
        "llmos_kernel_queue_depth",
        "llmos_kernel_queue_limit",
        "llmos_kernel_running_tasks",
        "llmos_kernel_queue_wait_seconds_bucket",
        "llmos_kernel_tasks_total",
        "llmos_kernel_stage_duration_seconds_count",
        "llmos_kernel_admissions_refused_total",
    ):
        assert family in names, family
    states = {sample.labels["state"] for sample in metrics.samples("llmos_kernel_tasks_total")}
    assert states == {"queued", "running", "succeeded", "failed", "cancelled", "refused"}
    assert "llmos_runtime_" not in metrics.text, "the kernel has no runtime families"


@pytest.mark.model
def test_the_kernel_series_move_when_work_runs(stack: Stack) -> None:
    """One Generate through the kernel: counted queued, running and succeeded, one
    queue wait observed for its class, one duration for each stage it ran; the queue and
    running gauges back at zero once it is done."""
    address = metrics_addresses(stack)["kernel"]
    stack.wait_runtime_idle()
    before = scrape(address)
    last = generate(stack, max_tokens=6)
    assert last.finish_reason
    after = scrape(address)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    for state in ("queued", "running", "succeeded"):
        assert moved("llmos_kernel_tasks_total", state=state) == 1, state
    for state in ("failed", "cancelled", "refused"):
        assert moved("llmos_kernel_tasks_total", state=state) == 0, state
    assert moved("llmos_kernel_queue_wait_seconds_count", priority="normal") == 1
    assert 0 <= moved("llmos_kernel_queue_wait_seconds_sum", priority="normal") < 5
    assert moved("llmos_kernel_stage_duration_seconds_count", stage="admit") == 1
    generated = {"stage": "runtime:generate", "decision": "completed"}
    assert moved("llmos_kernel_stage_duration_seconds_count", **generated) == 1
    assert 0 < moved("llmos_kernel_stage_duration_seconds_sum", **generated) < 60
    # Every stage that wrote a step with a duration was observed once.
    stages = {
        sample.labels["stage"]
        for sample in after.samples("llmos_kernel_stage_duration_seconds_count")
        if moved("llmos_kernel_stage_duration_seconds_count", **sample.labels) == 1
    }
    assert {"admit", "safety:input", "privacy:redact", "runtime:generate"} <= stages
    assert after.value("llmos_kernel_queue_depth", priority="normal") == 0
    assert after.value("llmos_kernel_running_tasks", service="runtime") == 0


@pytest.mark.model
def test_the_hardware_process_reports_the_host(stack: Stack) -> None:
    import psutil

    metrics = scrape(metrics_addresses(stack)["hardware"])
    assert metrics.value("llmos_host_cpu_count") == psutil.cpu_count(logical=True)
    assert metrics.value("llmos_host_memory_total_bytes") == psutil.virtual_memory().total
    assert 0 < metrics.value("llmos_host_memory_available_bytes") <= psutil.virtual_memory().total
    assert 0 <= metrics.value("llmos_host_cpu_utilization_ratio") <= 1
    assert {s.labels["window"] for s in metrics.samples("llmos_host_load_average")} == {
        "1m",
        "5m",
        "15m",
    }
    for name in ("kernel", "runtime", "safety"):
        assert "llmos_host_" not in scrape(metrics_addresses(stack)[name]).text, name


@pytest.mark.model
def test_every_dashboard_query_selects_names_the_processes_export(stack: Stack) -> None:
    generate(stack, max_tokens=4)  # so the runtime's labelled series exist too
    exported: set[str] = set()
    for address in metrics_addresses(stack).values():
        exported |= exported_names(scrape(address).text)
    queries = dashboard_queries(json.loads(DASHBOARD.read_text(encoding="utf-8")))
    assert queries
    for query in queries:
        names = query_metric_names(query)
        assert names, query
        missing = sorted(names - exported)
        assert not missing, f"the dashboard query {query!r} selects {missing}: not exported"
