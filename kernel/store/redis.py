"""The shared task store: task records, event logs and traces in Redis, for several kernels.

Why it is built this way:

- **Every change is one server-side script.** A state change and its "state" event, a text
  event and the output it extends, a new task and its index entries (and, through
  `kernel.store.work_queue`, its queue entry) are written by one Lua script, which Redis runs
  atomically: no reader sees half a change and no crash leaves one.
- **State rules in Python, applied by compare-and-set.** The transition table and its
  messages live in `contract.py`, shared with SQLite. `transition` reads the record, checks
  the move there, then asks the script to apply it only if the state is still the one it
  read; if another kernel moved the task meanwhile, it reads again and re-checks. So two
  kernels completing the same task store one result, and the repeat is the contract's no-op.
- **Output is appended, not rewritten.** `APPEND` to a per-task string is amortised O(1) per
  streamed chunk; a re-queue deletes it, so `output` is the current attempt's text.
- **Indexes are sorted sets scored by `created_at`.** Members with equal scores sort by task
  id, so `ZREVRANGEBYSCORE` gives exactly the contract's newest-first order (created_at,
  then task_id, descending) and a page token is a position, as in SQLite.
- **Reconnects are the client's job.** The connection pool retries a command that failed on
  a dropped connection with exponential backoff for about `redis_retry_s` (10 s), so a Redis
  restart under load costs latency, not tasks. Past that, the error is
  Unavailable(STORE_UNAVAILABLE); any other Redis error is LlmosError(STORE_ERROR).
- **One key prefix per deployment** (`redis_prefix`), so several stacks (or test runs) can
  share a server. Keys are not hash-tagged: this backend wants one Redis (with a replica),
  not Redis Cluster.

- **Sealed at rest.** A task's request and error (hash fields), every event's text, the
  output string and the trace steps are stored sealed (kernel/store/sealing.py): the server
  and its AOF/RDB files hold ciphertext. An event is its JSON header, a NUL, and its sealed
  text; the output string is a run of frames (4-byte big-endian length, sealed chunk), one
  per `APPEND`. `rewrap` walks the tasks with SCAN and rewrites values only if they are
  still what it read (a server-side compare-and-set), so it never races a running task.

Durability is the server's: the project's Redis configuration (deploy/redis/redis.conf)
turns on the append-only file with `appendfsync everysec`, the same promise as the SQLite
backend's synchronous=NORMAL.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import secrets
import struct
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from llmos.kernel.scheduler import Priority
from llmos.kernel.store.contract import (
    DEFAULT_PAGE_SIZE,
    FAILED,
    FINAL_STATES,
    MAX_EVENTS_PER_READ,
    MAX_EXPIRE_BATCH,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    EventKind,
    Expiry,
    FinishReason,
    RecoveryReport,
    RewrapReport,
    TaskEvent,
    TaskRecord,
    TaskState,
    TaskStore,
    briefly,
    check_attempt,
    check_event_range,
    check_expire_limit,
    check_max_attempts,
    check_new_record,
    check_page_size,
    check_takes_text,
    check_transition,
    decode_page_token,
    encode_page_token,
    finish_reason_for,
    recovery_error,
    unstored_text,
)
from llmos.kernel.store.sealing import ERROR, EVENT, OUTPUT, REQUEST, TRACE, Sealer, usage_key
from llmos.services.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LlmosError,
    NotFound,
    Unavailable,
)
from llmos.services.keyring import KeyRing
from llmos.v1 import common_pb2

# How long a command that failed on a broken connection is retried by default (the setting
# `redis_retry_s`): longer than a Redis restart takes. The waits between tries start at
# 0.1 s and double up to 1 s (redis-py's ExponentialBackoff, `failures` counted from 1).
RETRY_BUDGET_S = 10.0
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 1.0
# Connections one kernel holds to Redis at most; more commands in flight wait their turn.
POOL_CONNECTIONS = 64
POOL_WAIT_S = 10.0
# How many index entries `list` fetches per round trip while filtering.
LIST_CHUNK = 200
# How many times `transition` re-reads a task that another kernel changed under it.
MAX_CAS_ROUNDS = 20

# The task hash's `output_chars` counts the characters of the attempt's output (a re-queue
# sets it to 0): a text write that says where it starts (`at`) is applied only if the count
# is still that, and otherwise answers the count, so the caller drops what is stored already
# (`unstored_text`). A script whose reply was lost, sent again, is so applied once. No
# output string means no output, whatever the count says: a kernel of an older version,
# sharing the server during an upgrade, re-queues without resetting the count.
OUTPUT_CHARS = """
local function output_chars(task, output)
  if redis.call('EXISTS', output) == 0 then return 0 end
  return tonumber(redis.call('HGET', task, 'output_chars') or '0')
end
"""

# KEYS: task hash, events list, output string, old state index, new state index, trace list.
# ARGV: expected state, event, reset output ("1"/"0"), score, task id, text event ("" for
# none), text, text's start ("" for unchecked), text's length in characters, the writer's
# attempt ("" for unchecked), the write's token, trace step count n, n trace steps,
# field/value pairs... The text (the attempt's last output) is logged before the state
# event, the trace steps after it. Returns {the state event's offset}, or {-1} when the state
# is no longer the expected one, or {-3, count} when the output's count is not the text's
# start, or {-4, attempts} when the task's attempt is not the writer's, or {-5} when the
# task's last transition carried this write's token: this very call ran already and its
# reply was lost (nothing is written but for {offset}). Without the token a start sent
# again found its own RUNNING and was refused as a move out of RUNNING.
TRANSITION = (
    OUTPUT_CHARS
    + """
if redis.call('HGET', KEYS[1], 'write') == ARGV[11] then return {-5} end
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[1] then return {-1} end
if ARGV[10] ~= '' and redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[10] then
  return {-4, redis.call('HGET', KEYS[1], 'attempts')}
