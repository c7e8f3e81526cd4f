"""The task-store contract, run unchanged against every backend.

Every test in the first part talks to the store only through `TaskStore`, so a new backend
passes by being added to `BACKENDS`. The last part checks what only the SQLite backend
promises: a kernel killed with SIGKILL mid-write loses nothing, one kernel per file, WAL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import os
import random
import signal
import sqlite3
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redistools import REDIS_URL, delete_prefix

from llmos.kernel.store import (
    FINAL_STATES,
    TRANSITIONS,
    RecoveryReport,
    SqliteTaskStore,
    TaskRecord,
    TaskStore,
    encode_page_token,
)
from llmos.kernel.store import sqlite as sqlite_store
from llmos.kernel.store.redis import RedisTaskStore
from llmos.services.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LlmosError,
    NotFound,
    Unavailable,
)
from llmos.services.keyring import KeyRing
from llmos.v1 import common_pb2, kernel_pb2

# One fixed key for every store the tests open, so a store reopened (also by another
# process) opens what it sealed.
KEYS = KeyRing({"test1": bytes(range(32))}, "test1", "tests")

QUEUED = common_pb2.TASK_STATE_QUEUED
RUNNING = common_pb2.TASK_STATE_RUNNING
SUCCEEDED = common_pb2.TASK_STATE_SUCCEEDED
FAILED = common_pb2.TASK_STATE_FAILED
CANCELLED = common_pb2.TASK_STATE_CANCELLED
REFUSED = common_pb2.TASK_STATE_REFUSED
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, REFUSED)

Opener = Callable[[Path], Awaitable[TaskStore]]


async def open_sqlite(data_dir: Path) -> TaskStore:
    return await SqliteTaskStore.open(data_dir, keys=KEYS)


async def open_redis(data_dir: Path) -> TaskStore:
    """A store on the test Redis, under a prefix named after the test's directory, so
    closing and reopening finds the same data."""
    return await RedisTaskStore.open(REDIS_URL, prefix=redis_prefix(data_dir), keys=KEYS)


def redis_prefix(data_dir: Path) -> str:
    """Unique per test directory (a full path, so concurrent pytest runs do not collide)."""
    return f"llmos-contract-{hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]}:"


# Every backend the contract tests run against: adding one is one line here.
BACKENDS: dict[str, Opener] = {
    "sqlite": open_sqlite,
    "redis": open_redis,
}


@dataclasses.dataclass
class Backend:
    """A backend and where its data lives, so a test can close the store and open it again."""

    name: str
    data_dir: Path
    opener: Opener

    async def open(self) -> TaskStore:
        return await self.opener(self.data_dir)


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    name: str = request.param
    data_dir = tmp_path / "data"
    yield Backend(name, data_dir, BACKENDS[name])
    if name == "redis":
        delete_prefix(redis_prefix(data_dir))


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[TaskStore]:
    opened = await backend.open()
    try:
        yield opened
    finally:
        await opened.close()


def new_task(
    task_id: str,
    *,
    tenant: str = "acme",
    created_at: float = 1_000.0,
    prompt: str = "hello",
    priority: common_pb2.Priority.ValueType = common_pb2.PRIORITY_NORMAL,
) -> TaskRecord:
    request = kernel_pb2.GenerateRequest(model="echo", prompt=prompt, priority=priority)
    return TaskRecord.queued(
        task_id,
        tenant=tenant,
        model="echo",
        priority=priority,
        request=request.SerializeToString(),
        now=created_at,
    )


async def running_task(
    store: TaskStore, task_id: str, *, tenant: str = "acme", created_at: float = 1_000.0
) -> TaskRecord:
    await store.create(new_task(task_id, tenant=tenant, created_at=created_at))
    return await store.transition(task_id, RUNNING)


async def all_events(store: TaskStore, task_id: str) -> list[tuple[str, int, str]]:
    return [(e.kind, e.state, e.text) for e in await store.events(task_id)]


# ---------------------------------------------------------------- create and get


async def test_create_then_get_returns_the_record(store: TaskStore) -> None:
    record = new_task("t1", tenant="acme", created_at=1_234.5, prompt="what is 2+2?")
    await store.create(record)

    stored = await store.get("t1")

    assert stored == record
    request = kernel_pb2.GenerateRequest.FromString(stored.request)
    assert request.prompt == "what is 2+2?"
    assert (stored.state, stored.attempts, stored.output, stored.finished_at) == (
        QUEUED,
        0,
        "",
        None,
    )
    (first,) = await store.events("t1")
    assert (first.offset, first.kind, first.state) == (0, "state", QUEUED)


async def test_a_duplicate_id_is_refused_and_the_original_kept(store: TaskStore) -> None:
    await store.create(new_task("t1", prompt="original"))

    with pytest.raises(AlreadyExists) as caught:
        await store.create(new_task("t1", prompt="impostor"))

    assert caught.value.reason == "DUPLICATE_TASK"
    stored = await store.get("t1")
    assert kernel_pb2.GenerateRequest.FromString(stored.request).prompt == "original"
    assert len(await store.events("t1")) == 1


async def test_a_task_started_at_once_is_stored_queued_then_running(store: TaskStore) -> None:
    record = new_task("t1", created_at=time.time())

    await store.create(record, running=True)

    stored = await store.get("t1")
    assert (stored.state, stored.attempts, stored.finished_at) == (RUNNING, 0, None)
    assert stored.request == record.request
    assert stored.updated_at >= record.created_at
    assert await all_events(store, "t1") == [("state", QUEUED, ""), ("state", RUNNING, "")]
    assert await store.append_text("t1", "out") == 2
    assert (await store.list(state=RUNNING))[0] == [await store.get("t1")]


async def test_a_duplicate_started_at_once_leaves_the_original_alone(store: TaskStore) -> None:
    await store.create(new_task("t1", prompt="original"))

    with pytest.raises(AlreadyExists):
        await store.create(new_task("t1", prompt="impostor"), running=True)

    stored = await store.get("t1")
    assert stored.state == QUEUED
    assert kernel_pb2.GenerateRequest.FromString(stored.request).prompt == "original"
    assert len(await store.events("t1")) == 1


@pytest.mark.parametrize(
    "record",
    [
        dataclasses.replace(new_task("t1"), state=RUNNING),
        dataclasses.replace(new_task("t1"), state=SUCCEEDED, finished_at=2_000.0),
        dataclasses.replace(new_task("t1"), output="text from nowhere"),
        dataclasses.replace(new_task("t1"), task_id=""),
    ],
    ids=["running", "finished", "with-output", "no-id"],
)
async def test_only_a_fresh_queued_task_can_be_created(
    store: TaskStore, record: TaskRecord
) -> None:
    with pytest.raises(InvalidArgument):
        await store.create(record)
    if record.task_id:
        with pytest.raises(NotFound):
            await store.get(record.task_id)


OPERATIONS_ON_ONE_TASK: dict[str, Callable[[TaskStore, str], Awaitable[object]]] = {
    "get": lambda store, task_id: store.get(task_id),
    "events": lambda store, task_id: store.events(task_id),
    "transition": lambda store, task_id: store.transition(task_id, RUNNING),
    "brief_transition": lambda store, task_id: store.transition(task_id, RUNNING, brief=True),
    "append_text": lambda store, task_id: store.append_text(task_id, "x"),
    "add_trace_step": lambda store, task_id: store.add_trace_step(task_id, b"step"),
    "trace": lambda store, task_id: store.trace(task_id),
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS_ON_ONE_TASK))
async def test_an_unknown_id_is_not_found(store: TaskStore, operation: str) -> None:
    await store.create(new_task("known"))

    with pytest.raises(NotFound) as caught:
        await OPERATIONS_ON_ONE_TASK[operation](store, "no-such-task")

    assert caught.value.reason == "TASK_NOT_FOUND"
    assert "no-such-task" in caught.value.message


# ---------------------------------------------------------------- transitions


async def test_a_task_runs_to_success(store: TaskStore) -> None:
    await store.create(new_task("t1"))
    usage = common_pb2.Usage(prompt_tokens=3, completion_tokens=2).SerializeToString()

    running = await store.transition("t1", RUNNING)
    assert (running.state, running.finished_at) == (RUNNING, None)
    done = await store.transition(
        "t1", SUCCEEDED, finish_reason=common_pb2.FINISH_REASON_STOP, usage=usage
    )

    assert done.state == SUCCEEDED
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert common_pb2.Usage.FromString(done.usage).completion_tokens == 2
    assert done.finished_at is not None
    assert done.finished_at >= done.created_at
    assert await store.get("t1") == done
    events = await store.events("t1")
    assert [(e.offset, e.kind, e.state) for e in events] == [
        (0, "state", QUEUED),
        (1, "state", RUNNING),
        (2, "state", SUCCEEDED),
    ]
    assert events[-1].finish_reason == common_pb2.FINISH_REASON_STOP


async def test_changes_are_stamped_with_the_time(store: TaskStore) -> None:
    await store.create(new_task("t1", created_at=time.time()))

    before = time.time()
    running = await store.transition("t1", RUNNING)
    await store.append_text("t1", "x")
    appended = await store.get("t1")
    done = await store.transition("t1", SUCCEEDED)
    after = time.time()

    assert before <= running.updated_at <= appended.updated_at <= done.updated_at <= after
    assert done.finished_at is not None
    assert before <= done.finished_at <= after
    assert done.created_at <= before


LEGAL_PATHS = [
    (QUEUED, [RUNNING, SUCCEEDED]),
    (QUEUED, [RUNNING, FAILED]),
    (QUEUED, [RUNNING, CANCELLED]),
    (QUEUED, [RUNNING, QUEUED, RUNNING, SUCCEEDED]),
    (QUEUED, [CANCELLED]),
    (QUEUED, [REFUSED]),
    (QUEUED, [FAILED]),
]


@pytest.mark.parametrize(
    "path",
    [steps for _, steps in LEGAL_PATHS],
    ids=["-".join(common_pb2.TaskState.Name(s)[11:] for s in steps) for _, steps in LEGAL_PATHS],
)
async def test_legal_transitions_are_applied_and_logged(
    store: TaskStore, path: list[common_pb2.TaskState.ValueType]
) -> None:
    await store.create(new_task("t1"))

    for to_state in path:
        record = await store.transition("t1", to_state)
        assert record.state == to_state

    assert record.finished_at is not None
    assert [e.state for e in await store.events("t1")] == [QUEUED, *path]


async def test_failed_and_cancelled_get_a_finish_reason_by_default(store: TaskStore) -> None:
    await running_task(store, "failed")
    await running_task(store, "cancelled")

    failed = await store.transition("failed", FAILED, error="runtime died")
    cancelled = await store.transition("cancelled", CANCELLED)

    assert failed.finish_reason == common_pb2.FINISH_REASON_ERROR
    assert failed.error == "runtime died"
    assert (await store.events("failed"))[-1].text == "runtime died"
    assert cancelled.finish_reason == common_pb2.FINISH_REASON_CANCELLED


ILLEGAL = [
    (QUEUED, QUEUED),
    (QUEUED, SUCCEEDED),
    (RUNNING, RUNNING),
    (RUNNING, REFUSED),
]


@pytest.mark.parametrize(
    ("start", "to_state"),
    ILLEGAL,
    ids=[
        f"{common_pb2.TaskState.Name(a)[11:]}-{common_pb2.TaskState.Name(b)[11:]}"
        for a, b in ILLEGAL
    ],
)
async def test_illegal_transitions_are_refused_and_change_nothing(
    store: TaskStore,
    start: common_pb2.TaskState.ValueType,
    to_state: common_pb2.TaskState.ValueType,
) -> None:
    await store.create(new_task("t1"))
    if start == RUNNING:
        await store.transition("t1", RUNNING)
    before = (await store.get("t1"), await store.events("t1"))

    with pytest.raises(FailedPrecondition) as caught:
        await store.transition("t1", to_state)

    assert caught.value.reason == "ILLEGAL_TRANSITION"
    assert (await store.get("t1"), await store.events("t1")) == before


def test_the_transition_table_is_the_documented_one() -> None:
    assert {
        common_pb2.TaskState.Name(a): sorted(common_pb2.TaskState.Name(b) for b in targets)
        for a, targets in TRANSITIONS.items()
        if targets
    } == {
        "TASK_STATE_QUEUED": [
            "TASK_STATE_CANCELLED",
            "TASK_STATE_FAILED",
            "TASK_STATE_REFUSED",
            "TASK_STATE_RUNNING",
        ],
        "TASK_STATE_RUNNING": [
            "TASK_STATE_CANCELLED",
            "TASK_STATE_FAILED",
            "TASK_STATE_QUEUED",
            "TASK_STATE_SUCCEEDED",
        ],
    }
    assert {SUCCEEDED, FAILED, CANCELLED, REFUSED} == FINAL_STATES


async def finish(store: TaskStore, task_id: str, final: common_pb2.TaskState.ValueType) -> None:
    await store.create(new_task(task_id))
    if final != REFUSED:
        await store.transition(task_id, RUNNING)
    await store.transition(task_id, final)


@pytest.mark.parametrize("final", sorted(FINAL_STATES))
async def test_a_final_state_is_final(
    store: TaskStore, final: common_pb2.TaskState.ValueType
) -> None:
    await finish(store, "t1", final)
    before = (await store.get("t1"), await store.events("t1"))

    for to_state in STATES:
        if to_state == final:
            continue
        with pytest.raises(FailedPrecondition) as caught:
            await store.transition("t1", to_state)
        assert caught.value.reason == "TASK_FINISHED"

    assert (await store.get("t1"), await store.events("t1")) == before


@pytest.mark.parametrize("final", sorted(FINAL_STATES))
async def test_repeating_a_completion_changes_nothing(
    store: TaskStore, final: common_pb2.TaskState.ValueType
) -> None:
    await finish(store, "t1", final)
    first = await store.get("t1")
    events = await store.events("t1")

    again = await store.transition(
        "t1", final, finish_reason=common_pb2.FINISH_REASON_LENGTH, usage=b"\x08\x07", error="late"
    )

    assert again == first
    assert await store.get("t1") == first
    assert await store.events("t1") == events


@pytest.mark.parametrize("to_state", [common_pb2.TASK_STATE_UNSPECIFIED, 42])
async def test_an_unknown_target_state_is_invalid(store: TaskStore, to_state: int) -> None:
    await store.create(new_task("t1"))

    with pytest.raises(InvalidArgument) as caught:
        await store.transition("t1", common_pb2.TaskState.ValueType(to_state))

    assert caught.value.reason == "BAD_TASK_STATE"
    assert (await store.get("t1")).state == QUEUED


async def test_only_a_final_state_takes_a_finish_reason(store: TaskStore) -> None:
    await store.create(new_task("t1"))

    with pytest.raises(InvalidArgument) as caught:
        await store.transition("t1", RUNNING, finish_reason=common_pb2.FINISH_REASON_STOP)

    assert caught.value.reason == "BAD_FINISH_REASON"
    assert (await store.get("t1")).state == QUEUED


async def test_a_requeue_counts_the_attempt_and_starts_the_output_afresh(
    store: TaskStore,
) -> None:
    await running_task(store, "t1")
    await store.append_text("t1", "half an ans")

    requeued = await store.transition("t1", QUEUED, error="runtime died mid-stream")

    assert (requeued.state, requeued.attempts, requeued.output) == (QUEUED, 1, "")
    assert requeued.error == "runtime died mid-stream"
    assert requeued.finished_at is None
    await store.transition("t1", RUNNING)
    await store.append_text("t1", "a whole answer")
    done = await store.transition("t1", SUCCEEDED)
    assert (done.output, done.attempts, done.error) == ("a whole answer", 1, "")
    assert await all_events(store, "t1") == [
        ("state", QUEUED, ""),
        ("state", RUNNING, ""),
        ("text", RUNNING, "half an ans"),
        ("state", QUEUED, "runtime died mid-stream"),
        ("state", RUNNING, ""),
        ("text", RUNNING, "a whole answer"),
        ("state", SUCCEEDED, ""),
    ]


# ---------------------------------------------------------------- text and events


async def test_appended_text_builds_the_output_and_the_log(store: TaskStore) -> None:
    await running_task(store, "t1")
    await running_task(store, "t2")

    offsets = [await store.append_text("t1", piece) for piece in ["Hel", "lo", ", ", "world"]]
    await store.append_text("t2", "other task")

    assert offsets == [2, 3, 4, 5]
    assert (await store.get("t1")).output == "Hello, world"
    assert (await store.get("t2")).output == "other task"
    texts = [(e.offset, e.text) for e in await store.events("t1") if e.kind == "text"]
    assert texts == [(2, "Hel"), (3, "lo"), (4, ", "), (5, "world")]


async def test_only_a_running_task_takes_text(store: TaskStore) -> None:
    await store.create(new_task("queued"))
    await finish(store, "done", SUCCEEDED)

    with pytest.raises(FailedPrecondition) as queued:
        await store.append_text("queued", "too early")
    with pytest.raises(FailedPrecondition) as done:
        await store.append_text("done", "too late")

    assert (queued.value.reason, done.value.reason) == ("TASK_NOT_RUNNING", "TASK_FINISHED")
    assert (await store.get("queued")).output == (await store.get("done")).output == ""


async def test_a_text_write_sent_again_is_stored_once(store: TaskStore) -> None:
    """A write says where its text starts in the attempt's output (`at`): sent again
    (its reply was lost), alone or joined with newer text, it is stored once."""
    await running_task(store, "t1")

    first = await store.append_text("t1", "Hel", at=0)
    again = await store.append_text("t1", "Hel", at=0)
    joined = await store.append_text("t1", "Hello", at=0)

    assert (first, again, joined) == (2, 2, 3)
    assert (await store.get("t1")).output == "Hello"
    done = await store.transition("t1", SUCCEEDED, text="lo, world", text_at=3)
    assert done.output == "Hello, world"
    assert [e.text for e in await store.events("t1") if e.kind == "text"] == [
        "Hel",
        "lo",
        ", world",
    ]


@pytest.mark.parametrize("brief", [False, True])
async def test_a_transition_whose_text_is_all_stored_writes_only_the_state(
    store: TaskStore, brief: bool
) -> None:
    await running_task(store, "t1")
    await store.append_text("t1", "all of it", at=0)

    await store.transition("t1", SUCCEEDED, text="all of it", text_at=0, brief=brief)

    assert (await store.get("t1")).output == "all of it"
    assert await all_events(store, "t1") == [
        ("state", QUEUED, ""),
        ("state", RUNNING, ""),
        ("text", RUNNING, "all of it"),
        ("state", SUCCEEDED, ""),
    ]


@pytest.mark.parametrize("brief", [False, True])
async def test_text_that_starts_past_the_stored_output_is_refused(
    store: TaskStore, brief: bool
) -> None:
    """A gap means an earlier write is missing: nothing is applied, and it says so."""
    await running_task(store, "t1")
    await store.append_text("t1", "ab", at=0)

    with pytest.raises(FailedPrecondition) as appended:
        await store.append_text("t1", "d", at=3)
    with pytest.raises(FailedPrecondition) as ended:
        await store.transition("t1", SUCCEEDED, text="d", text_at=3, brief=brief)
    with pytest.raises(InvalidArgument) as negative:
        await store.append_text("t1", "x", at=-1)

    assert appended.value.reason == ended.value.reason == "OUTPUT_GAP"
    assert "2 characters" in str(appended.value) and "character 3" in str(appended.value)
    assert negative.value.reason == "BAD_TEXT_OFFSET"
    record = await store.get("t1")
    assert (record.state, record.output) == (RUNNING, "ab")


async def test_a_requeue_starts_the_output_count_afresh(store: TaskStore) -> None:
    await running_task(store, "t1")
    await store.append_text("t1", "half an ans", at=0)
    await store.transition("t1", QUEUED, error="runtime died mid-stream")
    await store.transition("t1", RUNNING)

    await store.append_text("t1", "a whole", at=0)
    done = await store.transition("t1", SUCCEEDED, text=" answer", text_at=7)

    assert done.output == "a whole answer"


@pytest.mark.parametrize("brief", [False, True])
async def test_writes_of_an_attempt_that_is_over_are_refused(store: TaskStore, brief: bool) -> None:
    """A kernel whose claim lapsed (it stalled) may write after another kernel re-queued
    the task and runs it again: its late text and end must not land in the new attempt."""
    await running_task(store, "t1")
    await store.append_text("t1", "first try", at=0, attempt=0)
    await store.transition("t1", QUEUED, error="taken over by kernel b")
    await store.transition("t1", RUNNING)

    with pytest.raises(FailedPrecondition) as appended:
        await store.append_text("t1", " and more", at=9, attempt=0)
    with pytest.raises(FailedPrecondition) as ended:
        await store.transition("t1", SUCCEEDED, text="late", text_at=9, attempt=0, brief=brief)

    assert appended.value.reason == ended.value.reason == "ATTEMPT_OVER"
    assert "attempt 2" in str(ended.value) and "attempt 1" in str(ended.value)
    record = await store.get("t1")
    assert (record.state, record.output) == (RUNNING, "")
    await store.append_text("t1", "second", at=0, attempt=1)
    done = await store.transition("t1", SUCCEEDED, text=" try", text_at=6, attempt=1, brief=brief)
    assert done.state == SUCCEEDED
    assert (await store.get("t1")).output == "second try"


async def test_events_resume_from_an_offset(store: TaskStore) -> None:
    await running_task(store, "t1")
    for index in range(10):
        await store.append_text("t1", f"<{index}>")
    await store.transition("t1", SUCCEEDED)
    everything = await store.events("t1")

    assert [e.offset for e in everything] == list(range(13))
    assert await store.events("t1", offset=5) == everything[5:]
    assert await store.events("t1", offset=5, limit=3) == everything[5:8]
    assert await store.events("t1", offset=13) == []
    resumed = []
    offset = 0
    while batch := await store.events("t1", offset=offset, limit=4):
        resumed.extend(batch)
        offset = batch[-1].offset + 1
    assert resumed == everything


@pytest.mark.parametrize(
    ("offset", "limit", "reason"),
    [(-1, 10, "BAD_OFFSET"), (0, 0, "BAD_LIMIT"), (0, 1001, "BAD_LIMIT")],
)
async def test_a_bad_event_range_is_invalid(
    store: TaskStore, offset: int, limit: int, reason: str
) -> None:
    await store.create(new_task("t1"))

    with pytest.raises(InvalidArgument) as caught:
        await store.events("t1", offset=offset, limit=limit)

    assert caught.value.reason == reason


async def test_concurrent_appends_get_distinct_consecutive_offsets(store: TaskStore) -> None:
    await running_task(store, "t1")
    pieces = [f"[{index:02d}]" for index in range(50)]

    offsets = await asyncio.gather(*(store.append_text("t1", piece) for piece in pieces))

    assert sorted(offsets) == list(range(2, 52))
    by_offset = dict(zip(offsets, pieces, strict=True))
    assert (await store.get("t1")).output == "".join(by_offset[o] for o in sorted(by_offset))
    events = await store.events("t1", offset=2)
    assert [(e.offset, e.text) for e in events] == sorted(by_offset.items())


# ---------------------------------------------------------------- trace


async def test_the_trace_keeps_its_order_per_task(store: TaskStore) -> None:
    await store.create(new_task("t1"))
    await store.create(new_task("t2"))
    stages = ["admit", "safety:input", "privacy:redact", "runtime:generate", "record"]

    assert await store.trace("t1") == []
    for stage in stages:
        step = common_pb2.TraceStep(stage=stage, service=f"{stage}-1", decision="allow")
        await store.add_trace_step("t1", step.SerializeToString())
    await store.add_trace_step("t2", common_pb2.TraceStep(stage="admit").SerializeToString())

    steps = [common_pb2.TraceStep.FromString(raw) for raw in await store.trace("t1")]
    assert [step.stage for step in steps] == stages
    assert steps[1].service == "safety:input-1"
    assert len(await store.trace("t2")) == 1


async def test_a_finished_task_still_takes_trace_steps(store: TaskStore) -> None:
    await finish(store, "t1", REFUSED)

    await store.add_trace_step("t1", b"the record stage")

    assert await store.trace("t1") == [b"the record stage"]


# ---------------------------------------------------------------- text and trace with a transition


async def test_a_transition_stores_the_attempts_last_text_and_trace_with_it(
    store: TaskStore,
) -> None:
    await running_task(store, "t1")
    await store.append_text("t1", "Hel")
    await store.add_trace_step("t1", b"admit")

    done = await store.transition(
        "t1",
        SUCCEEDED,
        finish_reason=common_pb2.FINISH_REASON_STOP,
        text="lo",
        trace=[b"runtime:generate", b"record"],
    )

    assert (done.state, done.output) == (SUCCEEDED, "Hello")
    assert await store.get("t1") == done
    assert await all_events(store, "t1") == [
        ("state", QUEUED, ""),
        ("state", RUNNING, ""),
        ("text", RUNNING, "Hel"),
        ("text", RUNNING, "lo"),
        ("state", SUCCEEDED, ""),
    ]
    assert await store.trace("t1") == [b"admit", b"runtime:generate", b"record"]


async def test_a_transition_that_follows_create_is_applied_after_it(store: TaskStore) -> None:
    """`follows_create` is the caller's word that nothing else was written since `create`:
    once the create has landed, the transition is applied as any other."""
    await store.create(new_task("t1"), running=True)

    done = await store.transition(
        "t1", SUCCEEDED, text="hi", trace=[b"record"], brief=True, follows_create=True
    )

    assert (done.state, done.output, done.request) == (SUCCEEDED, "", b"")
    assert (await store.get("t1")).output == "hi"
    assert await store.trace("t1") == [b"record"]


async def test_a_brief_transition_returns_the_record_without_request_and_output(
    store: TaskStore,
) -> None:
    """`brief` changes only what comes back: the stored task is the same, and a repeated
    final transition comes back brief as well."""
    await running_task(store, "t1")
    await store.append_text("t1", "Hel")
    await store.add_trace_step("t1", b"admit")

    done = await store.transition(
        "t1", FAILED, error="runtime gone", text="lo", trace=[b"record"], brief=True
    )
    again = await store.transition("t1", FAILED, brief=True)

    stored = await store.get("t1")
    assert (stored.output, stored.request) == ("Hello", new_task("t1").request)
    assert done == dataclasses.replace(stored, request=b"", output="")
    assert again == done
    assert (done.state, done.error, done.finished) == (FAILED, "runtime gone", True)
    # Written after what the task logged before: its text and steps keep their order.
    assert (await all_events(store, "t1"))[-3:] == [
        ("text", RUNNING, "Hel"),
        ("text", RUNNING, "lo"),
        ("state", FAILED, "runtime gone"),
    ]
    assert await store.trace("t1") == [b"admit", b"record"]


async def test_a_transition_without_text_may_still_carry_trace_steps(store: TaskStore) -> None:
    await store.create(new_task("t1"))

    running = await store.transition("t1", RUNNING, trace=[b"admit"])
    requeued = await store.transition("t1", QUEUED, error="stopped", text="lost", trace=[b"x"])

    assert running.output == "" and requeued.output == ""
    assert (requeued.state, requeued.attempts) == (QUEUED, 1)
    assert await all_events(store, "t1") == [
        ("state", QUEUED, ""),
        ("state", RUNNING, ""),
        ("text", RUNNING, "lost"),
        ("state", QUEUED, "stopped"),
    ]
    assert await store.trace("t1") == [b"admit", b"x"]


async def test_only_a_running_task_takes_text_with_a_transition(store: TaskStore) -> None:
    await store.create(new_task("t1"))
    before = (await store.get("t1"), await store.events("t1"))

    with pytest.raises(FailedPrecondition) as caught:
        await store.transition("t1", CANCELLED, text="too early", trace=[b"step"])

    assert caught.value.reason == "TASK_NOT_RUNNING"
    assert (await store.get("t1"), await store.events("t1")) == before
    assert await store.trace("t1") == []


async def test_a_refused_or_repeated_transition_writes_no_text_or_trace(
    store: TaskStore,
) -> None:
    await finish(store, "t1", SUCCEEDED)
    before = (await store.get("t1"), await store.events("t1"))

    again = await store.transition("t1", SUCCEEDED, text="late", trace=[b"again"])
    with pytest.raises(FailedPrecondition):
        await store.transition("t1", FAILED, text="late", trace=[b"refused"])

    assert again == before[0]
    assert (await store.get("t1"), await store.events("t1")) == before
    assert await store.trace("t1") == []


# ---------------------------------------------------------------- list


async def test_list_filters_by_tenant_and_state_newest_first(store: TaskStore) -> None:
    await store.create(new_task("a-old", tenant="a", created_at=1.0))
    await store.create(new_task("b-mid", tenant="b", created_at=2.0))
    await store.create(new_task("a-new", tenant="a", created_at=3.0))
    await store.create(new_task("a-newest", tenant="a", created_at=4.0))
    await store.transition("a-new", RUNNING)
    await store.append_text("a-new", "listed ")
    await store.append_text("a-new", "output")

    async def ids(**filters: object) -> list[str]:
        records, token = await store.list(**filters)  # type: ignore[arg-type]
        assert token == ""
        return [record.task_id for record in records]

    assert await ids() == ["a-newest", "a-new", "b-mid", "a-old"]
    assert await ids(tenant="a") == ["a-newest", "a-new", "a-old"]
    assert await ids(state=QUEUED) == ["a-newest", "b-mid", "a-old"]
    assert await ids(tenant="a", state=RUNNING) == ["a-new"]
    assert await ids(tenant="nobody") == []
    records, _ = await store.list(tenant="a", state=RUNNING)
    assert records == [await store.get("a-new")]
    assert records[0].output == "listed output"


async def test_list_pages_through_everything_once(store: TaskStore) -> None:
    # Three tasks share each creation time, so the order must break ties by id.
    # They are created in a shuffled order, so insertion order cannot stand in for it.
    ids = [f"t{index:03d}" for index in range(120)]
    for task_id in random.Random(4).sample(ids, len(ids)):
        await store.create(new_task(task_id, created_at=1_000.0 + int(task_id[1:]) // 3))
    expected = sorted(ids, key=lambda task_id: (1_000.0 + int(task_id[1:]) // 3, task_id))
    expected.reverse()

    seen: list[str] = []
    sizes: list[int] = []
    token = ""
    while True:
        page, token = await store.list(page_size=50, page_token=token)
        sizes.append(len(page))
        seen.extend(record.task_id for record in page)
        if not token:
            break

    assert sizes == [50, 50, 20]
    assert seen == expected


async def test_pages_stay_put_while_new_tasks_arrive(store: TaskStore) -> None:
    for index in range(10):
        await store.create(new_task(f"t{index}", created_at=100.0 + index))

    first, token = await store.list(page_size=4)
    await store.create(new_task("newer", created_at=500.0))
    second, token = await store.list(page_size=4, page_token=token)
    third, token = await store.list(page_size=4, page_token=token)

    assert [r.task_id for r in first + second + third] == [f"t{i}" for i in range(9, -1, -1)]
    assert token == ""


async def test_an_exactly_full_last_page_has_no_next_token(store: TaskStore) -> None:
    for index in range(4):
        await store.create(new_task(f"t{index}", created_at=float(index)))

    page, token = await store.list(page_size=2)
    page, token = await store.list(page_size=2, page_token=token)

    assert [r.task_id for r in page] == ["t1", "t0"]
    assert token == ""


@pytest.mark.parametrize(
    "token",
    [
        "not a token!",
        "e30",  # base64 of {}
        "WzEsMiwzXQ",  # base64 of [1,2,3]
        "WyJ4IiwidDEiXQ",  # base64 of ["x","t1"]
        "WyJOYU4iXQ",
    ],
)
async def test_a_bad_page_token_is_invalid(store: TaskStore, token: str) -> None:
    await store.create(new_task("t1"))

    with pytest.raises(InvalidArgument) as caught:
        await store.list(page_token=token)

    assert caught.value.reason == "BAD_PAGE_TOKEN"


async def test_a_token_for_a_position_past_the_end_gives_an_empty_page(store: TaskStore) -> None:
    await store.create(new_task("t1", created_at=10.0))

    page, token = await store.list(page_token=encode_page_token(1.0, "a"))

    assert (page, token) == ([], "")


@pytest.mark.parametrize("page_size", [0, -1, 1001])
async def test_a_bad_page_size_is_invalid(store: TaskStore, page_size: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await store.list(page_size=page_size)

    assert caught.value.reason == "BAD_PAGE_SIZE"


# ---------------------------------------------------------------- recovery


async def test_recover_requeues_running_tasks_and_returns_the_queue_in_order(
    store: TaskStore,
) -> None:
    await store.create(new_task("queued-1", created_at=1.0))
    await running_task(store, "running-2", created_at=2.0)
    await store.create(new_task("queued-3", created_at=3.0))
    await running_task(store, "running-4", created_at=4.0)
    await finish(store, "done-5", SUCCEEDED)
    await store.append_text("running-2", "partial")

    report = await store.recover()

    assert report == RecoveryReport(
        queued=("queued-1", "running-2", "queued-3", "running-4"),
        requeued=("running-2", "running-4"),
        failed=(),
    )
    requeued = await store.get("running-2")
    assert (requeued.state, requeued.attempts, requeued.output) == (QUEUED, 1, "")
    assert "kernel crash" in requeued.error
    last = (await store.events("running-2"))[-1]
    assert (last.kind, last.state) == ("state", QUEUED)
    assert "kernel crash" in last.text
    assert (await store.get("queued-1")).attempts == 0
    assert (await store.get("done-5")).state == SUCCEEDED
    assert await store.recover() == RecoveryReport(queued=report.queued)


async def test_recover_fails_a_task_interrupted_max_attempts_times(store: TaskStore) -> None:
    await running_task(store, "t1")

    for attempt in (1, 2):
        report = await store.recover(max_attempts=3)
        assert report.requeued == ("t1",)
        assert (await store.get("t1")).attempts == attempt
        await store.transition("t1", RUNNING)
    report = await store.recover(max_attempts=3)

    assert report == RecoveryReport(queued=(), requeued=(), failed=("t1",))
    failed = await store.get("t1")
    assert (failed.state, failed.attempts) == (FAILED, 3)
    assert failed.finish_reason == common_pb2.FINISH_REASON_ERROR
    assert failed.finished_at is not None
    assert "kernel crash" in failed.error
    assert "kernel crash" in (await store.events("t1"))[-1].text


async def test_recover_without_requeue_fails_running_tasks(store: TaskStore) -> None:
    await running_task(store, "running", created_at=1.0)
    await store.create(new_task("queued", created_at=2.0))

    report = await store.recover(requeue_running=False)

    assert report == RecoveryReport(queued=("queued",), requeued=(), failed=("running",))
    failed = await store.get("running")
    assert failed.state == FAILED
    assert "kernel crash" in failed.error


async def test_recover_refuses_a_max_attempts_below_one(store: TaskStore) -> None:
    await running_task(store, "t1")

    with pytest.raises(InvalidArgument):
        await store.recover(max_attempts=0)

    assert (await store.get("t1")).state == RUNNING


# ---------------------------------------------------------------- forget, close, reopen


async def test_forget_tenant_deletes_its_tasks_events_and_traces(store: TaskStore) -> None:
    for task_id in ("a1", "a2"):
        await running_task(store, task_id, tenant="a")
        await store.append_text(task_id, "secret")
        await store.add_trace_step(task_id, b"step")
    await running_task(store, "b1", tenant="b")
    await store.add_trace_step("b1", b"kept")

    assert await store.forget_tenant("a") == 2

    for task_id in ("a1", "a2"):
        for operation in ("get", "events", "trace"):
            with pytest.raises(NotFound):
                await OPERATIONS_ON_ONE_TASK[operation](store, task_id)
    assert [r.task_id for r in (await store.list())[0]] == ["b1"]
    assert await store.trace("b1") == [b"kept"]
    assert await store.forget_tenant("a") == 0
    await store.create(new_task("a1", tenant="a"))
    assert [e.offset for e in await store.events("a1")] == [0]


async def test_everything_survives_close_and_reopen(backend: Backend) -> None:
    store = await backend.open()
    await running_task(store, "t1", created_at=1.0)
    await store.append_text("t1", "kept text")
    await store.add_trace_step("t1", b"step-1")
    await store.transition("t1", SUCCEEDED, usage=b"\x08\x02")
    await running_task(store, "t2", created_at=2.0)
    await store.create(new_task("t3", created_at=3.0, tenant="other"))
    before = {
        task_id: (await store.get(task_id), await store.events(task_id), await store.trace(task_id))
        for task_id in ("t1", "t2", "t3")
    }
    listed = await store.list()
    await store.close()
    await store.close()  # idempotent

    reopened = await backend.open()
    try:
        after = {
            task_id: (
                await reopened.get(task_id),
                await reopened.events(task_id),
                await reopened.trace(task_id),
            )
            for task_id in ("t1", "t2", "t3")
        }
        assert after == before
        assert await reopened.list() == listed
        assert await reopened.append_text("t2", "more") == 2
    finally:
        await reopened.close()


async def test_a_closed_store_refuses_calls(backend: Backend) -> None:
    store = await backend.open()
    await store.create(new_task("t1"))
    await store.close()

    with pytest.raises(FailedPrecondition) as caught:
        await store.get("t1")

    assert caught.value.reason == "STORE_CLOSED"


# ---------------------------------------------------------------- SQLite only

CRASHING_KERNEL = textwrap.dedent(
    """
    import asyncio, sys
    from llmos.kernel.store import SqliteTaskStore, TaskRecord
    from llmos.services.keyring import KeyRing
    from llmos.v1 import common_pb2

    async def main() -> None:
        keys = KeyRing({"test1": bytes(range(32))}, "test1", "tests")
        store = await SqliteTaskStore.open(sys.argv[1], keys=keys)
        for index in range(10):
            await store.create(TaskRecord.queued(
                f"t{index}", tenant="acme", model="echo",
                priority=common_pb2.PRIORITY_NORMAL, request=b"", now=100.0 + index))
        for index in range(5):
            await store.transition(f"t{index}", common_pb2.TASK_STATE_RUNNING)
        await store.transition("t4", common_pb2.TASK_STATE_SUCCEEDED)
        print("ready", flush=True)
        count = 0
        while True:  # streaming into t0 when the kill lands
            await store.append_text("t0", f"<{count}>")
            count += 1

    asyncio.run(main())
    """
)


async def test_sqlite_recovers_every_task_after_sigkill(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASHING_KERNEL,
        str(data_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    assert child.stderr is not None
    try:
        line = await asyncio.wait_for(child.stdout.readline(), timeout=60)
        assert line == b"ready\n", (await child.stderr.read()).decode()
        await asyncio.sleep(0.3)
        assert child.returncode is None, "the child was meant to be still writing"
    finally:
        if child.returncode is None:
            child.kill()  # SIGKILL: no cleanup, no close
        await child.wait()
    assert child.returncode == -signal.SIGKILL

    store = await SqliteTaskStore.open(data_dir, keys=KEYS)
    try:
        report = await store.recover()

        assert report.requeued == ("t0", "t1", "t2", "t3")
        assert report.failed == ()
        assert report.queued == ("t0", "t1", "t2", "t3", "t5", "t6", "t7", "t8", "t9")
        assert (await store.get("t4")).state == SUCCEEDED
        records, _ = await store.list(page_size=100)
        assert sorted(r.task_id for r in records) == [f"t{i}" for i in range(10)]
        assert {r.state for r in records} == {QUEUED, SUCCEEDED}
        events = await store.events("t0", limit=1000)
        texts = [e.text for e in events if e.kind == "text"]
        assert len(texts) > 0
        assert texts == [f"<{i}>" for i in range(len(texts))]
        offset = 0
        while batch := await store.events("t0", offset=offset):
            assert [e.offset for e in batch] == list(range(offset, offset + len(batch)))
            offset += len(batch)
        last = (await store.events("t0", offset=offset - 1))[-1]
        assert (last.kind, last.state) == ("state", QUEUED)
        assert (await store.get("t0")).attempts == 1
    finally:
        await store.close()


async def _hold_the_store_thread(
    store: SqliteTaskStore,
) -> tuple[asyncio.Task[None], threading.Event]:
    """Keep the store's thread busy with a job of its own until the returned event is set;
    the task ends once the job is done."""
    busy, release = threading.Event(), threading.Event()

    def hold(_conn: sqlite3.Connection) -> None:
        busy.set()
        release.wait(10)

    holding = asyncio.create_task(store._run(hold))
    assert await asyncio.to_thread(busy.wait, 10)
    return holding, release


def _record_where_jobs_run(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """From now on, each job the store applies is listed as (the store method it serves,
    whether it ran on the calling test's thread, not the store's)."""
    applied_on: list[tuple[str, bool]] = []
    attempt = sqlite_store._attempt
    caller = threading.current_thread()

    def recorded(conn: sqlite3.Connection, job: sqlite_store._Job, *, savepoint: bool) -> None:
        name = getattr(job.operation, "__qualname__", "").split(".<locals>")[0]
        applied_on.append((name.rsplit(".", 1)[-1], threading.current_thread() is caller))
        attempt(conn, job, savepoint=savepoint)

    monkeypatch.setattr(sqlite_store, "_attempt", recorded)
    return applied_on


async def test_sqlite_applies_calls_queued_together_in_one_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: calls that queue up while the store's thread is busy are applied in one
    transaction, and a call that fails there fails alone."""
    transactions: list[int] = []
    transact_once = sqlite_store._Writer._transact_once

    def counted(writer: sqlite_store._Writer, group: list[sqlite_store._Job]) -> object:
        transactions.append(len(group))
        return transact_once(writer, group)

    monkeypatch.setattr(sqlite_store._Writer, "_transact_once", counted)
    store = await SqliteTaskStore.open(tmp_path, keys=KEYS)
    try:
        await store.create(new_task("taken"))
        transactions.clear()
        # Keep the store's thread busy, so that the calls below queue up behind it.
        holding, release = await _hold_the_store_thread(store)
        calls = [store.create(new_task(f"t{index}")) for index in range(20)]
        calls.insert(7, store.create(new_task("taken", prompt="duplicate")))
        calls.append(store.get("t3"))
        pending = asyncio.gather(*calls, return_exceptions=True)
        await asyncio.sleep(0.05)
        release.set()
        outcomes = await pending
        await holding

        assert transactions == [1, 22], "the queued calls shared one transaction"
        assert isinstance(outcomes[7], AlreadyExists)
        assert [o for i, o in enumerate(outcomes[:-1]) if i != 7] == [None] * 20
        assert isinstance(outcomes[-1], TaskRecord)
        assert outcomes[-1].task_id == "t3"
    finally:
        await store.close()
    reopened = await SqliteTaskStore.open(tmp_path, keys=KEYS)
    try:
        records, _ = await reopened.list(page_size=100)
        assert len(records) == 21
        taken = await reopened.get("taken")
        assert kernel_pb2.GenerateRequest.FromString(taken.request).prompt == "hello"
    finally:
        await reopened.close()


