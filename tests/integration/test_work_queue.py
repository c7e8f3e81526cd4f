"""The shared work queue on a real Redis: taking, acknowledging, taking over, dead letters.

Each `RedisWorkQueue` here plays one kernel; two of them on one prefix are two kernels
sharing a deployment. A kernel "dies" by being dropped without `close` or `release`: its
entries stay pending and stop being renewed, exactly what a SIGKILL leaves behind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from redistools import REDIS_URL, delete_prefix, fresh_prefix

from llmos.kernel.scheduler import Priority
from llmos.kernel.store.contract import TaskRecord
from llmos.kernel.store.redis import RedisTaskStore
from llmos.kernel.store.work_queue import GROUP, RedisWorkQueue
from llmos.services.errors import NotFound, ResourceExhausted
from llmos.services.keyring import KeyRing
from llmos.v1 import common_pb2, kernel_pb2

QUEUED = common_pb2.TASK_STATE_QUEUED
RUNNING = common_pb2.TASK_STATE_RUNNING
FAILED = common_pb2.TASK_STATE_FAILED
SUCCEEDED = common_pb2.TASK_STATE_SUCCEEDED
CANCELLED = common_pb2.TASK_STATE_CANCELLED
IDLE_S = 0.3


@pytest.fixture
def prefix() -> Iterator[str]:
    value = fresh_prefix("queue")
    yield value
    delete_prefix(value)


@pytest.fixture
async def store(prefix: str) -> AsyncIterator[RedisTaskStore]:
    opened = await RedisTaskStore.open(REDIS_URL, prefix=prefix, keys=KeyRing.generate())
    yield opened
    await opened.close()


async def kernel(store: RedisTaskStore, name: str, **options: object) -> RedisWorkQueue:
    queue = RedisWorkQueue(store, kernel_id=name, claim_idle_s=IDLE_S, **options)  # type: ignore[arg-type]
    await queue.start()
    return queue


def task(task_id: str, priority: int = common_pb2.PRIORITY_NORMAL) -> TaskRecord:
    request = kernel_pb2.GenerateRequest(prompt="hi", priority=priority)  # type: ignore[arg-type]
    return TaskRecord.queued(
        task_id,
        tenant="acme",
        model="echo",
        priority=common_pb2.Priority.ValueType(priority),
        request=request.SerializeToString(),
        now=time.time(),
    )


async def test_a_submitted_task_is_stored_taken_once_and_gone_when_done(
    store: RedisTaskStore,
) -> None:
    a = await kernel(store, "a")
    b = await kernel(store, "b")
    await a.submit(task("t1"))

    assert (await store.get("t1")).state == QUEUED
    taken = await a.take(5, block_s=0.1)
    assert [w.task_id for w in taken] == ["t1"]
    assert await b.take(5, block_s=0.1) == []  # one consumer group: delivered once
    await a.done("t1")

    stream = a.streams[Priority.NORMAL]
    assert await store.client.xlen(stream) == 0
    assert (await store.client.xpending(stream, GROUP))["pending"] == 0
    await a.close()
    await b.close()


async def test_interactive_work_is_taken_before_batch(store: RedisTaskStore) -> None:
    a = await kernel(store, "a")
    await a.submit(task("batch", common_pb2.PRIORITY_BATCH))
    await a.submit(task("normal", common_pb2.PRIORITY_NORMAL))
    await a.submit(task("interactive", common_pb2.PRIORITY_INTERACTIVE))

    order = [w.task_id for w in await a.take(1)]
    order += [w.task_id for w in await a.take(1)]
    order += [w.task_id for w in await a.take(1)]

    assert order == ["interactive", "normal", "batch"]
    await a.close()


async def test_a_full_stream_refuses_before_storing(store: RedisTaskStore) -> None:
    a = await kernel(store, "a", queue_limits={p: 2 for p in Priority})
    await a.submit(task("t1"))
    await a.submit(task("t2"))

    started = time.perf_counter()
    with pytest.raises(ResourceExhausted) as caught:
        await a.submit(task("t3"))
    refused_in = time.perf_counter() - started

    assert caught.value.reason == "QUEUE_FULL"
    assert caught.value.metadata["retry_after_ms"]
    assert refused_in < 0.5
    with pytest.raises(NotFound):
        await store.get("t3")
    await a.close()


async def test_a_dead_kernels_work_is_taken_over_and_counted(store: RedisTaskStore) -> None:
    dead = await kernel(store, "dead")
    await dead.submit(task("t1"))
    assert [w.task_id for w in await dead.take(1)] == ["t1"]
    await store.transition("t1", RUNNING)
    await dead.close()  # stops renewing, releases nothing: as after a SIGKILL

    survivor = await kernel(store, "survivor")
    await asyncio.sleep(IDLE_S * 1.5)
    survivor._next_reclaim = 0.0
    taken = await survivor.take(5, block_s=0.05)

    assert [(w.task_id, w.deliveries, w.reclaimed) for w in taken] == [("t1", 2, True)]
    assert await dead.renew() == ["t1"]  # the old holder learns it lost the entry
    await survivor.close()


async def test_renewing_keeps_a_slow_task_from_being_taken(store: RedisTaskStore) -> None:
    holder = await kernel(store, "holder")
    await holder.submit(task("slow"))
    await holder.take(1)
    other = await kernel(store, "other")

    for _ in range(4):
        await asyncio.sleep(IDLE_S / 2)
        assert await holder.renew() == []
        other._next_reclaim = 0.0
        assert await other.take(5, block_s=0.01) == []

    await holder.close()
    await other.close()


async def test_an_abandoned_entry_is_kept_and_taken_over_by_its_own_kernel(
    store: RedisTaskStore,
) -> None:
    """A task this kernel could not start is let go unacknowledged: no longer renewed, its
    entry lapses and is taken again (here by the same kernel), never dropped."""
    holder = await kernel(store, "holder")
    await holder.submit(task("t1"))
    await holder.take(1)

    holder.abandon("t1")
    assert "t1" not in holder.held
    await asyncio.sleep(IDLE_S / 2)
    assert await holder.renew() == []  # not renewed: it holds nothing
    await asyncio.sleep(IDLE_S)
    holder._next_reclaim = 0.0
    taken = await holder.take(5, block_s=0.05)

    assert [(w.task_id, w.deliveries, w.reclaimed) for w in taken] == [("t1", 2, True)]
    await holder.close()


async def test_an_abandoned_streamed_task_is_failed_by_its_own_kernel(
    store: RedisTaskStore,
) -> None:
    """A streamed task cannot be taken over: let go unfinished, its own kernel fails it
    at the next renewal and removes its entry; one final meanwhile only loses its entry."""
    holder = await kernel(store, "holder")
    await holder.attach(task("unfinished"))
    await holder.attach(task("cancelled"))
    await store.transition("unfinished", RUNNING)
    await store.transition("cancelled", CANCELLED, error="cancelled")
    holder.abandon("unfinished")
    holder.abandon("cancelled")
    assert set(holder.unfinished) == {"unfinished", "cancelled"}

    await asyncio.sleep(IDLE_S)  # a renewal or two

    failed = await store.get("unfinished")
    assert failed.state == FAILED
    assert "redis_retry_s" in failed.error
    assert (await store.get("cancelled")).state == CANCELLED
    assert holder.unfinished == {}
    assert await store.client.xlen(holder.attached) == 0
    await holder.close()


async def test_an_entry_delivered_too_often_goes_to_the_dead_letter_stream(
    store: RedisTaskStore,
) -> None:
    first = await kernel(store, "first", max_deliveries=1)
    await first.submit(task("poison"))
    await first.take(1)
    await store.transition("poison", RUNNING)
    await first.close()
    await asyncio.sleep(IDLE_S * 1.5)

    second = await kernel(store, "second", max_deliveries=1)
    second._next_reclaim = 0.0
    assert await second.take(5, block_s=0.05) == []

    record = await store.get("poison")
    assert record.state == FAILED
    assert "dead-letter" in record.error
    [(_, fields)] = await store.client.xrange(second.dead_letter)
    assert fields[b"task_id"] == b"poison"
    assert fields[b"deliveries"] == b"2"
    assert (await store.client.xpending(second.streams[Priority.NORMAL], GROUP))["pending"] == 0
    await second.close()


async def test_a_dead_kernels_streamed_tasks_fail_with_the_reason(
    store: RedisTaskStore,
) -> None:
    dead = await kernel(store, "dead")
    await dead.attach(task("streamed"))
    await store.transition("streamed", RUNNING)
    await dead.close()  # its liveness key goes; a SIGKILL lets it expire

    survivor = await kernel(store, "survivor")
    survivor._next_reclaim = 0.0
    await survivor.take(5, block_s=0.01)

    record = await store.get("streamed")
    assert record.state == FAILED
    assert "client's stream ended" in record.error
    assert not await store.client.exists(dead.attached)
    await survivor.close()


async def test_a_released_task_goes_back_for_any_kernel(store: RedisTaskStore) -> None:
    leaving = await kernel(store, "leaving")
    await leaving.submit(task("t1"))
    await leaving.take(1)
    await leaving.release("t1", common_pb2.PRIORITY_NORMAL)
    await leaving.close()

    other = await kernel(store, "other")
    taken = await other.take(5, block_s=0.1)

    assert [(w.task_id, w.deliveries) for w in taken] == [("t1", 1)]
    await other.close()


async def test_a_cancel_published_by_one_kernel_reaches_the_others(
    store: RedisTaskStore,
) -> None:
    a = await kernel(store, "a")
    b = await kernel(store, "b")
    await asyncio.sleep(0.2)  # both subscribed

    await a.publish_cancel("t9")

    assert await asyncio.wait_for(b.cancels.get(), 2.0) == "t9"
    await a.close()
    await b.close()