end
if ARGV[6] ~= '' then
  local stored = output_chars(KEYS[1], KEYS[3])
  if ARGV[8] ~= '' and stored ~= tonumber(ARGV[8]) then return {-3, stored} end
  redis.call('RPUSH', KEYS[2], ARGV[6])
  redis.call('APPEND', KEYS[3], ARGV[7])
  redis.call('HSET', KEYS[1], 'output_chars', stored + tonumber(ARGV[9]))
end
local offset = redis.call('RPUSH', KEYS[2], ARGV[2]) - 1
if ARGV[3] == '1' then redis.call('DEL', KEYS[3]) end
local steps = tonumber(ARGV[12])
if steps > 0 then redis.call('RPUSH', KEYS[6], unpack(ARGV, 13, 12 + steps)) end
redis.call('HSET', KEYS[1], 'write', ARGV[11], unpack(ARGV, 13 + steps))
if KEYS[4] ~= KEYS[5] then
  redis.call('ZREM', KEYS[4], ARGV[5])
  redis.call('ZADD', KEYS[5], ARGV[4], ARGV[5])
end
return {offset}
"""
)

# KEYS: task hash, events list, output string. ARGV: event, text, now, running state,
# text's start ("" for unchecked), text's length in characters, the writer's attempt (""
# for unchecked). Returns {offset} or {-1} (no such task) or {-4, attempts} (not the
# writer's attempt) or {-2, state} (not running) or {-3, count, the latest event's offset}
# (the output's count is not the text's start); nothing is written but for {offset}.
APPEND_TEXT = (
    OUTPUT_CHARS
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1} end
local attempts = redis.call('HGET', KEYS[1], 'attempts')
if ARGV[7] ~= '' and attempts ~= ARGV[7] then return {-4, attempts} end
if state ~= ARGV[4] then return {-2, state} end
local stored = output_chars(KEYS[1], KEYS[3])
if ARGV[5] ~= '' and stored ~= tonumber(ARGV[5]) then
  return {-3, stored, redis.call('LLEN', KEYS[2]) - 1}
end
local offset = redis.call('RPUSH', KEYS[2], ARGV[1]) - 1
redis.call('APPEND', KEYS[3], ARGV[2])
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3], 'output_chars', stored + tonumber(ARGV[6]))
return {offset}
"""
)

# KEYS: task hash, trace list. ARGV: sealed step. Returns 0 when there is no such task.
# A step is sealed with a fresh nonce, so the trace's last element equal to it is this very
# call, run once already: its reply was lost and the client sent it again.
ADD_TRACE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('LINDEX', KEYS[2], -1) ~= ARGV[1] then redis.call('RPUSH', KEYS[2], ARGV[1]) end
return 1
"""

# KEYS: task hash, its subjects set. ARGV: prefix, task id, hex tokens... Returns 0 when
# there is no such task (then nothing is written: no index outlives its task).
ADD_SUBJECTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 3, #ARGV do
  redis.call('SADD', KEYS[2], ARGV[i])
  redis.call('SADD', ARGV[1] .. 'subject:' .. ARGV[i], ARGV[2])
end
return 1
"""

# ARGV: prefix, state count n, the n states, task ids... Deletes each task's keys, its
# entries in every index and its subject index, atomically; returns how many existed.
# Key names are built here from the prefix (this backend is for one Redis, not a cluster):
# the subject sets to clean are known only once the task's own set is read.
DELETE_TASKS = """
local prefix = ARGV[1]
local n = tonumber(ARGV[2])
local deleted = 0
for i = 3 + n, #ARGV do
  local id = ARGV[i]
  local task = prefix .. 'task:' .. id
  local tenant = redis.call('HGET', task, 'tenant')
  if tenant then
    deleted = deleted + 1
    redis.call('ZREM', prefix .. 'idx:tenant:' .. tenant, id)
  end
  redis.call('ZREM', prefix .. 'idx:all', id)
  for s = 3, 2 + n do redis.call('ZREM', prefix .. 'idx:state:' .. ARGV[s], id) end
  local subjects = prefix .. 'subjects:' .. id
  for _, token in ipairs(redis.call('SMEMBERS', subjects)) do
    redis.call('SREM', prefix .. 'subject:' .. token, id)
  end
  redis.call('DEL', task, prefix .. 'events:' .. id, prefix .. 'output:' .. id,
    prefix .. 'trace:' .. id, subjects)
end
return deleted
"""
# How many task ids one DELETE_TASKS call takes (a script blocks the server while it runs).
DELETE_CHUNK = 100
# Stream entries read per XRANGE while looking for a forgotten task's queue entries.
STREAM_CHUNK = 1000


# Compare-and-set of re-wrapped values. KEYS: one key per change. ARGV: per change, its kind
# ("h" hash field, "l" list element, "s" string), field name or list index, the value read,
# the value to write. A value that changed since it was read is left alone. Returns a 1
# (written) or 0 (left alone) per change.
REWRAP = """
local done = {}
for i = 1, #KEYS do
  done[i] = 0
  local kind, where, old, new = ARGV[4*i-3], ARGV[4*i-2], ARGV[4*i-1], ARGV[4*i]
  if kind == 'h' then
    if redis.call('HGET', KEYS[i], where) == old then
      redis.call('HSET', KEYS[i], where, new)
      done[i] = 1
    end
  elseif kind == 'l' then
    if redis.call('LINDEX', KEYS[i], tonumber(where)) == old then
      redis.call('LSET', KEYS[i], tonumber(where), new)
      done[i] = 1
    end
  elseif redis.call('GET', KEYS[i]) == old then
    redis.call('SET', KEYS[i], new, 'KEEPTTL')
    done[i] = 1
  end
end
return done
"""
FRAME = struct.Struct(">I")


