"""A running task's pending text and trace steps: written with its next transition, or on
their own within the flush interval; never lost, never reordered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from storetools import bare_record

from llmos.kernel.pending import PendingWrites, Taken
from llmos.kernel.store import SqliteTaskStore, TaskStore
from llmos.services.errors import FailedPrecondition, Unavailable
from llmos.services.keyring import KeyRing
from llmos.v1 import common_pb2

RUNNING = common_pb2.TASK_STATE_RUNNING
SUCCEEDED = common_pb2.TASK_STATE_SUCCEEDED


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[TaskStore]:
    opened = await SqliteTaskStore.open(tmp_path, keys=KeyRing.generate())
    try:
        yield opened
    finally:
        await opened.close()


async def new_task(store: TaskStore, task_id: str, *, running: bool = True) -> None:
    await store.create(bare_record(task_id), running=running)


async def texts(store: TaskStore, task_id: str) -> list[str]:
    return [event.text for event in await store.events(task_id) if event.kind == "text"]


async def test_a_transition_takes_everything_pending_in_order(store: TaskStore) -> None:
    await new_task(store, "t1")
    pending = PendingWrites(store, "t1", flush_s=60)
    pending.add_step(b"admit")
    pending.add_text("Hel")
    pending.add_text("lo")
    pending.add_step(b"runtime:generate")

    taken = await pending.take()

    assert taken == Taken("Hello", 0, (b"admit", b"runtime:generate"))
    assert await pending.take() == Taken("", 5, ())
    assert await texts(store, "t1") == []  # nothing was written on its own


async def test_what_waits_is_written_on_its_own_within_the_flush_interval(
    store: TaskStore,
) -> None:
    await new_task(store, "t1")
    pending = PendingWrites(store, "t1", flush_s=0.01)

    pending.add_text("live ")
    pending.add_step(b"safety:input")
    await asyncio.sleep(0.2)

    assert await texts(store, "t1") == ["live "]
    assert await store.trace("t1") == [b"safety:input"]
    assert await pending.take() == Taken("", 5, ())


async def test_a_take_waits_for_a_flush_already_writing(
    store: TaskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await new_task(store, "t1")
    writing, release = asyncio.Event(), asyncio.Event()
    append_text = store.append_text

    async def slow_append(task_id: str, text: str, **where: int | None) -> int:
        writing.set()
        await release.wait()
        return await append_text(task_id, text, **where)

    monkeypatch.setattr(store, "append_text", slow_append)
    pending = PendingWrites(store, "t1", flush_s=0)
    pending.add_text("first ")
    await writing.wait()
    pending.add_text("second")

    taking = asyncio.create_task(pending.take())
    await asyncio.sleep(0.05)
    assert not taking.done(), "the transition must come after the flush's text"
    release.set()

    assert await taking == Taken("second", 6, ())
    assert await texts(store, "t1") == ["first "]


async def test_a_failed_flush_keeps_the_text_and_stops_the_next_piece(
    store: TaskStore,
) -> None:
    await new_task(store, "t1", running=False)  # QUEUED: the store refuses text
    pending = PendingWrites(store, "t1", flush_s=0)
    pending.add_text("kept")
    await asyncio.sleep(0.1)

    with pytest.raises(FailedPrecondition) as caught:
        pending.add_text("next")

    assert caught.value.reason == "TASK_NOT_RUNNING"
    pending.add_text(" and more")  # the error is raised once
    await store.transition("t1", RUNNING)
    taken = await pending.take()  # whatever the next flush did not write
    done = await store.transition(
        "t1", SUCCEEDED, text=taken.text, text_at=taken.at, trace=taken.steps
    )
    assert done.output == "kept and more"


async def test_a_transition_that_failed_gives_back_what_it_took(store: TaskStore) -> None:
    await new_task(store, "t1")
    pending = PendingWrites(store, "t1", flush_s=60)
    pending.add_text("a")
    pending.add_step(b"one")
    taken = await pending.take()
    pending.add_text("b")
    pending.add_step(b"two")

    pending.restore(taken)

    assert await pending.take() == Taken("ab", 0, (b"one", b"two"))


async def test_text_that_was_stored_though_its_write_failed_is_kept_once(
    store: TaskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis can run a write and lose its reply: the text comes back here and goes again
    from the same place, and the store keeps only what it lacks."""
    await new_task(store, "t1")
    append_text = store.append_text
    replies_lost = 0

    async def first_reply_lost(task_id: str, text: str, **where: int | None) -> int:
        nonlocal replies_lost
        offset = await append_text(task_id, text, **where)
        if replies_lost == 0:
            replies_lost += 1
            raise Unavailable("the connection dropped before the reply", reason="STORE_UNAVAILABLE")
        return offset

    monkeypatch.setattr(store, "append_text", first_reply_lost)
    pending = PendingWrites(store, "t1", flush_s=0.01)
    pending.add_text("Hello")
    await asyncio.sleep(0.1)  # stored, put back, flushed again
    with pytest.raises(Unavailable):
        pending.add_text(", world")
    pending.add_text(", world")

    taken = await pending.take()
    assert taken == Taken(", world", 5, ())
    done = await store.transition("t1", SUCCEEDED, text=taken.text, text_at=taken.at)

    assert done.output == "Hello, world"
    assert await texts(store, "t1") == ["Hello", ", world"]


