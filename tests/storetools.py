"""Task records for tests that talk to a task store directly."""

from __future__ import annotations

from llmos.kernel.store import TaskRecord
from llmos.v1 import common_pb2


def bare_record(task_id: str) -> TaskRecord:
    """A new QUEUED task of tenant "acme" on the echo model, with an empty request."""
    return TaskRecord.queued(
        task_id,
        tenant="acme",
        model="echo",
        priority=common_pb2.PRIORITY_NORMAL,
        request=b"",
        now=1.0,
    )
