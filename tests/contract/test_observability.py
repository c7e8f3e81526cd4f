"""The observability files agree with the code: the operator guide's metrics table, the
Grafana dashboard, the Prometheus scrape configs and their wiring in docker-compose.yml.

No process is started here: the families are read from the registry after importing the
modules that define them, and the ports from kernel/stack.py and the settings. The same
dashboard is checked against the /metrics of real processes in
tests/integration/test_metrics.py.
"""

from __future__ import annotations

import importlib
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, generate_latest
from promql import SUFFIXES, dashboard_panels, dashboard_queries, query_metric_names

from llmos.kernel.stack import STACK
from llmos.services.config import Settings
from llmos.services.metrics import KIND_COLLECTORS

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "operator-guide.md"
DASHBOARD = REPO / "deploy" / "grafana" / "llmos-dashboard.json"
PROMETHEUS = REPO / "deploy" / "prometheus" / "prometheus.yml"
PROMETHEUS_LOCAL = REPO / "deploy" / "prometheus" / "prometheus-local.yml"
COMPOSE = REPO / "docker-compose.yml"
ROW = re.compile(r"^\| `([a-z_:]+)` \| (gauge|counter|histogram) \| ([^|]*)\|")
PREFIXES = ("llmos_", "process_")


@cache
def documented() -> dict[str, tuple[str, set[str]]]:
    """The operator guide's metrics table: name -> (type, labels)."""
    text = GUIDE.read_text(encoding="utf-8")
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    table: dict[str, tuple[str, set[str]]] = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            labels = set(re.findall(r"`(\w+)`", match.group(3)))
            table[match.group(1)] = (match.group(2), labels)
    assert table, f"no metrics table under '## Metrics' in {GUIDE}"
    return table


@cache
def defined() -> dict[str, tuple[str, set[str]]]:
    """The llmos_ families the code defines (every kind's module imported), by exported name."""
    for module in KIND_COLLECTORS.values():
        importlib.import_module(module)
    importlib.import_module("llmos.services.metrics")
    families: dict[str, tuple[str, set[str]]] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("llmos_"):
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {label for sample in family.samples for label in sample.labels} - {"le"}
        families[name] = (family.type, labels)
    return families


def documented_names() -> set[str]:
    """Every name a query may use for the documented families."""
    names: set[str] = set()
    for name, (kind, _) in documented().items():
        base = name.removesuffix("_total") if kind == "counter" else name
        names |= {name, base, *(base + suffix for suffix in SUFFIXES.get(kind, ()))}
    return names


def metrics_port(name: str) -> int:
    spec = next(spec for spec in STACK if spec.name == name)
    port = Settings().metrics_port_for(spec.port(Settings()))
    assert port is not None
    return port


def targets(path: Path) -> set[str]:
    config: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    return {target for static in job["static_configs"] for target in static["targets"]}


# ---------------------------------------------------------------- the operator guide


def test_every_llmos_family_the_code_defines_is_documented_with_its_type() -> None:
    missing = sorted(set(defined()) - set(documented()))
    assert not missing, f"add these to the metrics table in {GUIDE.name}: {missing}"
    for name, (kind, _) in defined().items():
        assert documented()[name][0] == kind, f"{name} is a {kind}"


def test_the_table_documents_no_family_that_does_not_exist() -> None:
    process_families = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in REGISTRY.collect()
        if family.name.startswith("process_")
    }
    stale = sorted(set(documented()) - set(defined()) - process_families)
    assert not stale, f"{GUIDE.name} documents metrics nothing exports: {stale}"


def test_the_labels_documented_are_the_labels_exported() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        name = family.name + ("_total" if family.type == "counter" else "")
        if name not in documented() or not family.samples:
            continue
        labels = {label for sample in family.samples for label in sample.labels} - {"le"}
        assert labels == documented()[name][1], f"{name}: exported labels {sorted(labels)}"


# ---------------------------------------------------------------- the dashboard


@cache
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def test_the_dashboard_queries_only_documented_names() -> None:
    queries = dashboard_queries(dashboard())
    assert len(queries) >= 15
    for query in queries:
        names = query_metric_names(query)
        assert names, f"no metric in {query!r}"
        unknown = sorted(names - documented_names())
        assert not unknown, f"{query!r} uses undocumented names {unknown}"


def test_the_dashboard_covers_tokens_latency_batch_queue_tasks_stages_and_processes() -> None:
    used = set().union(*(query_metric_names(q) for q in dashboard_queries(dashboard())))
    for needed in (
        "llmos_runtime_generated_tokens_total",
        "llmos_runtime_time_to_first_token_seconds_bucket",
        "llmos_runtime_inter_token_latency_seconds_bucket",
        "llmos_runtime_running_sequences",
        "llmos_runtime_kv_cache_allocated_bytes",
        "llmos_kernel_queue_depth",
        "llmos_kernel_queue_wait_seconds_bucket",
        "llmos_kernel_tasks_total",
        "llmos_kernel_stage_duration_seconds_bucket",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "llmos_host_cpu_utilization_ratio",
    ):
        assert needed in used, f"the dashboard charts no {needed}"


def test_every_panel_reads_the_chosen_prometheus_data_source() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard_panels(dashboard())]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard_panels(dashboard()):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
    assert dashboard()["uid"] == "llmos-overview"


# ---------------------------------------------------------------- Prometheus and Compose


def test_the_compose_scrape_config_targets_every_process_at_its_metrics_port() -> None:
    assert targets(PROMETHEUS) == {f"{spec.name}:{metrics_port(spec.name)}" for spec in STACK}


def test_the_local_scrape_config_targets_the_default_stack() -> None:
    expected = {f"127.0.0.1:{metrics_port(spec.name)}" for spec in STACK}
    assert targets(PROMETHEUS_LOCAL) == expected


@cache
def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    return services


def bind_mounts(name: str) -> dict[str, Path]:
    """A Compose service's bind mounts: target -> source in the repository."""
    mounts: dict[str, Path] = {}
    for volume in compose_services()[name].get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith("./"):
            mounts[target] = REPO / source
    return mounts


@pytest.mark.parametrize("name", ["prometheus", "grafana"])
def test_the_observability_containers_mount_files_that_exist(name: str) -> None:
    mounts = bind_mounts(name)
    assert mounts, f"{name} mounts nothing from deploy/"
    for target, source in mounts.items():
        assert source.exists(), f"{name} mounts {source} at {target}, which does not exist"


def test_prometheus_reads_the_compose_scrape_config() -> None:
    assert bind_mounts("prometheus")["/etc/prometheus/prometheus.yml"] == PROMETHEUS
    command = compose_services()["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in command


def test_grafana_provisions_the_data_source_and_the_dashboard() -> None:
    mounts = bind_mounts("grafana")
    provisioning = mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    )["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load(
        (provisioning / "dashboards" / "llmos.yml").read_text(encoding="utf-8")
    )["providers"]
    folder = provider["options"]["path"]
    assert mounts[f"{folder}/{DASHBOARD.name}"] == DASHBOARD