@dataclasses.dataclass(frozen=True)
class Keys:
    """Every key this backend uses, under one prefix."""

    prefix: str

    def task(self, task_id: str) -> str:
        return f"{self.prefix}task:{task_id}"

    def events(self, task_id: str) -> str:
        return f"{self.prefix}events:{task_id}"

    def output(self, task_id: str) -> str:
        return f"{self.prefix}output:{task_id}"

    def trace(self, task_id: str) -> str:
        return f"{self.prefix}trace:{task_id}"

    def all_tasks(self) -> str:
        return f"{self.prefix}idx:all"

    def by_tenant(self, tenant: str) -> str:
        return f"{self.prefix}idx:tenant:{tenant}"

    def by_state(self, state: int) -> str:
        return f"{self.prefix}idx:state:{int(state)}"

    def subjects(self, task_id: str) -> str:
        """The blind-index tokens (hex) of the task's data subjects."""
        return f"{self.prefix}subjects:{task_id}"

    def subject(self, token: bytes) -> str:
        """The tasks indexed under one blind-index token."""
        return f"{self.prefix}subject:{token.hex()}"

    def per_task(self, task_id: str) -> tuple[str, str, str, str]:
        return (self.task(task_id), self.events(task_id), self.output(task_id), self.trace(task_id))


def new_task_script(enqueue: bool) -> str:
    """The script that stores a new task: record, first event, indexes, and (when `enqueue`)
    its entry on a work stream, all at once, so a crash can neither leave an accepted task
    off the queue nor queue a task that has no record.

    KEYS: task hash, events list, all index, tenant index, state index[, stream].
    ARGV: event, score, task id[, stream field count n, n field/value pairs], fields...
    Returns 0 when the id exists, else 1 (or the stream entry id when enqueuing).

    The same call run twice (its reply was lost and the client sent it again) answers as
    the first time, not 0: its `create` field, a random token per call
    (`RedisTaskStore.record_fields`), is the one stored. The entry id is kept in the hash
    (`entry`) for that answer.
    """
    first = "5 + 2 * tonumber(ARGV[4])" if enqueue else "4"
    enqueue_lines = (
        """
local entry = redis.call('XADD', KEYS[6], '*', unpack(ARGV, 5, first - 1))
redis.call('HSET', KEYS[1], 'entry', entry)
"""
        if enqueue
        else ""
    )
    return (
        f"local first = {first}\n"
        + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  for i = first, #ARGV - 1, 2 do
    if ARGV[i] == 'create' then
      if redis.call('HGET', KEYS[1], 'create') ~= ARGV[i + 1] then return 0 end
      return redis.call('HGET', KEYS[1], 'entry') or 1
    end
  end
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, first))
"""
        + enqueue_lines
        + """
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[3])
"""
        + ("return entry\n" if enqueue else "return 1\n")
    )


def encode_event(
    sealer: Sealer,
    task_id: str,
    kind: EventKind,
    state: TaskState,
    *,
    text: str,
    finish_reason: FinishReason,
) -> bytes:
    """An event as stored: its JSON header, a NUL, its sealed text."""
    header = json.dumps([kind, int(state), int(finish_reason)], separators=(",", ":")).encode()
    return header + b"\x00" + sealer.seal_text(task_id, EVENT, text)


def split_event(raw: bytes) -> tuple[bytes, bytes]:
    """(header, sealed text) of a stored event."""
    header, _, sealed = bytes(raw).partition(b"\x00")
    return header, sealed


def decode_event(sealer: Sealer, task_id: str, offset: int, raw: bytes) -> TaskEvent:
    header, sealed = split_event(raw)
    kind, state, finish_reason = json.loads(header)
    return TaskEvent(
        offset=offset,
        kind="text" if kind == "text" else "state",
        state=common_pb2.TaskState.ValueType(state),
        text=sealer.open_text(task_id, EVENT, sealed),
        finish_reason=common_pb2.FinishReason.ValueType(finish_reason),
    )


def output_frame(sealer: Sealer, task_id: str, text: str) -> bytes:
    """One `APPEND` to the output string: the chunk sealed, behind its length."""
    sealed = sealer.seal_text(task_id, OUTPUT, text)
    return FRAME.pack(len(sealed)) + sealed if sealed else b""


def output_frames(raw: bytes | None) -> builtins.list[bytes]:
    """The sealed chunks of an output string, in order."""
    data, frames, at = bytes(raw or b""), [], 0
    while at + FRAME.size <= len(data):
        (size,) = FRAME.unpack_from(data, at)
        frames.append(data[at + FRAME.size : at + FRAME.size + size])
        at += FRAME.size + size
    if at != len(data):
        frames.append(data[at:])  # a torn frame: opening it fails, as it should
    return frames


def record_fields(sealer: Sealer, record: TaskRecord) -> dict[str, bytes | str]:
    """The hash fields of a record, sealed (output lives in its own key)."""
    return {
        "task_id": record.task_id,
        "tenant": record.tenant,
        "state": str(int(record.state)),
        "model": record.model,
        "priority": str(int(record.priority)),
        "request": sealer.seal(record.task_id, REQUEST, record.request),
        "created_at": repr(record.created_at),
        "updated_at": repr(record.updated_at),
        "finished_at": "" if record.finished_at is None else repr(record.finished_at),
        "finish_reason": str(int(record.finish_reason)),
        "usage": record.usage,
        "error": sealer.seal_text(record.task_id, ERROR, record.error),
        "attempts": str(record.attempts),
    }


def parse_record(sealer: Sealer, raw: Mapping[bytes, bytes], output: bytes | None) -> TaskRecord:
    def text(name: str) -> str:
        return raw[name.encode()].decode()

    finished = text("finished_at")
    task_id = text("task_id")
    return TaskRecord(
        task_id=task_id,
        tenant=text("tenant"),
        state=common_pb2.TaskState.ValueType(int(text("state"))),
        model=text("model"),
        priority=common_pb2.Priority.ValueType(int(text("priority"))),
        request=sealer.open(task_id, REQUEST, raw[b"request"]),
        created_at=float(text("created_at")),
        updated_at=float(text("updated_at")),
        finished_at=float(finished) if finished else None,
        finish_reason=common_pb2.FinishReason.ValueType(int(text("finish_reason"))),
        usage=raw[b"usage"],
        output="".join(sealer.open_text(task_id, OUTPUT, frame) for frame in output_frames(output)),
        error=sealer.open_text(task_id, ERROR, raw[b"error"]),
        attempts=int(text("attempts")),
    )


def flatten(fields: Mapping[str, bytes | str]) -> builtins.list[bytes | str]:
    return [item for pair in fields.items() for item in pair]


def not_found(task_id: str) -> NotFound:
    return NotFound(
        f"no task {task_id!r}: it was never submitted here, or its tenant was forgotten",
        reason="TASK_NOT_FOUND",
        metadata={"task_id": task_id},
    )


def contended(task_id: str) -> Unavailable:
    return Unavailable(
        f"task {task_id} kept changing under this kernel ({MAX_CAS_ROUNDS} tries); retry",
        reason="STORE_CONTENDED",
    )


class _OutputMoved(Exception):
    """A text write met an output whose count is not where the text starts: `count` is it."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


