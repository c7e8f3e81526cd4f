"""Durable task state: the `TaskStore` contract and its backends.

`contract` defines the records, events and rules every backend shares; `sqlite` is the
embedded default (one file under the data directory). A Redis backend for several kernels
(not built yet) must implement the same contract and pass the same tests
(tests/contract/test_task_store.py).
"""

from llmos.kernel.store.contract import (
    DEFAULT_PAGE_SIZE,
    FINAL_STATES,
    MAX_EVENTS_PER_READ,
    MAX_PAGE_SIZE,
    TRANSITIONS,
    EventKind,
    FinishReason,
    Priority,
    RecoveryReport,
    RewrapReport,
    TaskEvent,
    TaskRecord,
    TaskState,
    TaskStore,
    check_transition,
    decode_page_token,
    encode_page_token,
    finished_or_gone,
)
from llmos.kernel.store.sqlite import SqliteTaskStore

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "FINAL_STATES",
    "MAX_EVENTS_PER_READ",
    "MAX_PAGE_SIZE",
    "TRANSITIONS",
    "EventKind",
    "FinishReason",
    "Priority",
    "RecoveryReport",
    "RewrapReport",
    "SqliteTaskStore",
    "TaskEvent",
    "TaskRecord",
    "TaskState",
    "TaskStore",
    "check_transition",
    "decode_page_token",
    "encode_page_token",
    "finished_or_gone",
]
