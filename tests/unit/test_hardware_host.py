"""CPU percentages from two readings of the CPU time counters (services/hardware/host.py)."""

from __future__ import annotations

import collections

import psutil

from llmos.services.hardware.host import HostReader, busy_percent

Times = collections.namedtuple("Times", "user nice system idle iowait guest guest_nice")


def test_busy_share_of_elapsed_time() -> None:
    before = Times(10, 0, 5, 80, 5, 0, 0)
    after = Times(40, 0, 15, 120, 5, 0, 0)  # 40 busy of 80 elapsed
    assert busy_percent(before, after) == 50.0


def test_iowait_counts_as_idle_and_guest_time_is_not_counted_twice() -> None:
    before = Times(0, 0, 0, 0, 0, 0, 0)
    # 30 s user of which 20 s ran a guest (Linux counts it inside user too), 70 s waiting.
    after = Times(30, 0, 0, 50, 20, 20, 0)
    assert busy_percent(before, after) == 30.0


def test_no_elapsed_time_reads_zero_not_a_division_error() -> None:
    same = Times(1, 2, 3, 4, 5, 0, 0)
    assert busy_percent(same, same) == 0.0


def test_the_reader_reports_this_host() -> None:
    reader = HostReader()
    cpu = reader.cpu()
    assert cpu.cores == psutil.cpu_count()
    assert len(cpu.per_core_percent) == psutil.cpu_count()
    assert len(cpu.load_average) == 3
    assert 0 <= cpu.percent <= 100
    memory = reader.memory()
    assert 0 < memory.available_bytes <= memory.total_bytes == psutil.virtual_memory().total