async def test_sqlite_an_idle_store_writes_on_the_callers_thread_never_ahead_of_queued_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing outstanding, a task's small write is applied at once on the caller's
    thread (no hop to the store's thread); while anything is queued or being applied, it
    queues behind it and keeps its turn."""
    applied_on = _record_where_jobs_run(monkeypatch)
    store = await SqliteTaskStore.open(tmp_path, keys=KEYS)
    try:
        await store.create(new_task("idle"))
        await store.transition("idle", RUNNING)
        assert applied_on == [("create", True), ("transition", True)]
        applied_on.clear()

        holding, release = await _hold_the_store_thread(store)
        behind = asyncio.gather(
            store.create(new_task("queued")), store.transition("idle", SUCCEEDED)
        )
        await asyncio.sleep(0.05)
        assert not behind.done(), "a write went ahead of the job the store's thread holds"
        release.set()
        await holding
        await behind
        assert applied_on[1:] == [("create", False), ("transition", False)]
        assert applied_on[0][1] is False  # hold, on the store's thread

        applied_on.clear()
        await store.create(new_task("idle-again"))  # nothing outstanding: on this thread again
        assert applied_on == [("create", True)]
        assert (await store.get("idle")).state == SUCCEEDED
    finally:
        await store.close()


async def test_sqlite_writes_for_many_running_tasks_go_to_the_stores_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While its caller runs several tasks, an idle store still sends small writes to its
    thread (where writes made together commit together); once the caller runs one task
    again, they are applied on the caller's thread."""
    applied_on = _record_where_jobs_run(monkeypatch)
    store = await SqliteTaskStore.open(tmp_path, keys=KEYS)
    running = 3
    store.watch_load(lambda: running)
    try:
        await store.create(new_task("first"))
        await asyncio.gather(*(store.create(new_task(f"many-{n}")) for n in range(3)))
        await store.transition("first", RUNNING)
        assert applied_on == [("create", False)] * 4 + [("transition", False)]
        applied_on.clear()

        running = 1
        await store.transition("first", SUCCEEDED)
        assert applied_on == [("transition", True)]
        assert (await store.get("many-2")).state == QUEUED
    finally:
        await store.close()


async def _end_joined(
    store: SqliteTaskStore, task_id: str, **transition: Any
) -> tuple[asyncio.Future[Any], asyncio.Future[Any]]:
    """A task's create and the transition that follows it, submitted while the store's
    thread is busy (so the create is still queued when the transition comes); both
    futures, once the thread is released and both ended."""
    holding, release = await _hold_the_store_thread(store)
    created = asyncio.ensure_future(store.create(new_task(task_id), running=True))
    await asyncio.sleep(0)  # the create is queued
    ended = asyncio.ensure_future(store.transition(task_id, follows_create=True, **transition))
    await asyncio.sleep(0.05)
    assert not created.done() and not ended.done()
    release.set()
    await holding
    await asyncio.wait([created, ended])
    return created, ended


async def test_sqlite_a_transition_joins_its_tasks_queued_create(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short task's end, made while its create still waits in the queue, is applied by
    the create's job: one job writes the task as the two writes would have left it."""
    store = await SqliteTaskStore.open(tmp_path, keys=KEYS)
    store.watch_load(lambda: 2)  # under load: writes go to the store's thread
    end: dict[str, Any] = {
        "to_state": SUCCEEDED,
        "finish_reason": common_pb2.FINISH_REASON_STOP,
        "usage": b"usage",
        "text": "hello",
        "text_at": 0,
        "trace": [b"admit", b"record"],
    }
    try:
        await store.create(new_task("plain"), running=True)
        plain = await store.transition("plain", **end)
        applied_on = _record_where_jobs_run(monkeypatch)

        created, ended = await _end_joined(store, "joined", **end)

        assert created.result() is None
        assert [name for name, _ in applied_on[1:]] == ["create"], "one job for both writes"
        joined = ended.result()
        assert joined == dataclasses.replace(
            plain, task_id="joined", updated_at=joined.updated_at, finished_at=joined.finished_at
        )
        assert joined.finished_at is not None and joined.updated_at >= joined.created_at
        stored = await store.get("joined")
        assert stored == joined
        assert await all_events(store, "joined") == await all_events(store, "plain")
        assert await store.trace("joined") == [b"admit", b"record"]
        brief = await store.transition("joined", SUCCEEDED, brief=True)
        assert brief == dataclasses.replace(joined, request=b"", output="")
    finally:
        await store.close()


async def test_sqlite_the_thread_gathers_what_the_loop_writes_in_its_next_turns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load the thread takes a job, lets the event loop turn, and applies what the
    loop queued meanwhile in the same transaction: a burst of writes, one commit."""
    monkeypatch.setattr(sqlite_store, "GATHER_MAX_S", 30.0)  # the turns decide, not a clock
    store = await SqliteTaskStore.open(tmp_path, keys=KEYS)
    store.watch_load(lambda: 2)  # under load: writes go to the store's thread
    try:
        commits = store._writer.commits
        creates = []
        for n in range(sqlite_store.GATHER_TURNS // 2):  # one job queued per turn
            creates.append(asyncio.ensure_future(store.create(new_task(f"burst-{n}"))))
            await asyncio.sleep(0)  # the create runs and queues its job
            time.sleep(0.02)  # noqa: ASYNC251 -- the loop stalls: the thread may take that job
        await asyncio.gather(*creates)
        assert store._writer.commits == commits + 1
        assert [(await store.get(f"burst-{n}")).state for n in range(len(creates))] == [
            QUEUED
        ] * len(creates)
    finally:
        await store.close()


async def test_sqlite_a_tasks_writes_leave_no_reference_cycles(tmp_path: Path) -> None:
    """A task written in two steps, and one whose end joined its create, leave nothing of
    the store's for the garbage collector: under load every such cycle is work for the
    kernel's loop (a cycle per task was 2.4% of it at saturation)."""
    store = await SqliteTaskStore.open(tmp_path, keys=KEYS)
    store.watch_load(lambda: 2)
    end: dict[str, Any] = {"to_state": SUCCEEDED, "finish_reason": common_pb2.FINISH_REASON_STOP}
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable stays in gc.garbage
    try:
        await store.create(new_task("plain"), running=True)
        await store.transition("plain", **end)
        created, ended = await _end_joined(store, "joined", **end)
        assert created.result() is None and ended.result().state == SUCCEEDED
        gc.collect()
        stores = [o for o in gc.garbage if type(o).__module__ == sqlite_store.__name__]
        assert stores == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        await store.close()


async def test_sqlite_a_joined_transition_fails_with_its_create(tmp_path: Path) -> None:
    """If the create fails (here a duplicate id), the transition that joined it fails with
    the same error and writes nothing: the task already stored is left as it was."""
    store = await SqliteTaskStore.open(tmp_path, keys=KEYS)
    store.watch_load(lambda: 2)
    try:
        await store.create(new_task("taken"))

        created, ended = await _end_joined(store, "taken", to_state=SUCCEEDED, text="x")

        assert isinstance(created.exception(), AlreadyExists)
        assert isinstance(ended.exception(), AlreadyExists)
        stored = await store.get("taken")
        assert (stored.state, stored.output) == (QUEUED, "")
        assert await all_events(store, "taken") == [("state", QUEUED, "")]
    finally:
        await store.close()


async def test_sqlite_a_write_lock_held_elsewhere_never_blocks_the_event_loop(
    tmp_path: Path,
) -> None:
    """An idle store's write meets SQLite's write lock held by another process (an
    operator's shell, say): it is not applied here and waits on the store's thread, so the
    event loop keeps running; it lands once the lock is released."""
    store = await SqliteTaskStore.open(tmp_path, keys=KEYS)
    outside = sqlite3.connect(store.path, isolation_level=None)
    try:
        await store.create(new_task("before"))
        outside.execute("BEGIN IMMEDIATE")  # the write lock, held outside the store
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        writing = asyncio.create_task(store.create(new_task("during")))
        await asyncio.sleep(0.3)
        assert not writing.done(), "the write did not wait for the lock"
        assert ticks >= 10, f"the event loop was blocked ({ticks} ticks in 0.3 s)"
        outside.execute("ROLLBACK")
        await asyncio.wait_for(writing, 5)
        ticker.cancel()
        assert (await store.get("during")).task_id == "during"
        await store.create(new_task("after"))  # the store goes on, idle again
    finally:
        outside.close()
        await store.close()


async def _checkpoint_settled(store: SqliteTaskStore) -> None:
    """Wait for the store's checkpoint under way, if any, to end."""
    while (checkpoint := store._checkpoint) is not None:
        await asyncio.wait([checkpoint])


def _wal_frames(path: Path) -> int:
    """The WAL's frames now, as a checkpoint from another connection reports them (it copies
    them too: call it last)."""
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        (_, frames, _) = reader.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        reader.close()
    return int(frames)


async def test_sqlite_checkpoints_the_wal_every_so_many_commits_so_it_starts_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's own checkpoint (run inside a COMMIT, so on the event loop for a write
    applied there) is off; the store makes one every CHECKPOINT_EVERY_COMMITS commits
    instead, ending on the store's thread, so the WAL starts over instead of growing."""

    async def wal_frames_after_thirteen_writes(store_dir: Path) -> int:
        store = await SqliteTaskStore.open(store_dir, keys=KEYS)
        try:
            (autocheckpoint,) = store._writer.conn.execute("PRAGMA wal_autocheckpoint").fetchone()
            assert autocheckpoint == 0
            for n in range(12):
                await store.create(new_task(f"t{n}"))
            await _checkpoint_settled(store)
            await store.create(new_task("t12"))  # a write after a checkpoint starts the WAL over
            frames = await asyncio.to_thread(_wal_frames, store.path)
            assert (await store.get("t11")).task_id == "t11"
            return frames
        finally:
            await store.close()

    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY_COMMITS", 1_000)
    unchecked = await wal_frames_after_thirteen_writes(tmp_path / "unchecked")
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY_COMMITS", 5)
    applied_on = _record_where_jobs_run(monkeypatch)
    checked = await wal_frames_after_thirteen_writes(tmp_path / "checked")
    catch_ups = [on_caller for name, on_caller in applied_on if name == "_checkpoint_wal"]
    assert catch_ups and not any(catch_ups), "catch-ups ran, each on the store's thread"
    assert checked < unchecked / 2, (checked, unchecked)


async def test_sqlite_writes_go_on_while_a_checkpoint_copies_the_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint's copy runs beside the writer: writes made while it runs land at once
    instead of waiting behind it (the slowest call of every hundred, when the store's thread
    held the whole checkpoint). Once it ends, the catch-up on the store's thread copies what
    was written meanwhile, and the next write starts the WAL over: it does not grow."""
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY_COMMITS", 2)
    copying, release = threading.Event(), threading.Event()
    copy = sqlite_store._Copier.copy

    def slow_copy(copier: sqlite_store._Copier) -> None:
        copying.set()
        release.wait(10)
        copy(copier)

    monkeypatch.setattr(sqlite_store._Copier, "copy", slow_copy)
    applied_on = _record_where_jobs_run(monkeypatch)
    store = await SqliteTaskStore.open(tmp_path, keys=KEYS)
    try:
        await store.create(new_task("a"))
        await store.create(new_task("b"))  # the second commit starts a checkpoint
        assert await asyncio.to_thread(copying.wait, 5), "no checkpoint began"
        for n in range(6):
            await asyncio.wait_for(store.create(new_task(f"during-{n}")), 2)
        await asyncio.wait_for(store.transition("a", RUNNING), 2)
        assert store._checkpoint is not None, "the copy is still under way"
        page_size = store._writer.conn.execute("PRAGMA page_size").fetchone()[0]
        wal_bytes = await asyncio.to_thread(os.path.getsize, f"{store.path}-wal")
        frames_while_copying = (wal_bytes - 32) // (page_size + 24)

        release.set()
        await _checkpoint_settled(store)
        assert ("_checkpoint_wal", False) in applied_on, "the catch-up ran on the store's thread"
        await store.create(new_task("after"))
        frames_after = await asyncio.to_thread(_wal_frames, store.path)
        assert frames_after < frames_while_copying / 2, (frames_after, frames_while_copying)
        assert (await store.get("during-5")).state == QUEUED
    finally:
        release.set()
        await store.close()


async def test_sqlite_full_synchronous_store_always_writes_on_its_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """synchronous=FULL fsyncs every commit: that never blocks the caller's event loop."""
    applied_on = _record_where_jobs_run(monkeypatch)
    store = await SqliteTaskStore.open(tmp_path, keys=KEYS, synchronous="FULL")
    try:
        await store.create(new_task("t1"))
        await store.transition("t1", RUNNING)
        assert applied_on == [("create", False), ("transition", False)]
    finally:
        await store.close()


async def test_sqlite_a_lone_call_that_fails_after_writing_leaves_nothing(tmp_path: Path) -> None:
    """A call alone in its transaction runs without a savepoint: when it fails after it
    wrote, the transaction is rolled back, not committed."""

    def half_done(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM tasks WHERE task_id = ?", ("kept",))
        raise RuntimeError("failed after writing")

    store = await SqliteTaskStore.open(tmp_path, keys=KEYS)
    try:
        await store.create(new_task("kept"))
        with pytest.raises(RuntimeError):
            await store._run(half_done)
        assert (await store.get("kept")).task_id == "kept"
        await store.create(new_task("next"))  # the store goes on
    finally:
        await store.close()
    reopened = await SqliteTaskStore.open(tmp_path, keys=KEYS)
    try:
        assert {r.task_id for r in (await reopened.list())[0]} == {"kept", "next"}
    finally:
        await reopened.close()


async def test_sqlite_allows_one_open_store_per_data_dir(tmp_path: Path) -> None:
    first = await SqliteTaskStore.open(tmp_path, keys=KEYS)
    try:
        with pytest.raises(FailedPrecondition) as caught:
            await SqliteTaskStore.open(tmp_path, keys=KEYS)
        assert caught.value.reason == "STORE_LOCKED"
    finally:
        await first.close()
    second = await SqliteTaskStore.open(tmp_path, keys=KEYS)
    await second.close()


async def test_sqlite_scrub_names_a_wal_another_process_kept_and_empties_it_once_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A reader in another process holding a snapshot keeps the WAL past the deletion's
    TRUNCATE checkpoint (SQLite answers busy, not an error): the deletion logs it, and
    `scrub` tries again and names what is left instead of answering that nothing is."""
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_S", 0.2)
    store = await SqliteTaskStore.open(tmp_path, keys=KEYS)
    wal = f"{store.path}-wal"
    reader = sqlite3.connect(store.path, isolation_level=None)
    try:
        await finished_task(store, "gone", tenant="leaving")
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM tasks").fetchone()  # a snapshot, held
        await store.create(new_task("later"))  # written after the reader's snapshot

        assert await store.forget_tenant("leaving") == 1
        assert "could not be emptied" in caplog.text
        (note,) = await store.scrub()
        assert "read transaction" in note and str(store.path) in note
        assert await asyncio.to_thread(os.path.getsize, wal) > 0

        reader.execute("COMMIT")
        assert await store.scrub() == []
        assert await asyncio.to_thread(os.path.getsize, wal) == 0
    finally:
        reader.close()
        await store.close()


async def test_sqlite_uses_wal_and_records_its_schema_version(tmp_path: Path) -> None:
    store = await SqliteTaskStore.open(tmp_path, keys=KEYS)
    await store.create(new_task("t1"))
    await store.close()

    assert store.path == tmp_path / "tasks.sqlite3"
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (1,),
            (2,),
            (3,),
            (4,),
        ]
    conn.close()


async def test_sqlite_upgrades_a_version_1_file_keeping_its_tasks(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "tasks.sqlite3") as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL)")
        for statement in sqlite_store.SCHEMA_V1:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (1, 0)")
        conn.execute(
            f"INSERT INTO tasks ({sqlite_store.TASK_COLUMNS}) "
            "VALUES ('old', 'acme', ?, 'echo', 1, x'', 1, 1, NULL, 0, x'', '', 0, 0)",
            (int(QUEUED),),
        )
    store = await SqliteTaskStore.open(tmp_path, keys=KEYS)
    try:
        assert (await store.get("old")).tenant == "acme"
        await store.add_subjects("old", [b"alice"])
        assert await store.find_subject("acme", [b"alice"]) == ["old"]
    finally:
        await store.close()


async def test_sqlite_refuses_a_file_from_a_newer_schema(tmp_path: Path) -> None:
    store = await SqliteTaskStore.open(tmp_path, keys=KEYS)
    await store.close()
    conn = sqlite3.connect(store.path)
    with conn:
        conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (99, 0)")
    conn.close()

    with pytest.raises(LlmosError) as caught:
        await SqliteTaskStore.open(tmp_path, keys=KEYS)

    assert caught.value.reason == "STORE_SCHEMA_TOO_NEW"
    # The refusal released the lock: trying again is refused for the same reason.
    with pytest.raises(LlmosError) as again:
        await SqliteTaskStore.open(tmp_path, keys=KEYS)
    assert again.value.reason == "STORE_SCHEMA_TOO_NEW"


async def test_sqlite_reports_a_file_it_cannot_write_as_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_S", 0.1)
    store = await SqliteTaskStore.open(tmp_path, keys=KEYS)
    await store.create(new_task("t1"))
    outsider = sqlite3.connect(store.path, isolation_level=None)
    try:
        outsider.execute("BEGIN IMMEDIATE")  # holds the write lock
        with pytest.raises(Unavailable) as caught:
            await store.transition("t1", RUNNING)
        assert caught.value.reason == "STORE_UNAVAILABLE"
        assert (await store.get("t1")).state == QUEUED  # reads go on under WAL
        outsider.execute("ROLLBACK")
        assert (await store.transition("t1", RUNNING)).state == RUNNING
    finally:
        outsider.close()
        await store.close()


# ---------------------------------------------------------------- retention and forgetting


async def finished_task(
    store: TaskStore,
    task_id: str,
    *,
    tenant: str = "acme",
    created_at: float = 1_000.0,
    state: common_pb2.TaskState.ValueType = SUCCEEDED,
) -> None:
    await running_task(store, task_id, tenant=tenant, created_at=created_at)
    await store.transition(task_id, state, text="out", trace=[b"step"])


async def test_find_subject_returns_the_tenants_tasks_indexed_under_any_token(
    store: TaskStore,
) -> None:
    await running_task(store, "t1", tenant="a")
    await running_task(store, "t2", tenant="a")
    await running_task(store, "t3", tenant="b")
    await store.add_subjects("t1", [b"alice", b"phone"])
    await store.add_subjects("t1", [b"alice"])  # a repeat is a no-op
    await store.add_subjects("t2", [b"phone"])
    await store.add_subjects("t3", [b"alice"])

    assert await store.find_subject("a", [b"alice"]) == ["t1"]
    assert await store.find_subject("a", [b"phone", b"alice"]) == ["t1", "t2"]
    assert await store.find_subject("b", [b"alice", b"phone"]) == ["t3"]
    assert await store.find_subject("a", [b"nobody"]) == []
    assert await store.find_subject("a", []) == []
    with pytest.raises(NotFound):
        await store.add_subjects("missing", [b"alice"])


async def test_delete_removes_tasks_in_any_state_with_their_log_trace_and_index(
    store: TaskStore,
) -> None:
    await finished_task(store, "done")
    await running_task(store, "live")
    await store.add_subjects("done", [b"alice"])
    await store.add_subjects("live", [b"alice"])
    await running_task(store, "kept")
    await store.add_subjects("kept", [b"alice"])

    assert await store.delete(["done", "live", "missing", "done"]) == 2

    for task_id in ("done", "live"):
        for operation in ("get", "events", "trace"):
            with pytest.raises(NotFound):
                await OPERATIONS_ON_ONE_TASK[operation](store, task_id)
        with pytest.raises(NotFound):  # a late write of a stopped task creates nothing
            await store.append_text(task_id, "late")
        with pytest.raises(NotFound):
            await store.add_trace_step(task_id, b"late")
    assert await store.find_subject("acme", [b"alice"]) == ["kept"]
    assert [r.task_id for r in (await store.list())[0]] == ["kept"]
    assert await store.delete([]) == 0


async def test_forget_tenant_also_drops_its_subject_index(store: TaskStore) -> None:
    await finished_task(store, "a1", tenant="a")
    await store.add_subjects("a1", [b"alice"])

    assert await store.forget_tenant("a") == 1

    await store.create(new_task("a1", tenant="a"))  # the same id, a new task: not indexed
    assert await store.find_subject("a", [b"alice"]) == []


async def test_expire_deletes_only_final_tasks_created_before_the_cutoff(
    store: TaskStore,
) -> None:
    await finished_task(store, "old-ok", created_at=100.0)
    await finished_task(store, "old-failed", created_at=101.0, state=FAILED)
    await running_task(store, "old-running", created_at=102.0)
    await store.create(new_task("old-queued", created_at=103.0))
    await finished_task(store, "new-ok", created_at=500.0)
    await finished_task(store, "other-old", tenant="other", created_at=100.0)

    expiry = await store.expire(200.0, tenant="acme")

    assert sorted(expiry.deleted) == ["old-failed", "old-ok"]
    assert expiry.resume_after is None
    remaining = sorted(r.task_id for r in (await store.list(page_size=100))[0])
    assert remaining == ["new-ok", "old-queued", "old-running", "other-old"]
    with pytest.raises(NotFound):
        await store.trace("old-ok")


async def test_expire_over_every_tenant_spares_those_kept(store: TaskStore) -> None:
    await finished_task(store, "a", tenant="a", created_at=100.0)
    await finished_task(store, "b", tenant="b", created_at=100.0)
    await finished_task(store, "c", tenant="c", created_at=100.0)

    expiry = await store.expire(200.0, keep={"b"})

    assert sorted(expiry.deleted) == ["a", "c"]
    assert [r.task_id for r in (await store.list())[0]] == ["b"]


async def test_expire_examines_at_most_limit_tasks_and_resumes_after_them(
    store: TaskStore,
) -> None:
    for n in range(5):
        await finished_task(store, f"t{n}", tenant="keep" if n < 2 else "acme", created_at=n)

    first = await store.expire(100.0, keep={"keep"}, limit=3)
    assert first.deleted == ("t2",)  # t0 and t1 examined and kept
    assert first.resume_after == (2.0, "t2")
    second = await store.expire(100.0, keep={"keep"}, after=first.resume_after, limit=3)
    assert sorted(second.deleted) == ["t3", "t4"]
    assert second.resume_after is None
    assert sorted(r.task_id for r in (await store.list())[0]) == ["t0", "t1"]
    with pytest.raises(InvalidArgument):
        await store.expire(100.0, limit=0)


async def test_scrub_answers_notes_for_the_operator(store: TaskStore) -> None:
    notes = await store.scrub()

    assert all(isinstance(note, str) and note for note in notes)
