"""Sealing in both task-store backends: rotation, re-wrapping in bounded steps, counts.

Each store here has a file-backed key ring, rotated with `rotate_file` as `llmos keys
rotate` does, and the test reads everything back through the `TaskStore` API.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redistools import REDIS_URL, delete_prefix

from llmos.kernel.store import SqliteTaskStore, TaskRecord, TaskStore
from llmos.kernel.store import sqlite as sqlite_store
from llmos.kernel.store.redis import RedisTaskStore
from llmos.services.errors import InvalidArgument
from llmos.services.keyring import KeyRing, from_file, rotate_file, write_file
from llmos.v1 import common_pb2

RUNNING = common_pb2.TASK_STATE_RUNNING
SUCCEEDED = common_pb2.TASK_STATE_SUCCEEDED
FAILED = common_pb2.TASK_STATE_FAILED


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    path = tmp_path / "keys.json"
    write_file(path, KeyRing.generate())
    return from_file(path)


@pytest.fixture(params=["sqlite", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, ring: KeyRing
) -> AsyncIterator[TaskStore]:
    opened: TaskStore
    prefix = f"llmos-sealing-{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]}:"
    if request.param == "sqlite":
        opened = await SqliteTaskStore.open(tmp_path / "data", keys=ring)
    else:
        opened = await RedisTaskStore.open(REDIS_URL, prefix=prefix, keys=ring)
    try:
        yield opened
    finally:
        await opened.close()
        delete_prefix(prefix)


async def run_one(store: TaskStore, task_id: str, *, fail: bool = False) -> None:
    await store.create(
        TaskRecord.queued(
            task_id,
            tenant="acme",
            model="echo",
            priority=common_pb2.PRIORITY_NORMAL,
            request=f"prompt of {task_id}".encode(),
            now=1000.0,
        )
    )
    await store.transition(task_id, RUNNING)
    await store.append_text(task_id, f"first words of {task_id} ")
    await store.add_trace_step(task_id, f"step of {task_id}".encode())
    await store.transition(
        task_id,
        FAILED if fail else SUCCEEDED,
        text=f"last words of {task_id}",
        trace=[f"final step of {task_id}".encode()],
        error=f"why {task_id} failed" if fail else None,
    )


async def snapshot(store: TaskStore, task_ids: list[str]) -> list[object]:
    """Everything the API returns for the tasks, to compare before and after."""
    seen: list[object] = []
    for task_id in task_ids:
        record = await store.get(task_id)
        seen += [record.request, record.output, record.error, record.state]
        seen += [(e.kind, e.text) for e in await store.events(task_id)]
        seen += await store.trace(task_id)
    return seen


async def test_rotation_then_stepwise_rewrap_moves_every_value(
    store: TaskStore, ring: KeyRing
) -> None:
    old_ids = [f"old{i}" for i in range(5)]
    for index, task_id in enumerate(old_ids):
        await run_one(store, task_id, fail=index == 0)
    before = await snapshot(store, old_ids)
    assert set(await store.key_usage()) == {"k1"}

    assert rotate_file(ring) == "k2"
    await run_one(store, "new")
    usage = await store.key_usage()
    assert set(usage) == {"k1", "k2"} and usage["k2"] > 0
    assert await snapshot(store, old_ids) == before  # old data still opens

    total, cursor, steps = 0, "", 0
    while True:
        report = await store.rewrap(cursor, 4)
        assert report.failed == 0
        total += report.rewrapped
        steps += 1
        cursor = report.cursor
        if not cursor:
            break
    assert steps > 1, "the pass went in bounded steps"
    assert total == usage["k1"]
    assert set(await store.key_usage()) == {"k2"}
    assert await snapshot(store, old_ids) == before

    again = await store.rewrap("", 1000)  # a second pass finds nothing to do
    assert again.rewrapped == 0 and again.cursor == ""


async def test_a_foreign_cursor_is_refused(store: TaskStore) -> None:
    with pytest.raises(InvalidArgument):
        await store.rewrap("not-a-cursor", 10)


async def test_a_version_1_sqlite_file_is_sealed_when_opened(tmp_path: Path, ring: KeyRing) -> None:
    """A store written before sealing: its plaintext rows are sealed in the upgrade, and
    the file and WAL hold none of them afterwards."""
    data_dir = tmp_path / "old"
    data_dir.mkdir()
    with sqlite3.connect(data_dir / "tasks.sqlite3") as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        for statement in sqlite_store.SCHEMA_V1:
            conn.execute(statement)
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL)")
        conn.execute("INSERT INTO schema_version VALUES (1, 0)")
        conn.execute(
            "INSERT INTO tasks VALUES ('t1', 'acme', ?, 'echo', 2, ?, 1.0, 2.0, 2.0, 1, x'', "
            "'', 0, 0)",
            (int(SUCCEEDED), b"the secret prompt"),
        )
        conn.execute("INSERT INTO events VALUES ('t1', 0, 'state', 1, '', 0)")
        conn.execute("INSERT INTO events VALUES ('t1', 1, 'text', 2, 'the secret output', 0)")
        conn.execute("INSERT INTO traces VALUES ('t1', 0, x'7365637265742074726163652073746570')")
    store = await SqliteTaskStore.open(data_dir, keys=ring)
    try:
        record = await store.get("t1")
        assert (record.request, record.output) == (b"the secret prompt", "the secret output")
        assert await store.trace("t1") == [b"secret trace step"]
        assert await store.key_usage() == {"k1": 3}
    finally:
        await store.close()
    raw = b"".join(p.read_bytes() for p in data_dir.glob("tasks.sqlite3*"))
    for secret in (b"the secret prompt", b"the secret output", b"secret trace step"):
        assert secret not in raw