async def test_discarded_writes_are_never_flushed(store: TaskStore) -> None:
    await new_task(store, "t1")
    pending = PendingWrites(store, "t1", flush_s=0.01)
    pending.add_text("from an attempt another kernel took over")

    pending.discard()
    await asyncio.sleep(0.1)

    assert await texts(store, "t1") == []


async def test_steps_alone_wait_for_the_longer_step_interval(store: TaskStore) -> None:
    await new_task(store, "t1")
    pending = PendingWrites(store, "t1", flush_s=0.01, step_flush_s=60)
    pending.add_step(b"admit")
    await asyncio.sleep(0.1)  # ten text intervals: a step alone is not written yet

    assert await store.trace("t1") == []
    assert await pending.take() == Taken("", 0, (b"admit",))  # it goes with the transition


async def test_text_brings_a_waiting_step_forward(store: TaskStore) -> None:
    await new_task(store, "t1")
    pending = PendingWrites(store, "t1", flush_s=0.01, step_flush_s=60)
    pending.add_step(b"admit")
    pending.add_text("live")
    await asyncio.sleep(0.2)

    assert await texts(store, "t1") == ["live"]
    assert await store.trace("t1") == [b"admit"]
    assert await pending.take() == Taken("", 4, ())


async def test_steps_alone_are_written_within_the_step_interval(store: TaskStore) -> None:
    await new_task(store, "t1")
    pending = PendingWrites(store, "t1", flush_s=60, step_flush_s=0.01)
    pending.add_step(b"admit")
    await asyncio.sleep(0.2)

    assert await store.trace("t1") == [b"admit"]
    assert await pending.take() == Taken("", 0, ())


async def test_nothing_is_flushed_before_the_first_write_has_landed(store: TaskStore) -> None:
    await new_task(store, "t1")
    stored: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    pending = PendingWrites(store, "t1", flush_s=0.01, stored=stored)
    pending.add_text("early ")
    pending.add_step(b"admit")
    await asyncio.sleep(0.1)  # ten flush intervals, the first write still in flight
    assert await texts(store, "t1") == []

    stored.set_result(True)
    await asyncio.sleep(0.2)  # the window starts again: a longer task's text still flows

    assert await texts(store, "t1") == ["early "]
    assert await store.trace("t1") == [b"admit"]


async def test_a_transition_takes_what_waited_for_the_first_write(store: TaskStore) -> None:
    await new_task(store, "t1")
    stored: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    pending = PendingWrites(store, "t1", flush_s=0.01, stored=stored)
    pending.add_text("all ")
    await asyncio.sleep(0.05)
    stored.set_result(True)

    assert await pending.take() == Taken("all ", 0, ())  # before the window, started over, ends
    await asyncio.sleep(0.1)
    assert await texts(store, "t1") == []


@pytest.mark.parametrize("outcome", [False, None])
async def test_nothing_is_flushed_when_the_first_write_was_refused_or_unknown(
    store: TaskStore, outcome: bool | None
) -> None:
    await new_task(store, "t1")  # the store holds it, so a wrong flush would show
    stored: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
    pending = PendingWrites(store, "t1", flush_s=0.01, stored=stored)
    pending.add_text("orphan ")
    pending.add_step(b"admit")
    await asyncio.sleep(0.05)
    stored.set_result(outcome)
    await asyncio.sleep(0.1)  # ten flush intervals after the write ended

    assert await texts(store, "t1") == []
    assert await store.trace("t1") == []
    assert await pending.take() == Taken("orphan ", 0, (b"admit",))  # still there for the runner
