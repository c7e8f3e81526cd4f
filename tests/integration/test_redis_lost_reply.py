"""A Redis write that ran but whose reply was lost is stored once.

When the connection drops after Redis ran a script and before its reply arrived, the
client cannot tell whether it ran, and redis-py sends it again on a new connection. A
text append sent twice used to be stored twice: a task's output held part of its text
twice after a Redis restart under load (docs/operator-guide.md's former known issue).

The connection here goes through a TCP relay in the test process, between the store and
the real test Redis, that can be told to cut the connection at the reply to the next
script call (EVALSHA) instead of passing it on: the script has run on the server, and the
client hears nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from redistools import REDIS_URL, delete_prefix, fresh_prefix
from storetools import bare_record

from llmos.kernel.scheduler import Priority
from llmos.kernel.store.redis import RedisTaskStore
from llmos.kernel.store.work_queue import DEAD_LETTER, GROUP, RedisWorkQueue
from llmos.services.errors import AlreadyExists
from llmos.services.keyring import KeyRing
from llmos.v1 import common_pb2

QUEUED = common_pb2.TASK_STATE_QUEUED
RUNNING = common_pb2.TASK_STATE_RUNNING
SUCCEEDED = common_pb2.TASK_STATE_SUCCEEDED
FAILED = common_pb2.TASK_STATE_FAILED


class ReplyCutter:
    """A TCP relay to Redis that, when armed, cuts the connection at the reply to the next
    script call."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._armed = False  # for the next script call, on whichever connection
        self.cuts = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._relays: set[asyncio.Task[None] | None] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def cut_next_script_reply(self) -> None:
        self._armed = True

    async def _relay(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        self._relays.add(asyncio.current_task())
        server_in, server_out = await asyncio.open_connection(*self._target)
        self._writers += [client_out, server_out]
        cut = asyncio.Event()  # set before the script call is passed on: its reply is cut
        upstream = asyncio.create_task(self._upstream(client_in, server_out, cut))
        try:
            while chunk := await server_in.read(65536):
                if cut.is_set():
                    self.cuts += 1
                    break  # the script ran; its reply goes nowhere
                client_out.write(chunk)
                await client_out.drain()
        except ConnectionError:
            pass
        finally:
            upstream.cancel()
            for writer in (client_out, server_out):
                writer.close()

    async def _upstream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cut: asyncio.Event
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                if self._armed and b"EVALSHA" in chunk.upper():
                    self._armed = False
                    cut.set()
                writer.write(chunk)
                await writer.drain()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        # Each relay ends once its sockets are closed; cancelled, asyncio would log it.
        relays = [relay for relay in self._relays if relay is not None and not relay.done()]
        if relays:
            await asyncio.wait(relays, timeout=5)


@pytest.fixture
async def cut_store() -> AsyncIterator[tuple[RedisTaskStore, ReplyCutter]]:
    host_port, database = REDIS_URL.removeprefix("redis://").split("/")
    host, port = host_port.rsplit(":", 1)
    cutter = ReplyCutter(host, int(port))
    relay_port = await cutter.start()
    prefix = fresh_prefix("lost-reply")
    store = await RedisTaskStore.open(
        f"redis://127.0.0.1:{relay_port}/{database}", prefix=prefix, keys=KeyRing.generate()
    )
    try:
        yield store, cutter
    finally:
        await store.close()
        await cutter.close()
        delete_prefix(prefix)


@pytest.fixture
async def cut_queue(
    cut_store: tuple[RedisTaskStore, ReplyCutter],
) -> AsyncIterator[tuple[RedisTaskStore, ReplyCutter, RedisWorkQueue]]:
    """A kernel's work queue on the store behind the relay, started."""
    store, cutter = cut_store
    queue = RedisWorkQueue(store, kernel_id="k1")
    await queue.start()
    try:
        yield store, cutter, queue
    finally:
        await queue.close()


async def running_task(store: RedisTaskStore, task_id: str) -> None:
    await store.create(bare_record(task_id), running=True)


async def test_an_append_whose_reply_was_lost_is_stored_once(
    cut_store: tuple[RedisTaskStore, ReplyCutter],
) -> None:
    store, cutter = cut_store
    await running_task(store, "t1")
    await store.append_text("t1", "Hel", at=0)  # the script is loaded: one command next

    cutter.cut_next_script_reply()
    offset = await store.append_text("t1", "lo", at=3)

    assert cutter.cuts == 1, "the relay cut a reply"
    assert offset == 3
    assert (await store.get("t1")).output == "Hello"
    assert [e.text for e in await store.events("t1") if e.kind == "text"] == ["Hel", "lo"]


async def test_without_a_start_a_lost_reply_stores_the_text_twice(
    cut_store: tuple[RedisTaskStore, ReplyCutter],
) -> None:
    """What the start (`at`) is for: the same cut, and an append that gives none."""
    store, cutter = cut_store
    await running_task(store, "t1")
    await store.append_text("t1", "Hel")

    cutter.cut_next_script_reply()
    await store.append_text("t1", "lo")

    assert cutter.cuts == 1
    assert (await store.get("t1")).output == "Hellolo"


async def test_an_ending_whose_reply_was_lost_is_stored_once(
    cut_store: tuple[RedisTaskStore, ReplyCutter],
) -> None:
    store, cutter = cut_store
    await running_task(store, "t1")
    await store.append_text("t1", "Hel", at=0)  # create(running=True) loaded the other

    cutter.cut_next_script_reply()
    done = await store.transition("t1", SUCCEEDED, text="lo", text_at=3)

    assert cutter.cuts == 1
    assert (done.state, done.output) == (SUCCEEDED, "Hello")
    kinds = [(e.kind, e.text) for e in await store.events("t1")]
    assert kinds.count(("text", "lo")) == 1 and kinds.count(("state", "")) == 3


async def test_a_trace_step_whose_reply_was_lost_is_stored_once(
    cut_store: tuple[RedisTaskStore, ReplyCutter],
) -> None:
    store, cutter = cut_store
    await running_task(store, "t1")
    await store.add_trace_step("t1", b"admit")

    cutter.cut_next_script_reply()
    await store.add_trace_step("t1", b"safety:input")
    await store.add_trace_step("t1", b"safety:input")  # a step of its own, sealed anew

    assert cutter.cuts == 1
    assert await store.trace("t1") == [b"admit", b"safety:input", b"safety:input"]


async def test_a_create_whose_reply_was_lost_is_not_a_duplicate(
    cut_store: tuple[RedisTaskStore, ReplyCutter],
) -> None:
    """The create ran: sent again, it is the same task, not DUPLICATE_TASK for the caller's
    own task; a second create of the id still is."""
    store, cutter = cut_store
    await running_task(store, "warm-up")  # loads the scripts

    cutter.cut_next_script_reply()
    await running_task(store, "t1")

    assert cutter.cuts == 1
    assert (await store.get("t1")).state == RUNNING
    assert [e.state for e in await store.events("t1")] == [QUEUED, RUNNING]
    with pytest.raises(AlreadyExists):
        await running_task(store, "t1")


async def test_a_submit_whose_reply_was_lost_is_queued_once(
    cut_queue: tuple[RedisTaskStore, ReplyCutter, RedisWorkQueue],
) -> None:
    store, cutter, queue = cut_queue
    await queue.submit(bare_record("warm-up"))
    await queue.attach(bare_record("warm-up-attached"))

    cutter.cut_next_script_reply()
    await queue.submit(bare_record("t1"))
    cutter.cut_next_script_reply()
    await queue.attach(bare_record("t2"))

    assert cutter.cuts == 2
    stream = queue.streams[Priority.NORMAL]
    entries = await store.client.xrange(stream)
    assert [fields[b"task_id"] for _, fields in entries] == [b"warm-up", b"t1"]
    assert "t2" in queue.held, "the attached task is held with its entry id"
    attached = await store.client.xrange(queue.attached)
    assert queue.held["t2"].entry_id == attached[-1][0].decode()


async def test_a_release_whose_reply_was_lost_queues_the_task_once(
    cut_queue: tuple[RedisTaskStore, ReplyCutter, RedisWorkQueue],
) -> None:
    """A planned stop gives a held task back: one fresh entry, the held one gone."""
    store, cutter, queue = cut_queue
    await queue.submit(bare_record("warm-up"))
    await queue.submit(bare_record("t1"))
    taken = await queue.take(2, block_s=0.1)
    assert {work.task_id for work in taken} == {"warm-up", "t1"}
    await queue.release("warm-up", common_pb2.PRIORITY_NORMAL)  # loads the script

    cutter.cut_next_script_reply()
    await queue.release("t1", common_pb2.PRIORITY_NORMAL)

    assert cutter.cuts == 1
    stream = queue.streams[Priority.NORMAL]
    entries = await store.client.xrange(stream)
    assert sorted(fields[b"task_id"] for _, fields in entries) == [b"t1", b"warm-up"]
    assert (await store.client.xpending(stream, "kernels"))["pending"] == 0


async def test_a_dead_letter_whose_reply_was_lost_is_added_once(
    cut_store: tuple[RedisTaskStore, ReplyCutter],
) -> None:
    """An entry delivered too often is moved to the dead-letter stream once, even when the
    move ran and its reply was lost (redis-py sends it again)."""
    store, cutter = cut_store
    idle_s = 0.3
    first = RedisWorkQueue(store, kernel_id="first", claim_idle_s=idle_s, max_deliveries=1)
    await first.start()
    await first.submit(bare_record("poison"))
    assert [work.task_id for work in await first.take(1, block_s=0.1)] == ["poison"]
    # Its end was stored but the kernel died before acknowledging the entry: the move is
    # then the only script the next kernel runs for it (no transition to make).
    await store.transition("poison", RUNNING)
    await store.transition("poison", FAILED, error="the kernel died")
    await first.close()  # stops renewing, releases nothing: as after a SIGKILL
    await asyncio.sleep(idle_s * 1.5)

    second = RedisWorkQueue(store, kernel_id="second", claim_idle_s=idle_s, max_deliveries=1)
    await second.start()
    try:
        await store.client.script_load(DEAD_LETTER)  # so the move is one EVALSHA
        cutter.cut_next_script_reply()
        second._next_reclaim = 0.0
        assert await second.take(5, block_s=0.05) == []

        assert cutter.cuts == 1
        dead = await store.client.xrange(second.dead_letter)
        assert [fields[b"task_id"] for _, fields in dead] == [b"poison"]
        stream = second.streams[Priority.NORMAL]
        assert await store.client.xrange(stream) == []
        assert (await store.client.xpending(stream, GROUP))["pending"] == 0
    finally:
        await second.close()


async def test_a_start_whose_reply_was_lost_is_stored_once(
    cut_store: tuple[RedisTaskStore, ReplyCutter],
) -> None:
    """QUEUED -> RUNNING ran, its reply was lost: sent again, it finds the task RUNNING.
    That is this very write, not a move out of RUNNING another writer made. Refused as an
    illegal transition, the kernel dropped the task's queue entry and left it RUNNING with
    nobody to run it: one task of 90 never finished in a Redis restart under load."""
    store, cutter = cut_store
    await store.create(bare_record("warm-up"))
    await store.transition("warm-up", RUNNING)  # loads the script
    await store.create(bare_record("t1"))

    cutter.cut_next_script_reply()
    started = await store.transition("t1", RUNNING)

    assert cutter.cuts == 1
    assert started.state == RUNNING
    assert [e.state for e in await store.events("t1")] == [QUEUED, RUNNING]


async def test_a_requeue_whose_reply_was_lost_counts_one_attempt(
    cut_store: tuple[RedisTaskStore, ReplyCutter],
) -> None:
    """RUNNING -> QUEUED (a stopping kernel's, or a takeover's) sent twice is one new
    attempt and one QUEUED event, its trace step stored once."""
    store, cutter = cut_store
    await running_task(store, "t1")
    await store.transition("t1", SUCCEEDED)  # loads the script
    await running_task(store, "t2")

    cutter.cut_next_script_reply()
    requeued = await store.transition("t2", QUEUED, error="the kernel stopped", trace=[b"step"])

    assert cutter.cuts == 1
    assert (requeued.state, requeued.attempts) == (QUEUED, 1)
    assert (await store.get("t2")).attempts == 1
    assert [e.state for e in await store.events("t2")] == [QUEUED, RUNNING, QUEUED]
    assert await store.trace("t2") == [b"step"]
