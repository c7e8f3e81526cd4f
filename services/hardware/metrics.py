"""Host gauges (CPU, memory, load) on the hardware service's /metrics, read at scrape time.

Every process already reports its own CPU time and resident memory (`process_*`, from
prometheus_client's process collector). What the machine as a whole has left is reported
once, by the hardware process, since it is the one that manages the machine: six
processes reporting the same host figures would only multiply the series.

Imported by the hardware process only (`llmos.services.metrics.KIND_COLLECTORS`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import psutil
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class HostCollector(Collector):
    """The machine's CPU and memory, from psutil, when Prometheus scrapes."""

    def __init__(self) -> None:
        # Utilization is measured between scrapes from our own reading of the CPU times
        # (psutil.cpu_percent(None) keeps one baseline per process, which the hardware
        # service's own calls would move).
        self._last = psutil.cpu_times()

    def describe(self) -> Iterable[Metric]:
        return self._families(read=False)

    def collect(self) -> Iterable[Metric]:
        return self._families(read=True)

    def _busy_ratio(self) -> float:
        now = psutil.cpu_times()
        last, self._last = self._last, now
        idle = (now.idle + getattr(now, "iowait", 0.0)) - (last.idle + getattr(last, "iowait", 0.0))
        total = sum(now) - sum(last)
        return 0.0 if total <= 0 else min(1.0, max(0.0, 1.0 - idle / total))

    def _families(self, *, read: bool) -> Iterator[Metric]:
        cpu = GaugeMetricFamily(
            "llmos_host_cpu_utilization_ratio",
            "Share of all the host's CPUs busy since the previous scrape (0-1).",
        )
        cpus = GaugeMetricFamily("llmos_host_cpu_count", "Logical CPUs of the host.")
        load = GaugeMetricFamily(
            "llmos_host_load_average",
            "The host's load average (runnable and waiting processes) over a window.",
            labels=["window"],
        )
        total = GaugeMetricFamily("llmos_host_memory_total_bytes", "The host's physical memory.")
        available = GaugeMetricFamily(
            "llmos_host_memory_available_bytes",
            "Memory the host can give new work without swapping (MemAvailable).",
        )
        if read:
            cpu.add_metric([], self._busy_ratio())
            cpus.add_metric([], psutil.cpu_count(logical=True) or 0)
            for window, value in zip(("1m", "5m", "15m"), os.getloadavg(), strict=True):
                load.add_metric([window], value)
            memory = psutil.virtual_memory()
            total.add_metric([], memory.total)
            available.add_metric([], memory.available)
        yield from (cpu, cpus, load, total, available)


REGISTRY.register(HostCollector())
