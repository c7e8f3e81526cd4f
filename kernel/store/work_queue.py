"""The work queue several kernels share: Redis Streams with one consumer group.

A kernel with the embedded SQLite store is alone, so its scheduler's in-memory queue is the
queue and `TaskStore.recover` restarts its work after a crash. Kernels sharing a Redis store
need more: each accepted task must be run by exactly one of them, and a kernel that dies
must not take its work with it. That is what this module does, with stream primitives:

- **One stream per priority class** (`<prefix>queue:interactive`, `:normal`, `:batch`). A
  `Submit` stores the task and adds its entry in one script (`RedisTaskStore`), so an
  accepted task is always on the queue. A full stream refuses at once with
  RESOURCE_EXHAUSTED and a retry-after hint, like the scheduler's own bounded queues.
- **One consumer group, `kernels`; each kernel a consumer.** A kernel takes entries
  (XREADGROUP) only while it has room for them, interactive first, and hands them to its
  local scheduler, which orders them by class, tenant share and age. A taken entry sits in
  the kernel's pending list until the task's final state is stored; only then is it
  acknowledged (XACK) and deleted. A crash between the two leaves the entry pending, and
  whoever takes it next finds the task finished and just acknowledges it: completion is
  idempotent.
- **Liveness is the pending entry's idle time.** A live kernel re-claims its own entries
  every `claim_idle_s / 3` (XCLAIM ... JUSTID, which resets their idle time). Entries idle
  for longer than `claim_idle_s` belong to a dead or stalled kernel, and any other kernel
  takes them over with XAUTOCLAIM. A task found RUNNING that way is re-queued (its attempt
  counted) and run again. A kernel that finds an entry it held taken over stops its own
  run of that task (`lost`), so a stalled-then-resumed kernel does not keep writing.
- **A dead-letter stream** (`<prefix>queue:dead`). An entry delivered more than
  `max_deliveries` times (a task that kills every kernel that runs it) has its task FAILED,
  then is moved there with the reason, instead of taking the cluster down in turn. The
  move (acknowledge, add the dead letter, delete the entry) is one script that does
  nothing once the entry is acknowledged, so a move sent again after a lost reply adds no
  second dead letter (`DEAD_LETTER`).
- **Streamed (`Generate`) tasks are attached to the kernel that holds the client's
  stream**: they are recorded in `<prefix>attached:<kernel id>`, never offered to other
  kernels, since only that kernel can deliver their tokens. If it dies, the client's
  stream is gone with it; another kernel notices (the dead kernel's liveness key expired)
  and fails the task with that reason, so it is never left RUNNING. One whose start or
  end Redis refused (down past the retries) is failed by its own kernel once Redis is
  back (`abandon`, `end_unfinished`): no other kernel would.
- **Cancellation crosses kernels by pub/sub.** CancelTask on one kernel for a task another
  kernel runs publishes the id on `<prefix>cancel`; the kernel running it cancels it.

Execution is at least once (a stalled kernel's task may run again elsewhere); the result
is stored once.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import itertools
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any

import redis.exceptions

from llmos.kernel.scheduler import DEFAULT_QUEUE_LIMITS, Priority
from llmos.kernel.store.contract import FAILED, TaskRecord, finished_or_gone
from llmos.kernel.store.redis import RedisTaskStore, flatten
from llmos.services.errors import LlmosError, ResourceExhausted

log = logging.getLogger(__name__)

GROUP = "kernels"
# How long one XREADGROUP blocks waiting for new work.
BLOCK_S = 1.0
RETRY_AFTER_MS = 1000
# The error a streamed task gets when its start or end could not be stored.
UNFINISHED_STREAM = (
    "Redis refused its start or end past redis_retry_s; its client's stream ended with "
    "that error, so it cannot run again"
)

# KEYS: one stream per held entry. ARGV: group, consumer, entry ids (one per key).
# Resets the idle time of every entry this consumer still owns; returns the ids it lost.
REFRESH = """
local lost = {}
for i, key in ipairs(KEYS) do
  local id = ARGV[i + 2]
  local pending = redis.call('XPENDING', key, ARGV[1], id, id, 1)
  if pending[1] and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', key, ARGV[1], ARGV[2], 0, id, 'JUSTID')
  else
    table.insert(lost, id)
  end
