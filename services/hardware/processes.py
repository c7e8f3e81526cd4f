"""Processes as psutil sees them on this host: the registered services' RSS and CPU, and
whether a reservation's holder still runs.

A pid alone is not an identity (pids are reused), so a process is known by its pid and
its creation time; a zombie (killed, not yet reaped by its parent) counts as ended.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import psutil

from llmos.services.hardware.ledger import Holder
from llmos.v1 import hardware_pb2

# CPU percentages are measured between two readings; closer readings than this would be
# mostly rounding noise (the kernel counts CPU time in ticks), so they reuse the last one.
MIN_CPU_WINDOW_S = 0.5


def started_at(pid: int) -> float | None:
    """The creation time of running process `pid`, or None when there is none."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return float(process.create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def is_alive(holder: Holder) -> bool:
    """Whether the holder's process still runs (the same one: a reused pid does not count)."""
    if holder.pid is None:
        return True
    created = started_at(holder.pid)
    return created is not None and (holder.started_at is None or created == holder.started_at)


class ProcessTable:
    """Per-process readings for the services the kernel lists, CPU measured between calls.

    Keeps one psutil.Process per pid, because psutil measures a process's CPU percentage
    since the previous reading of the same object.
    """

    def __init__(self) -> None:
        self._processes: dict[int, psutil.Process] = {}
        self._last: dict[int, tuple[float, float]] = {}  # pid -> (read at, cpu percent)
        self._lock = threading.Lock()

    def _cpu_percent(self, process: psutil.Process, now: float) -> float:
        last = self._last.get(process.pid)
        if last is not None and now - last[0] < MIN_CPU_WINDOW_S:
            return last[1]
        percent = float(process.cpu_percent(interval=None))
        self._last[process.pid] = (now, percent)
        return percent

    def read(self, services: Sequence[tuple[str, int]]) -> list[hardware_pb2.ProcessStats]:
        """RSS and CPU percent (of one core, as top shows it) of each (name, pid) running on
        this host; a pid that is not here (another host, or gone) is left out."""
        with self._lock:
            now = time.monotonic()
            stats = []
            wanted = {pid for _, pid in services if pid > 0}
            for pid in list(self._processes):
                if pid not in wanted:
                    del self._processes[pid]
                    self._last.pop(pid, None)
            for name, pid in services:
                if pid <= 0:
                    continue
                try:
                    process = self._processes.get(pid)
                    if process is None or not process.is_running():
                        process = psutil.Process(pid)
                        process.cpu_percent(interval=None)  # the first reading starts the window
                        self._processes[pid] = process
                        self._last[pid] = (now, 0.0)
                    with process.oneshot():
                        rss = int(process.memory_info().rss)
                        cpu = self._cpu_percent(process, now)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    self._processes.pop(pid, None)
                    continue
                stats.append(
                    hardware_pb2.ProcessStats(service=name, pid=pid, rss_bytes=rss, cpu_percent=cpu)
                )
            return stats