def retries_within(budget_s: float) -> int:
    """How many retries fit in `budget_s` seconds of backoff waits (0 for none)."""
    if budget_s < 0:
        raise InvalidArgument(
            f"redis_retry_s is {budget_s}; use 0 (no retries) or more seconds",
            reason="BAD_SETTING",
        )
    backoff = _backoff()
    retries, waited = 0, 0.0
    while (wait := backoff.compute(retries + 1)) + waited <= budget_s:
        waited += wait
        retries += 1
    return retries


def _backoff() -> ExponentialBackoff:
    return ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S)


def connect(url: str, retry_s: float = RETRY_BUDGET_S) -> aioredis.Redis:
    """A client that retries commands across a dropped connection for about `retry_s`
    seconds (see the module doc).

    Its pool makes a command wait for a free connection when `POOL_CONNECTIONS` are busy
    (up to `POOL_WAIT_S`): redis-py's default pool fails the 101st concurrent command at
    once with "Too many connections", which 200 tasks submitted together reached."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=POOL_CONNECTIONS,
        timeout=POOL_WAIT_S,
        retry=Retry(_backoff(), retries_within(retry_s)),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        health_check_interval=10,
        socket_connect_timeout=2.0,
    )
    return aioredis.Redis.from_pool(pool)


class RedisTaskStore(TaskStore):
    """The `TaskStore` contract on a Redis server; create it with `await RedisTaskStore.open`."""

    def __init__(
        self,
        client: aioredis.Redis,
        url: str,
        prefix: str,
        clock: Callable[[], float],
        keys: KeyRing,
    ):
        """Use `open`, which checks the server is reachable."""
        self.client = client
        self.sealer = Sealer(keys)
        self.url = url
        self.keys = Keys(prefix)
        self._clock = clock
        self._closed = False
        self._transition = client.register_script(TRANSITION)
        self._append_text = client.register_script(APPEND_TEXT)
        self._add_trace = client.register_script(ADD_TRACE)
        self._create = client.register_script(new_task_script(enqueue=False))
        self.create_and_enqueue = client.register_script(new_task_script(enqueue=True))
        self._add_subjects = client.register_script(ADD_SUBJECTS)
        self._delete_tasks = client.register_script(DELETE_TASKS)
        self._rewrap = client.register_script(REWRAP)

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        keys: KeyRing,
        prefix: str = "llmos:",
        clock: Callable[[], float] | None = None,
        retry_s: float = RETRY_BUDGET_S,
    ) -> RedisTaskStore:
        """Connect to `url` (redis://host:port/db) and check it answers; `keys` seal and
        open the text fields (kernel/store/sealing.py); a command is retried across a
        dropped connection for about `retry_s` seconds.

        Unavailable(STORE_UNAVAILABLE) when it does not, naming the address, so a kernel
        configured for Redis refuses to start rather than accept tasks it cannot keep.
        """
        client = connect(url, retry_s)
        store = cls(client, url, prefix, clock or time.time, keys)
        try:
            await store.call(client.ping())
        except BaseException:
            await client.aclose()
            raise
        return store

    async def call(self, operation: Awaitable[Any]) -> Any:
        """Await a Redis operation, translating its failures into the project's errors.

        Returns Any: redis-py types replies as unions of every shape a command can answer
        (bytes | str | list ...), so each caller narrows what it knows its command returns.
        """
        if self._closed:
            if hasattr(operation, "close"):
                operation.close()  # a coroutine never awaited would warn
            raise FailedPrecondition(
                f"the task store at {self.where} is closed", reason="STORE_CLOSED"
            )
        try:
            return await operation
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise Unavailable(
                f"the task store at {self.where} is unreachable: {exc}", reason="STORE_UNAVAILABLE"
            ) from exc
        except redis.exceptions.RedisError as exc:
            raise LlmosError(
                f"the task store at {self.where} failed: {exc}", reason="STORE_ERROR"
            ) from exc

    @property
    def where(self) -> str:
        """The server, without credentials, for messages."""
        kwargs = self.client.connection_pool.connection_kwargs
        return f"redis {kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"

    def new_task_args(self, record: TaskRecord) -> tuple[builtins.list[str], builtins.list[Any]]:
        """KEYS and the leading ARGV of the new-task script for `record`."""
        check_new_record(record)
        keys = [
            self.keys.task(record.task_id),
            self.keys.events(record.task_id),
            self.keys.all_tasks(),
            self.keys.by_tenant(record.tenant),
            self.keys.by_state(record.state),
        ]
        event = encode_event(
            self.sealer,
            record.task_id,
            "state",
            record.state,
            text="",
            finish_reason=common_pb2.FINISH_REASON_UNSPECIFIED,
        )
        return keys, [event, repr(record.created_at), record.task_id]

    def record_fields(self, record: TaskRecord) -> dict[str, bytes | str]:
        """The hash fields of a new record, sealed, and the token that tells the new-task
        script its own call sent twice from another create of the id (`new_task_script`)."""
        return {**record_fields(self.sealer, record), "create": secrets.token_hex(8)}

    def duplicate(self, task_id: str) -> AlreadyExists:
        return AlreadyExists(
            f"task {task_id!r} already exists",
            reason="DUPLICATE_TASK",
            metadata={"task_id": task_id},
        )

    async def create(self, record: TaskRecord, *, running: bool = False) -> None:
        keys, args = self.new_task_args(record)
        created = await self.call(
            self._create(keys=keys, args=[*args, *flatten(self.record_fields(record))])
        )
        if not created:
            raise self.duplicate(record.task_id)
        if running:  # a second step (see the contract): a crash between leaves it QUEUED
            await self._apply(
                record,
                RUNNING,
                finish_reason=common_pb2.FINISH_REASON_UNSPECIFIED,
                usage=None,
                error=None,
                interrupted=False,
            )

    async def _read(self, task_id: str) -> TaskRecord:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.keys.task(task_id))
            pipe.get(self.keys.output(task_id))
            raw, output = await self.call(pipe.execute())
        if not raw:
            raise not_found(task_id)
        return parse_record(self.sealer, raw, output)

    async def get(self, task_id: str) -> TaskRecord:
        return await self._read(task_id)

    async def transition(
        self,
        task_id: str,
        to_state: TaskState,
        *,
        finish_reason: FinishReason | None = None,
        usage: bytes | None = None,
        error: str | None = None,
        text: str = "",
        text_at: int | None = None,
        trace: Sequence[bytes] = (),
        brief: bool = False,
        follows_create: bool = False,  # not `joins_creates`: the kernel waits for creates
        attempt: int | None = None,
    ) -> TaskRecord:
        for _ in range(MAX_CAS_ROUNDS):
            record = await self._read(task_id)
            check_attempt(task_id, record.attempts, attempt)  # the script checks it again
            if not check_transition(task_id, record.state, to_state):
                return briefly(record) if brief else record
            reason = finish_reason_for(task_id, to_state, finish_reason)
            if text:
                check_takes_text(task_id, record.state)
            try:
                applied = await self._apply(
                    record,
                    to_state,
                    finish_reason=reason,
                    usage=usage,
                    error=error,
                    interrupted=record.state == RUNNING and to_state == QUEUED,
                    text=text,
                    text_at=text_at,
                    trace=trace,
                    attempt=attempt,
                )
            except _OutputMoved as moved:  # part of the text is stored already: the rest
                text, text_at = unstored_text(task_id, text, text_at, moved.count), moved.count
                continue
            if applied is not None:
                return briefly(applied) if brief else applied
        raise contended(task_id)

    async def _apply(
        self,
        record: TaskRecord,
        to_state: TaskState,
        *,
        finish_reason: FinishReason,
        usage: bytes | None,
        error: str | None,
        interrupted: bool,
        text: str = "",
        text_at: int | None = None,
        trace: Sequence[bytes] = (),
        attempt: int | None = None,
    ) -> TaskRecord | None:
        """Write a checked transition (with the attempt's last `text` and `trace` steps, see
        `TaskStore.transition`) if the task is still in `record.state`; the new record, or
        None when another writer moved it first (the caller reads again). _OutputMoved when
        the output's count is not `text_at`, ATTEMPT_OVER when the task's attempt is not
        `attempt` (nothing written)."""
        now = self._clock()
        updated = dataclasses.replace(
            record,
            state=to_state,
            updated_at=now,
            finished_at=now if to_state in FINAL_STATES else None,
            finish_reason=finish_reason,
            usage=record.usage if usage is None else usage,
            error=error if error is not None else ("" if to_state == SUCCEEDED else record.error),
            attempts=record.attempts + 1 if interrupted else record.attempts,
            output="" if to_state == QUEUED else record.output + text,
        )
        task_id = record.task_id
        sealer = self.sealer
        text_event = (
            encode_event(
                sealer,
                task_id,
                "text",
                record.state,
                text=text,
                finish_reason=common_pb2.FINISH_REASON_UNSPECIFIED,
            )
            if text
            else b""
        )
        # Only what changed is written: the request stays as it was sealed.
        fields: dict[str, bytes | str] = {
            "state": str(int(updated.state)),
            "updated_at": repr(updated.updated_at),
            "finished_at": "" if updated.finished_at is None else repr(updated.finished_at),
            "finish_reason": str(int(updated.finish_reason)),
            "usage": updated.usage,
            "attempts": str(updated.attempts),
        }
        if updated.error != record.error:
            fields["error"] = sealer.seal_text(task_id, ERROR, updated.error)
        if to_state == QUEUED:  # a new attempt: its output starts empty
            fields["output_chars"] = "0"
        result = await self.call(
            self._transition(
                keys=[
                    self.keys.task(task_id),
                    self.keys.events(task_id),
                    self.keys.output(task_id),
                    self.keys.by_state(record.state),
                    self.keys.by_state(to_state),
                    self.keys.trace(task_id),
                ],
                args=[
                    str(int(record.state)),
                    encode_event(
                        sealer,
                        task_id,
                        "state",
                        to_state,
                        text=error or "",
                        finish_reason=finish_reason,
                    ),
                    "1" if to_state == QUEUED else "0",
                    repr(record.created_at),
                    task_id,
                    text_event,
                    output_frame(sealer, task_id, text),
                    "" if text_at is None else str(text_at),
                    str(len(text)),
                    "" if attempt is None else str(attempt),
                    secrets.token_hex(8),
                    str(len(trace)),
                    *(sealer.seal(task_id, TRACE, step) for step in trace),
                    *flatten(fields),
                ],
            )
        )
        code = int(result[0])
        if code == -3:
            raise _OutputMoved(int(result[1]))
        if code == -4:
            check_attempt(task_id, int(result[1]), attempt)
        return None if code in (-1, -4) else updated

    async def append_text(
        self, task_id: str, text: str, *, at: int | None = None, attempt: int | None = None
    ) -> int:
        for _ in range(MAX_CAS_ROUNDS):
            result = await self.call(
                self._append_text(
                    keys=[
                        self.keys.task(task_id),
                        self.keys.events(task_id),
                        self.keys.output(task_id),
                    ],
                    args=[
                        encode_event(
                            self.sealer,
                            task_id,
                            "text",
                            RUNNING,
                            text=text,
                            finish_reason=common_pb2.FINISH_REASON_UNSPECIFIED,
                        ),
                        output_frame(self.sealer, task_id, text),
                        repr(self._clock()),
                        str(int(RUNNING)),
                        "" if at is None else str(at),
                        str(len(text)),
                        "" if attempt is None else str(attempt),
                    ],
                )
            )
            code = int(result[0])
            if code == -1:
                raise not_found(task_id)
            if code == -2:
                check_takes_text(task_id, common_pb2.TaskState.ValueType(int(result[1])))
            if code == -4:
                check_attempt(task_id, int(result[1]), attempt)
            if code != -3:
                return code
            count = int(result[1])  # part of the text is stored already: the rest
            text, at = unstored_text(task_id, text, at, count), count
            if not text:
                return int(result[2])
        raise contended(task_id)

    async def events(
        self, task_id: str, offset: int = 0, limit: int = MAX_EVENTS_PER_READ
    ) -> builtins.list[TaskEvent]:
        check_event_range(offset, limit)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.exists(self.keys.task(task_id))
            pipe.lrange(self.keys.events(task_id), offset, offset + limit - 1)
            exists, raws = await self.call(pipe.execute())
        if not exists:
            raise not_found(task_id)
        return [decode_event(self.sealer, task_id, offset + i, raw) for i, raw in enumerate(raws)]

    async def add_trace_step(self, task_id: str, step: bytes) -> None:
        added = await self.call(
            self._add_trace(
                keys=[self.keys.task(task_id), self.keys.trace(task_id)],
                args=[self.sealer.seal(task_id, TRACE, step)],
            )
        )
        if not added:
            raise not_found(task_id)

    async def trace(self, task_id: str) -> builtins.list[bytes]:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.exists(self.keys.task(task_id))
            pipe.lrange(self.keys.trace(task_id), 0, -1)
            exists, steps = await self.call(pipe.execute())
        if not exists:
            raise not_found(task_id)
        return [self.sealer.open(task_id, TRACE, step) for step in steps]

    async def list(
        self,
        tenant: str | None = None,
        state: TaskState | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> tuple[builtins.list[TaskRecord], str]:
        check_page_size(page_size)
        after = decode_page_token(page_token) if page_token else None
        # Walk the narrowest index; the other filter is checked per candidate.
        if state is not None:
            index = self.keys.by_state(state)
        elif tenant is not None:
            index = self.keys.by_tenant(tenant)
        else:
            index = self.keys.all_tasks()
        ceiling: float | str = "+inf" if after is None else after[0]
        wanted: builtins.list[str] = []
        skip = 0
        while len(wanted) <= page_size:
            chunk = await self.call(
                self.client.zrevrangebyscore(
                    index, ceiling, "-inf", start=skip, num=LIST_CHUNK, withscores=True
                )
            )
            if not chunk:
                break
            skip += len(chunk)
            candidates = [
                member.decode()
                for member, score in chunk
                if after is None or (score, member.decode()) < after
            ]
            if tenant is not None and state is not None:
                candidates = await self._of_tenant(candidates, tenant)
            wanted.extend(candidates)
        page_ids = wanted[:page_size]
        records = await self._read_many(page_ids)
        more = len(wanted) > page_size
        token = encode_page_token(records[-1].created_at, records[-1].task_id) if more else ""
        return records, token

    async def _of_tenant(self, task_ids: builtins.list[str], tenant: str) -> builtins.list[str]:
        async with self.client.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hget(self.keys.task(task_id), "tenant")
            tenants = await self.call(pipe.execute())
        return [t for t, owner in zip(task_ids, tenants, strict=True) if owner == tenant.encode()]

    async def _read_many(self, task_ids: builtins.list[str]) -> builtins.list[TaskRecord]:
        async with self.client.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hgetall(self.keys.task(task_id))
                pipe.get(self.keys.output(task_id))
            replies = await self.call(pipe.execute())
        return [
            parse_record(self.sealer, raw, output)
            for raw, output in zip(replies[0::2], replies[1::2], strict=True)
            if raw  # forgotten between the index read and now
        ]

    async def recover(self, requeue_running: bool = True, max_attempts: int = 3) -> RecoveryReport:
        """The contract's cold-start recovery, for a deployment with one kernel on this Redis.

        Several kernels sharing the store never call it (a live kernel's RUNNING tasks are
        not interrupted): they take over a dead kernel's work through the work queue's
        XAUTOCLAIM instead (`kernel.store.work_queue`).
        """
        check_max_attempts(max_attempts)
        requeued: builtins.list[str] = []
        failed: builtins.list[str] = []
        running = await self.call(self.client.zrange(self.keys.by_state(RUNNING), 0, -1))
        for member in running:
            record = await self._read(member.decode())
            if record.state != RUNNING:
                continue
            again, reason = recovery_error(record.attempts + 1, max_attempts, requeue_running)
            to_state = QUEUED if again else FAILED
            applied = await self._apply(
                record,
                to_state,
                finish_reason=finish_reason_for(record.task_id, to_state, None),
                usage=None,
                error=reason,
                interrupted=True,
            )
            if applied is not None:
                (requeued if again else failed).append(record.task_id)
        queued = await self.call(self.client.zrange(self.keys.by_state(QUEUED), 0, -1))
        return RecoveryReport(
            queued=tuple(member.decode() for member in queued),
            requeued=tuple(requeued),
            failed=tuple(failed),
        )

    async def forget_tenant(self, tenant: str) -> int:
        index = self.keys.by_tenant(tenant)
        members = [m.decode() for m in await self.call(self.client.zrange(index, 0, -1))]
        deleted = await self.delete(members)
        await self.call(self.client.delete(index))  # emptied by now; an index left stale
        return deleted

    async def add_subjects(self, task_id: str, tokens: Sequence[bytes]) -> None:
        added = await self.call(
            self._add_subjects(
                keys=[self.keys.task(task_id), self.keys.subjects(task_id)],
                args=[self.keys.prefix, task_id, *(bytes(t).hex() for t in tokens)],
            )
        )
        if not added:
            raise not_found(task_id)

    async def find_subject(self, tenant: str, tokens: Sequence[bytes]) -> builtins.list[str]:
        if not tokens:
            return []
        found = await self.call(
            self.client.sunion([self.keys.subject(bytes(token)) for token in tokens])
        )
        candidates = sorted(member.decode() for member in found)
        return await self._of_tenant(candidates, tenant) if candidates else []

    async def delete(self, task_ids: Sequence[str]) -> int:
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return 0
        deleted = await self._delete_keys(ids)
        await self._purge_streams(set(ids))
        return deleted

    async def _delete_keys(self, ids: builtins.list[str]) -> int:
        """Delete the tasks' keys, index entries and subject index (not their queue-stream
        entries: `delete` does that too)."""
        states = [str(int(state)) for state in common_pb2.TaskState.values()]
        deleted = 0
        for start in range(0, len(ids), DELETE_CHUNK):
            chunk = ids[start : start + DELETE_CHUNK]
            deleted += int(
                await self.call(
                    self._delete_tasks(args=[self.keys.prefix, str(len(states)), *states, *chunk])
                )
            )
        return deleted

    async def _purge_streams(self, task_ids: set[str]) -> None:
        """Remove the queue-stream entries naming these tasks (a queued task's entry holds
        its record, prompt included; the dead-letter stream names its id): acknowledged in
        the consumer group, then deleted."""
        prefix = self.keys.prefix
        grouped_streams = [f"{prefix}queue:{priority.label}" for priority in Priority]
        attached = await self.call(self.client.smembers(f"{prefix}attached"))
        others = [f"{prefix}queue:dead", *(raw.decode() for raw in attached)]
        for stream in [*grouped_streams, *others]:
            grouped = stream in grouped_streams
            doomed: builtins.list[bytes] = []
            start = "-"
            while True:
                entries = await self.call(self.client.xrange(stream, start, "+", STREAM_CHUNK))
                for entry_id, fields in entries:
                    if fields.get(b"task_id", b"").decode() in task_ids:
                        doomed.append(entry_id)
                if len(entries) < STREAM_CHUNK:
                    break
                start = "(" + entries[-1][0].decode()
            if not doomed:
                continue
            async with self.client.pipeline(transaction=True) as pipe:
                if grouped:
                    pipe.xack(stream, "kernels", *doomed)
                pipe.xdel(stream, *doomed)
                await self.call(pipe.execute())

    async def expire(
        self,
        created_before: float,
        *,
        tenant: str | None = None,
        keep: Collection[str] = (),
        after: tuple[float, str] | None = None,
        limit: int = MAX_EXPIRE_BATCH,
    ) -> Expiry:
        check_expire_limit(limit)
        index = self.keys.all_tasks() if tenant is None else self.keys.by_tenant(tenant)
        floor: float | str = "-inf" if after is None else after[0]
        examined: builtins.list[tuple[str, float]] = []
        skip = 0
        while len(examined) < limit:
            chunk = await self.call(
                self.client.zrangebyscore(
                    index, floor, f"({created_before!r}", start=skip, num=limit, withscores=True
                )
            )
            skip += len(chunk)
            examined.extend(
                (member.decode(), float(score))
                for member, score in chunk
                if after is None or (float(score), member.decode()) > after
            )
            if len(chunk) < limit:
                break
        examined = examined[:limit]
        kept = frozenset(keep)
        async with self.client.pipeline(transaction=False) as pipe:
            for task_id, _ in examined:
                pipe.hmget(self.keys.task(task_id), ["state", "tenant"])
            replies = await self.call(pipe.execute())
        final = {str(int(state)).encode() for state in FINAL_STATES}
        doomed = [
            task_id
            for (task_id, _), (state, owner) in zip(examined, replies, strict=True)
            if state in final and (tenant is not None or (owner or b"").decode() not in kept)
        ]
        if doomed:  # final tasks: their queue entries were removed when they ended
            await self._delete_keys(doomed)
        last = examined[-1] if len(examined) == limit else None
        return Expiry(tuple(doomed), None if last is None else (last[1], last[0]))

    async def scrub(self) -> builtins.list[str]:
        """Start an append-only-file rewrite when the server keeps one: until it is
        rewritten the AOF still holds every command that wrote the forgotten data, and the
        rewrite keeps only what is live. (RDB snapshots and replicas' files are the
        operator's: docs/privacy.md.)"""
        try:
            config = await self.call(self.client.config_get("appendonly"))
        except LlmosError as error:  # CONFIG renamed or refused (a managed Redis)
            return [f"could not ask {self.where} whether it keeps an AOF: {error.message}"]
        if str(config.get("appendonly", "no")).lower() != "yes":
            return [f"{self.where} keeps no append-only file: nothing to rewrite"]
        try:
            await self.call(self.client.bgrewriteaof())
        except LlmosError as error:  # one is already running: it may predate the deletion
            return [
                f"could not start an AOF rewrite on {self.where}: {error.message}; run "
                "BGREWRITEAOF once the current one ends"
            ]
        return [
            f"started an AOF rewrite on {self.where}: the forgotten data leaves the "
            "append-only file when it completes"
        ]

    async def _sealed_values(
        self, task_ids: builtins.list[str]
    ) -> builtins.list[tuple[str, builtins.list[tuple[str, str, str, str, bytes]]]]:
        """Every sealed value of each task: (task id, [(key, kind, where, field, raw)]),
        kind and where as the REWRAP script takes them; an event's raw value is the whole
        stored event and an output's the whole string."""
        async with self.client.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hmget(self.keys.task(task_id), ["request", "error"])
                pipe.lrange(self.keys.events(task_id), 0, -1)
                pipe.lrange(self.keys.trace(task_id), 0, -1)
                pipe.get(self.keys.output(task_id))
            replies = await self.call(pipe.execute())
        found = []
        for number, task_id in enumerate(task_ids):
            (request, error), events, steps, output = replies[4 * number : 4 * number + 4]
            task = self.keys.task(task_id)
            values: builtins.list[tuple[str, str, str, str, bytes]] = [
                (task, "h", "request", REQUEST, request or b""),
                (task, "h", "error", ERROR, error or b""),
            ]
            values += [
                (self.keys.events(task_id), "l", str(i), EVENT, raw) for i, raw in enumerate(events)
            ]
            values += [
                (self.keys.trace(task_id), "l", str(i), TRACE, raw) for i, raw in enumerate(steps)
            ]
            if output:
                values.append((self.keys.output(task_id), "s", "", OUTPUT, output))
            found.append((task_id, values))
        return found

    async def _task_ids(self, cursor: int, count: int) -> tuple[int, builtins.list[str]]:
        pattern = self.keys.task("*")
        next_cursor, names = await self.call(
            self.client.scan(cursor=cursor, match=pattern, count=count)
        )
        start = len(self.keys.task(""))
        return int(next_cursor), [bytes(name)[start:].decode() for name in names]

    async def rewrap(self, cursor: str = "", limit: int = 200) -> RewrapReport:
        try:
            position = int(cursor or "0")
        except ValueError as exc:
            raise InvalidArgument(
                'rewrap cursor is not one this store returned; pass "" to start a pass',
                reason="BAD_CURSOR",
            ) from exc
        position, task_ids = await self._task_ids(position, max(1, limit // 4))
        scanned = rewrapped = failed = 0
        keys: builtins.list[str] = []
        args: builtins.list[bytes | str] = []
        envelopes: builtins.list[int] = []  # how many envelopes each change moves
        for task_id, values in await self._sealed_values(task_ids):
            for key, kind, where, field, raw in values:
                scanned += 1
                try:
                    fresh = self._rewrapped(task_id, field, raw)
                except LlmosError:
                    failed += 1
                    continue
                if fresh is not None:
                    keys.append(key)
                    args += [kind, where, raw, fresh]
                    envelopes.append(len(output_frames(raw)) if field == OUTPUT else 1)
        if keys:
            written = await self.call(self._rewrap(keys=keys, args=args))
            rewrapped = sum(n for n, done in zip(envelopes, written, strict=True) if int(done))
        return RewrapReport(
            scanned=scanned,
            rewrapped=rewrapped,
            failed=failed,
            cursor="" if position == 0 else str(position),
        )

    def _rewrapped(self, task_id: str, field: str, raw: bytes) -> bytes | None:
        """`raw` (a stored value in its stored shape) with its envelopes under the active
        key, or None when there is nothing to change."""
        sealer = self.sealer
        if field == EVENT:
            header, sealed = split_event(raw)
            fresh = sealer.rewrap(task_id, EVENT, sealed)
            return None if fresh is None else header + b"\x00" + fresh
        if field == OUTPUT:
            frames = output_frames(raw)
            fresh_frames = [sealer.rewrap(task_id, OUTPUT, frame) for frame in frames]
            if all(frame is None for frame in fresh_frames):
                return None
            return b"".join(
                FRAME.pack(len(new)) + new
                for new in (
                    f if f is not None else o for f, o in zip(fresh_frames, frames, strict=True)
                )
            )
        return sealer.rewrap(task_id, field, raw)

    async def key_usage(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        cursor = 0
        while True:
            cursor, task_ids = await self._task_ids(cursor, 500)
            for _, values in await self._sealed_values(task_ids):
                for _, _, _, field, raw in values:
                    if field == EVENT:
                        sealed_values = [split_event(raw)[1]]
                    elif field == OUTPUT:
                        sealed_values = output_frames(raw)
                    else:
                        sealed_values = [raw]
                    for sealed in sealed_values:
                        label = usage_key(sealed)
                        if label is not None:
                            counts[label] = counts.get(label, 0) + 1
            if cursor == 0:
                return counts

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.client.aclose()