end
return lost
"""

# KEYS: the class's stream, the stream of the entry this kernel holds (the class's stream
# again when it holds none). ARGV: task id, held entry id ("" for none), group, "1" to
# acknowledge the held entry (a group's stream) or "0" (this kernel's attached stream).
# Queues the task afresh and removes the held entry, at once; returns 0 without writing
# when the held entry is gone already: this very call ran, and its reply was lost.
RELEASE = """
if ARGV[2] ~= '' then
  if #redis.call('XRANGE', KEYS[2], ARGV[2], ARGV[2]) == 0 then return 0 end
  if ARGV[4] == '1' then redis.call('XACK', KEYS[2], ARGV[3], ARGV[2]) end
  redis.call('XDEL', KEYS[2], ARGV[2])
end
redis.call('XADD', KEYS[1], '*', 'task_id', ARGV[1])
return 1
"""

# KEYS: the stream the entry is on, the dead-letter stream. ARGV: group, entry id, then the
# dead letter's fields and values. Acknowledges the entry, adds the dead letter and deletes
# the entry, at once, and only while the entry is pending: run again after a lost reply it
# finds the entry acknowledged and adds nothing (returns 0; 1 when it moved the entry).
DEAD_LETTER = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""


@dataclasses.dataclass(frozen=True)
class Work:
    """One queue entry this kernel holds: the task to run and where its entry lives.

    `deliveries` counts how many times the entry was handed to a kernel (1 when fresh);
    `reclaimed` is True when it was taken over from a kernel that stopped renewing it.
    """

    task_id: str
    stream: str
    entry_id: str
    deliveries: int = 1
    reclaimed: bool = False


def default_kernel_id() -> str:
    """Unique per kernel process: host, pid and a random suffix (pids repeat across hosts)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class RedisWorkQueue:
    """Takes, holds, acknowledges and takes over queue entries for one kernel."""

    def __init__(
        self,
        store: RedisTaskStore,
        *,
        kernel_id: str | None = None,
        claim_idle_s: float = 15.0,
        max_deliveries: int = 5,
        queue_limits: Mapping[Priority, int] = DEFAULT_QUEUE_LIMITS,
    ) -> None:
        if claim_idle_s <= 0 or max_deliveries < 1:
            raise ValueError("claim_idle_s must be > 0 and max_deliveries >= 1")
        self.store = store
        self.client = store.client
        self.kernel_id = kernel_id or default_kernel_id()
        self.claim_idle_s = claim_idle_s
        self.max_deliveries = max_deliveries
        self.queue_limits = dict(queue_limits)
        prefix = store.keys.prefix
        self.streams = {p: f"{prefix}queue:{p.label}" for p in Priority}
        self.dead_letter = f"{prefix}queue:dead"
        self.attached = f"{prefix}attached:{self.kernel_id}"
        self.attached_set = f"{prefix}attached"
        self.alive_key = f"{prefix}kernel:{self.kernel_id}"
        self.cancel_channel = f"{prefix}cancel"
        self.held: dict[str, Work] = {}
        # Streamed tasks this kernel let go unfinished (`abandon`): no other kernel takes an
        # attached entry, so this one fails them once the store takes the write.
        self.unfinished: dict[str, Work] = {}
        # Task ids another kernel asked to cancel, and ids whose entry another kernel took.
        self.cancels: asyncio.Queue[str] = asyncio.Queue()
        self.lost: asyncio.Queue[str] = asyncio.Queue()
        self._refresh = self.client.register_script(REFRESH)
        self._release = self.client.register_script(RELEASE)
        self._move_to_dead_letter = self.client.register_script(DEAD_LETTER)
        self._next_reclaim = 0.0
        self._background: builtins.list[asyncio.Task[None]] = []
        # Background loops stop on this rather than on cancellation: redis-py can swallow a
        # CancelledError that lands mid-command, and the loop would then run on.
        self._stopping = asyncio.Event()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Create the group (once per deployment), announce this kernel, start renewing."""
        for stream in self.streams.values():
            try:
                await self.store.call(
                    self.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
                )
            except LlmosError as error:
                if "BUSYGROUP" not in error.message:
                    raise
        await self._announce()
        self._background = [
            asyncio.create_task(self._renew_forever(), name="queue-renew"),
            asyncio.create_task(self._listen_for_cancels(), name="queue-cancels"),
        ]

    async def close(self) -> None:
        """Stop renewing. Entries still held stay pending, so another kernel takes them over
        after `claim_idle_s`; call `release` first for those that should move at once."""
        self._stopping.set()
        await stop_loops(self._background)
        with contextlib.suppress(LlmosError):
            await self.store.call(self.client.delete(self.alive_key))

    async def _announce(self) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.alive_key, str(time.time()), px=int(self.claim_idle_s * 2000))
            pipe.sadd(self.attached_set, self.attached)
            await self.store.call(pipe.execute())

    # -- putting work on the queue ------------------------------------------------------

    async def submit(self, record: TaskRecord) -> None:
        """Store a new task and queue it, atomically; RESOURCE_EXHAUSTED when its class's
        stream is full."""
        priority = Priority.from_proto(record.priority)
        stream = self.streams[priority]
        waiting = await self.store.call(self.client.xlen(stream))
        limit = self.queue_limits[priority]
        if waiting >= limit:
            raise ResourceExhausted(
                f"the shared {priority.label} queue is full ({limit} tasks waiting or running "
                f"across kernels); retry in {RETRY_AFTER_MS} ms",
                reason="QUEUE_FULL",
                metadata={"retry_after_ms": str(RETRY_AFTER_MS), "priority": priority.label},
            )
        await self._create(record, stream)

    async def attach(self, record: TaskRecord) -> None:
        """Store a new streamed task, recorded as this kernel's alone (see the module doc)."""
        await self._create(record, self.attached)
        # Attached entries are not in the group: the task is held from the start.

    async def _create(self, record: TaskRecord, stream: str) -> None:
        keys, args = self.store.new_task_args(record)
        entry = await self.store.call(
            self.store.create_and_enqueue(
                keys=[*keys, stream],
                args=[
                    *args,
                    "1",
                    "task_id",
                    record.task_id,
                    *flatten(self.store.record_fields(record)),
                ],
            )
        )
        if not entry:
            raise self.store.duplicate(record.task_id)
        if stream == self.attached:
            self.held[record.task_id] = Work(record.task_id, stream, entry.decode())

    # -- taking work ------------------------------------------------------------------

    async def take(self, room: int, block_s: float = BLOCK_S) -> builtins.list[Work]:
        """Up to `room` entries for this kernel: taken over from dead kernels first, then new
        ones, interactive before normal before batch. Blocks up to `block_s` when there are
        none. Entries past `max_deliveries` go to the dead-letter stream instead."""
        if room <= 0:
            return []
        works: builtins.list[Work] = []
        if time.monotonic() >= self._next_reclaim:
            self._next_reclaim = time.monotonic() + self.claim_idle_s / 2
            works.extend(await self._reclaim(room))
            await self._fail_dead_kernels_streams()
        for priority in Priority:
            if len(works) >= room:
                break
            works.extend(await self._read({self.streams[priority]: ">"}, room - len(works)))
        if not works:
            works = await self._read(
                dict.fromkeys(self.streams.values(), ">"), room, block_ms=int(block_s * 1000)
            )
        for work in works:
            self.held[work.task_id] = work
        return works

    async def _read(
        self, streams: dict[Any, Any], count: int, block_ms: int | None = None
    ) -> builtins.list[Work]:
        replies = await self.store.call(
            self.client.xreadgroup(
                GROUP, self.kernel_id, streams=streams, count=count, block=block_ms
            )
        )
        works: builtins.list[Work] = []
        for stream, entries in replies or ():
            for entry_id, fields in entries:
                task_id = fields.get(b"task_id", b"").decode()
                works.append(Work(task_id, stream.decode(), entry_id.decode()))
        return works

    async def _reclaim(self, room: int) -> builtins.list[Work]:
        """Take over entries idle past `claim_idle_s` (their kernel stopped renewing)."""
        works: builtins.list[Work] = []
        for stream in self.streams.values():
            if len(works) >= room:
                break
            reply = await self.store.call(
                self.client.xautoclaim(
                    stream,
                    GROUP,
                    self.kernel_id,
                    min_idle_time=int(self.claim_idle_s * 1000),
                    start_id="0-0",
                    count=room - len(works),
                )
            )
            for entry_id, fields in reply[1]:
                if fields is None:  # deleted while pending
                    continue
                entry = entry_id.decode()
                pending = await self.store.call(
                    self.client.xpending_range(stream, GROUP, entry, entry, 1)
                )
                deliveries = int(pending[0]["times_delivered"]) if pending else 1
                work = Work(fields[b"task_id"].decode(), stream, entry, deliveries, True)
                if deliveries > self.max_deliveries:
                    await self._dead_letter(work)
                else:
                    log.warning(
                        "took over task %s from a kernel that stopped renewing it (delivery %d)",
                        work.task_id,
                        deliveries,
                    )
                    works.append(work)
        return works

    async def _dead_letter(self, work: Work) -> None:
        reason = (
            f"delivered {work.deliveries} times (max_deliveries={self.max_deliveries}); every "
            "kernel that took it stopped before finishing it, so it was moved to the "
            "dead-letter stream"
        )
        log.error("task %s dead-lettered: %s", work.task_id, reason)
        # The task first: a crash between the two leaves its entry pending, to be moved by
        # whoever takes it next, never a task unfinished with no entry left to run it.
        await self._fail_unfinished(work.task_id, reason)
        fields = {
            "task_id": work.task_id,
            "stream": work.stream,
            "entry": work.entry_id,
            "deliveries": str(work.deliveries),
            "reason": reason,
        }
        await self.store.call(
            self._move_to_dead_letter(
                keys=[work.stream, self.dead_letter],
                args=[GROUP, work.entry_id, *itertools.chain.from_iterable(fields.items())],
            )
        )

    async def _fail_unfinished(self, task_id: str, reason: str) -> bool:
        """The task FAILED with `reason` (True), unless it is final or gone already. Any
        other refusal (Redis unreachable past its retries) is raised: the caller keeps the
        task's entry, so the task is never left unfinished with nothing to end it."""
        try:
            if not (await self.store.get(task_id)).finished:
                await self.store.transition(task_id, FAILED, error=reason)
                return True
        except LlmosError as error:
            if not finished_or_gone(error):
                raise
        return False

    async def _fail_dead_kernels_streams(self) -> None:
        """Fail the streamed tasks of kernels whose liveness key expired: their clients'
        streams died with them."""
        prefix = self.store.keys.prefix
        for raw in await self.store.call(self.client.smembers(self.attached_set)):
            stream = raw.decode()
            kernel = stream.removeprefix(f"{prefix}attached:")
            if stream == self.attached or await self.store.call(
                self.client.exists(f"{prefix}kernel:{kernel}")
            ):
                continue
            for _entry_id, fields in await self.store.call(self.client.xrange(stream)):
                await self._fail_unfinished(
                    fields[b"task_id"].decode(),
                    f"the kernel streaming it to its client ({kernel}) stopped; the client's "
                    "stream ended with it, so nobody can receive the rest",
                )
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(stream)
                pipe.srem(self.attached_set, stream)
                await self.store.call(pipe.execute())

    # -- finishing ----------------------------------------------------------------------

    async def done(self, task_id: str) -> None:
        """The task's final state is stored: acknowledge and delete its entry."""
        work = self.held.pop(task_id, None) or self.unfinished.pop(task_id, None)
        if work is not None:
            await self._remove(work)

    async def _remove(self, work: Work) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            if work.stream != self.attached:
                pipe.xack(work.stream, GROUP, work.entry_id)
            pipe.xdel(work.stream, work.entry_id)
            await self.store.call(pipe.execute())

    def abandon(self, task_id: str) -> None:
        """Stop holding a task this kernel could not start or end (the store refused the
        write), without acknowledging its entry: acknowledging would leave the task
        unfinished with nothing to run or end it. A queued task's entry is no longer
        renewed: it is taken over after `claim_idle_s` (by this kernel too) and the task
        run again. A streamed task cannot run again (its client's stream ended with the
        store's error): it is kept in `unfinished` and failed at the next renewal the
        store takes (`end_unfinished`)."""
        work = self.held.pop(task_id, None)
        if work is None:
            return
        if work.stream == self.attached:
            self.unfinished[task_id] = work
            log.warning(
                "streamed task %s left unfinished; it is failed once Redis takes it", task_id
            )
        else:
            log.warning("task %s left unfinished here; its entry is left to be taken over", task_id)

    async def end_unfinished(self) -> None:
        """Fail the streamed tasks this kernel let go unfinished and remove their entries
        (one already final or gone, cancelled meanwhile say, only loses its entry). Raises
        while Redis still refuses: those left are tried again at the next renewal."""
        for task_id, work in list(self.unfinished.items()):
            failed = await self._fail_unfinished(task_id, UNFINISHED_STREAM)
            await self._remove(work)
            self.unfinished.pop(task_id, None)  # `done` may have taken it meanwhile
            if failed:
                log.info("streamed task %s failed: %s", task_id, UNFINISHED_STREAM)

    async def release(self, task_id: str, priority: int) -> None:
        """Give a task this kernel will not finish back to every kernel (a planned stop):
        a fresh entry on its class's stream, and this kernel's entry removed, atomically;
        sent again after a lost reply, once (`RELEASE`)."""
        work = self.held.pop(task_id, None)
        stream = self.streams[Priority.from_proto(priority)]
        await self.store.call(
            self._release(
                keys=[stream, stream if work is None else work.stream],
                args=[
                    task_id,
                    "" if work is None else work.entry_id,
                    GROUP,
                    "0" if work is None or work.stream == self.attached else "1",
                ],
            )
        )

    # -- renewing and cancelling ----------------------------------------------------------

    async def renew(self) -> builtins.list[str]:
        """Reset the idle time of the entries this kernel holds and refresh its liveness
        key; the task ids whose entries another kernel took over meanwhile."""
        await self._announce()
        grouped = [w for w in self.held.values() if w.stream != self.attached]
        if not grouped:
            return []
        lost_ids = await self.store.call(
            self._refresh(
                keys=[w.stream for w in grouped],
                args=[GROUP, self.kernel_id, *(w.entry_id for w in grouped)],
            )
        )
        lost = {entry.decode() for entry in lost_ids}
        taken = [w.task_id for w in grouped if w.entry_id in lost]
        for task_id in taken:
            self.held.pop(task_id, None)
        return taken

    async def _renew_forever(self) -> None:
        while not await self._stopped_within(self.claim_idle_s / 3):
            try:
                for task_id in await self.renew():
                    log.warning("task %s was taken over by another kernel; stopping it", task_id)
                    self.lost.put_nowait(task_id)
            except LlmosError as error:  # Redis down for longer than the retries: try again
                log.warning("could not renew this kernel's queue entries: %s", error.message)
            try:
                await self.end_unfinished()
            except LlmosError as error:
                log.warning(
                    "could not end this kernel's unfinished streamed tasks: %s", error.message
                )

    async def publish_cancel(self, task_id: str) -> None:
        await self.store.call(self.client.publish(self.cancel_channel, task_id))

    async def _stopped_within(self, seconds: float) -> bool:
        """Wait up to `seconds`; True once `close` was called."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    async def _listen_for_cancels(self) -> None:
        while not self._stopping.is_set():
            try:
                pubsub = self.client.pubsub()
                await pubsub.subscribe(self.cancel_channel)
                try:
                    while not self._stopping.is_set():
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=0.5
                        )
                        if message is not None and message.get("type") == "message":
                            self.cancels.put_nowait(message["data"].decode())
                finally:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                log.warning("cancel channel lost (%s); resubscribing", exc)
                await self._stopped_within(0.5)


async def stop_loops(
    tasks: builtins.list[asyncio.Task[None]], grace_s: float = BLOCK_S + 2
) -> None:
    """Wait for loops told to stop to finish; cancel the ones that do not within `grace_s`."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=grace_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
