"""After a forget on Redis, the append-only file no longer holds the forgotten data.

Until Redis rewrites its AOF, the file replays every command that wrote a task, so deleting
the keys is not enough: `RedisTaskStore.scrub` starts `BGREWRITEAOF` (docs/privacy.md
"Retention and forgetting"). This runs a Redis server of its own with the project's
configuration (deploy/redis/redis.conf: AOF on, RDB preamble) on a free port, writes a
task holding a secret, checks the AOF holds it, forgets the task, and reads the rewritten
files' raw bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redistools import RedisServer

from llmos.kernel.store import TaskRecord
from llmos.kernel.store.redis import RedisTaskStore
from llmos.services.keyring import KeyRing
from llmos.v1 import common_pb2, kernel_pb2

SECRET = "zelda.forgotten@example.com"


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    server = RedisServer(tmp_path)
    server.start()
    yield server.port
    server.stop()


def aof_bytes(directory: Path) -> bytes:
    return b"".join(
        path.read_bytes() for path in sorted(directory.rglob("*.aof*")) if path.is_file()
    )


async def wait_for(condition: object, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} not within {timeout_s}s"
        await asyncio.sleep(0.1)


async def test_forgetting_rewrites_the_aof_without_the_forgotten_task(
    tmp_path: Path, redis_port: int
) -> None:
    store = await RedisTaskStore.open(
        f"redis://127.0.0.1:{redis_port}/0", keys=KeyRing.generate(), prefix="llmos:"
    )
    try:
        request = kernel_pb2.GenerateRequest(prompt=f"Please write to {SECRET}")
        record = TaskRecord.queued(
            "forgotten-task-1",
            tenant="acme",
            model="echo",
            priority=common_pb2.PRIORITY_NORMAL,
            request=request.SerializeToString(),
            now=time.time(),
        )
        await store.create(record, running=True)
        await store.transition(
            "forgotten-task-1", common_pb2.TASK_STATE_SUCCEEDED, text=f"Done: {SECRET}"
        )
        # appendfsync everysec: the commands reach the file within about a second. The
        # secret itself is sealed (encryption at rest), so the task id, which names the
        # keys, is what shows the write arrived.
        await wait_for(lambda: b"forgotten-task-1" in aof_bytes(tmp_path), "the AOF write")
        assert SECRET.encode() not in aof_bytes(tmp_path), "the prompt reached the AOF unsealed"

        assert await store.delete(["forgotten-task-1"]) == 1
        notes = await store.scrub()

        assert any("started an AOF rewrite" in note for note in notes), notes
        client = redis.Redis(port=redis_port)
        try:

            def rewritten() -> bool:
                info = client.info("persistence")
                return not (info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"])

            await wait_for(rewritten, "the AOF rewrite")
        finally:
            client.close()
        # Redis 7 deletes the replaced AOF parts on a background thread once the rewrite
        # is done: give it a moment, then nothing of the task may be left in any file.
        await wait_for(
            lambda: b"forgotten-task-1" not in aof_bytes(tmp_path),
            "the old AOF parts' removal",
            10,
        )
        raw = aof_bytes(tmp_path)
        assert raw, "the rewritten AOF is empty: nothing was read"
        assert b"forgotten-task-1" not in raw
        assert SECRET.encode() not in raw
    finally:
        await store.close()
