"""The host's CPU and memory as psutil reads them.

CPU percentages are busy time over elapsed time between two readings of the CPU time
counters. The reader keeps its own previous counters rather than using
`psutil.cpu_percent(interval=None)`, whose one module-wide window any other caller in the
process (a metrics scrape, say) would reset. Readings closer together than
`MIN_CPU_WINDOW_S` reuse the last figures, so several Watch streams at short intervals
share one honest measurement instead of a few milliseconds of rounding noise.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import psutil

from llmos.services.hardware.ledger import Capacity
from llmos.services.hardware.processes import MIN_CPU_WINDOW_S
from llmos.v1 import hardware_pb2

# Linux counts guest time inside user and nice already (psutil subtracts it the same way).
_COUNTED_TWICE = ("guest", "guest_nice")
_IDLE = ("idle", "iowait")


def busy_percent(before: Any, after: Any) -> float:
    """Share of elapsed CPU time that was busy between two `psutil.cpu_times()` readings."""

    def total(times: Any) -> float:
        fields = times._asdict()
        return float(sum(fields.values()) - sum(fields.get(name, 0.0) for name in _COUNTED_TWICE))

    def idle(times: Any) -> float:
        fields = times._asdict()
        return float(sum(fields.get(name, 0.0) for name in _IDLE))

    elapsed = total(after) - total(before)
    if elapsed <= 0:
        return 0.0
    busy = elapsed - (idle(after) - idle(before))
    return round(min(100.0, max(0.0, 100.0 * busy / elapsed)), 1)


def _percents(before: Sequence[Any], after: Sequence[Any]) -> list[float]:
    return [busy_percent(b, a) for b, a in zip(before, after, strict=False)]


class HostReader:
    """CPU (total, per core, load average, cores) and memory (total, available)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._times = psutil.cpu_times()
        self._per_core_times = psutil.cpu_times(percpu=True)
        self._read_at = time.monotonic()
        self._percent = 0.0
        self._per_core = [0.0] * len(self._per_core_times)

    def cpu(self) -> hardware_pb2.CpuStats:
        with self._lock:
            now = time.monotonic()
            if now - self._read_at >= MIN_CPU_WINDOW_S:
                times, per_core_times = psutil.cpu_times(), psutil.cpu_times(percpu=True)
                self._percent = busy_percent(self._times, times)
                self._per_core = _percents(self._per_core_times, per_core_times)
                self._times, self._per_core_times, self._read_at = times, per_core_times, now
            return hardware_pb2.CpuStats(
                percent=self._percent,
                per_core_percent=self._per_core,
                load_average=list(os.getloadavg()),
                cores=psutil.cpu_count() or len(self._per_core),
            )

    def memory(self) -> Capacity:
        """Total and available host memory ("available": what can be allocated without
        swapping, page cache that can be dropped included, as `free` reports it)."""
        memory = psutil.virtual_memory()
        return Capacity(total_bytes=int(memory.total), available_bytes=int(memory.available))
