"""Protobuf time values for usage figures and trace steps, made in one place."""

from __future__ import annotations

import time

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp


def now_timestamp() -> Timestamp:
    """The wall-clock time now, for a trace step's start. From `time.time_ns()`: protobuf's
    `GetCurrentTime` goes through `datetime` and costs four times as much, several times on
    every request."""
    stamp = Timestamp()
    stamp.FromNanoseconds(time.time_ns())
    return stamp


def duration(seconds: float) -> Duration:
    value = Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def since(monotonic_start: float) -> Duration:
    """Time elapsed since a time.monotonic() reading."""
    return duration(time.monotonic() - monotonic_start)


def timestamp_at(epoch_seconds: float) -> Timestamp:
    """A time.time() reading as a Timestamp (a reservation's expiry, say)."""
    stamp = Timestamp()
    stamp.FromNanoseconds(int(epoch_seconds * 1e9))
    return stamp
