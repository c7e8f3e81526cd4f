"""The embedded task store: one SQLite file, `<data_dir>/tasks.sqlite3`, the default backend.

Why it is built this way:

- **One dedicated thread, one connection.** sqlite3 calls block, so they run off the event
  loop, on a single writer thread that owns the only connection. Operations are therefore
  applied in submission order: concurrent `append_text` calls cannot race for an offset and
  no connection pool is needed. `asyncio.to_thread` would hop between the default pool's
  threads and force either a connection per thread (writers then contend for SQLite's file
  lock) or a lock of our own.
- **A lone task's writes skip the thread.** A task's own small writes (`create`,
  `transition`, `append_text`, `add_trace_step`, `add_subjects`) are applied on the
  caller's event loop, at once, when the caller runs one task at most (`watch_load`) and
  nothing submitted earlier is still waiting or being applied: then nothing can be
  overtaken, and the two thread hops, the two wake-ups and the interpreter lock's handovers
  between the threads cost more CPU than the SQL itself (on a two-core machine, 0.7 ms of
  the kernel's CPU per sequential call, 2026-11-30, docs/performance.md). The writer's lock
  keeps the connection to one thread at a time; the counts of jobs submitted (by the loop)
  and applied (by the writer) tell whether anything is outstanding. With many tasks running
  the writes go to the thread even when it is idle, and commit in groups as below: applied
  on the loop, every write would be a transaction and a commit of its own, and the
  kernel's throughput at saturation fell by a fifth (2026-11-30, docs/performance.md).
  Reads that can be long (lists, event logs, recovery, expiry) and every
  `synchronous="FULL"` store (an fsync would block the loop) always go through the
  thread, and so does a write that finds SQLite's write lock held by another process
  (tried here with no busy timeout, then queued: only the thread waits for the lock).
- **Checkpoints beside the writer, then a short catch-up.** SQLite's automatic checkpoint
  runs inside the COMMIT that fills the WAL past 1,000 pages, and in NORMAL mode a
  checkpoint syncs the files: a write applied on the event loop would stall it for
  milliseconds (up to 8.6 ms seen on a two-core VM, once every ~100 commits; half the time
  all commits took). So the store turns the automatic checkpoint off and makes its own
  every `CHECKPOINT_EVERY_COMMITS` commits, in two steps (`_Copier`). First a PASSIVE
  checkpoint on a second connection, in a worker thread, copies the WAL into the main file
  while the writer goes on writing. But it copies only the frames there when it began, and
  SQLite starts the WAL over only when a write begins with every frame copied: with writes
  going on, that never happens and the WAL grows. So, second, a PASSIVE checkpoint on the
  writer's own connection, as a job on its thread, copies the few frames written meanwhile;
  nothing is written during it, and the next write starts the WAL over. When the store's
  thread held the whole checkpoint, the write waiting behind it was the slowest call of its
  hundred, 5 to 16 ms (the kernel's p99, 2026-12-02); the catch-up copies a few tasks' frames,
  about 1 ms. One checkpoint at a time: SQLite answers a second one busy, which a deletion's
  TRUNCATE (below) would take for an outside reader, so they share `_Copier.lock`.
- **Only the thread waits for another process's lock.** The connection's busy timeout is
  0: a write on the loop that meets the lock fails at once and is queued for the thread
  instead. The thread raises the timeout to `BUSY_TIMEOUT_S` when its BEGIN meets the lock,
  and for `alone` jobs (checkpoints wait for readers); no statement is spent on the timeout
  while nobody else holds the lock.
- **Group commit.** Every operation is a job on the thread's queue. The thread takes the
  job at the head and every job queued behind it (up to `MAX_BATCH`) and applies them in
  one transaction. Jobs rarely fail, so the batch is first applied plainly; if a job
  fails, that attempt is rolled back and the batch applied again with each job in a
  savepoint of its own: the failing job rolls back to its savepoint and only its caller
  gets the error; the others go on. One `COMMIT` ends the batch, and only then does any
  caller get its result, all of them in one hop back to the event loop. Under load the
  kernel makes many small writes at once (each task's state changes, text and trace); one
  transaction, one WAL append and one thread hop for all of them, instead of one each, is
  most of what a write costs. Having taken a job, the thread lets the caller's event loop
  turn `GATHER_TURNS` times (at most `GATHER_MAX_S`) before it takes the jobs queued
  behind it: the loop makes a burst of writes over a few turns (calls arriving, tasks
  ending), and a thread that takes the first alone commits once per job and starts each
  create before its task's end can join it (see below). The wait follows the loop, not a
  clock: an idle loop turns eight times in a few tens of microseconds, a busy one takes
  longer, and that is when a bigger batch pays. Measured 2026-11-30, two stacks in
  alternation on a two-core VM: +10% kernel throughput at 32 clients and +12% at 2, with
  lower latency at both. A job that ends up alone is a batch of one (if it fails, its
  transaction is rolled back instead of committed).
- **A short task's end joins its queued create.** Under load a task's create waits in the
  queue while the runtime works, and a short task often ends before the thread reaches it
  (three tasks in four at saturation on a two-core VM, 2026-11-30). The kernel then sends
  its end with `follows_create` (it wrote nothing else meanwhile), and if the create has
  not started, its job inserts the task as the end leaves it, with every event and trace
  step: one job and three statements instead of two jobs and eight (`_Joinable`). Both
  callers hear of it at the COMMIT; if the create fails, the end fails with it.
- **Atomic as the contract demands.** A job is applied wholly or not at all: a failure in
  the plain attempt rolls the whole attempt back, and in the second attempt a job's
  savepoint is released only once all of it succeeded. If SQLite gives up the whole transaction (a
  full disk, an I/O error), or the COMMIT fails, every job of the batch that had succeeded
  gets that error instead: none of them took effect. A batch that cannot take the write
  lock (an outside process holds it past the busy timeout) fails its writing jobs with
  STORE_UNAVAILABLE, and its reads still run: in WAL mode readers never wait for a writer.
- **WAL mode, synchronous=NORMAL by default.** Durability is the same as with one commit
  per operation: a caller hears of success only after the COMMIT that holds its change. In
  WAL mode NORMAL loses nothing when the *process* dies (SIGKILL, a crash): a committed
  transaction is in the WAL file. Only a power cut or OS crash can lose the last commits
  (never corrupt the file), the same promise as Redis' `appendfsync everysec`. Pass
  `synchronous="FULL"` to fsync every commit (every batch).
- **Output is derived, not rewritten.** `TaskRecord.output` is the concatenation of the
  current attempt's "text" events, read when a record is read. Appending to a column would
  rewrite the whole, growing row for every streamed chunk (quadratic in the output length);
  inserting one small event row is constant work and is atomic by construction.
- **One kernel per file.** `open` takes an exclusive `flock` on `tasks.sqlite3.lock`: two
  kernels on one embedded store would each `recover` the other's running tasks. The OS
  drops the lock when the holder dies, so a SIGKILLed kernel never blocks its successor.
  Several kernels share work through the Redis backend instead.
- **Forgetting is real.** `secure_delete` overwrites deleted rows, and every deletion
  (`forget_tenant`, `delete`, `expire`) checkpoints and truncates the WAL, so a forgotten
  tenant's prompts do not linger in free pages or old WAL frames. They run alone, outside
  any batch (a checkpoint cannot run inside a transaction). Another process holding a
  read transaction past the busy timeout keeps the WAL (SQLite reports the checkpoint
  busy, not an error): that is logged, and `scrub`, which the forget calls run last,
  tries again and names it in their notes.
- **Sealed at rest.** Prompts, outputs, error texts and trace steps are stored sealed
  (kernel/store/sealing.py): the file and its WAL hold ciphertext and key ids, never the
  text. Sealing and opening run on the store's thread, off the event loop. Schema version 3
  means "sealed"; opening an older file seals its rows once, in the upgrade transaction.
  `rewrap` and `key_usage` serve key rotation (a bounded batch per call).
- **Errors in the project's terms.** A failing file (full disk, a lock an outside process
  holds past the busy timeout) is Unavailable(STORE_UNAVAILABLE); any other sqlite3 error is
  LlmosError(STORE_ERROR). No raw sqlite3 exception reaches the kernel.
- **A schema version table.** `schema_version` records each version applied; `open` creates
  the schema on a new file, and refuses a file written by a newer version rather than
  misreading it.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from llmos.kernel.store.contract import (
    DEFAULT_PAGE_SIZE,
    FAILED,
    FINAL_STATES,
    MAX_EVENTS_PER_READ,
    MAX_EXPIRE_BATCH,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Expiry,
    FinishReason,
    RecoveryReport,
    RewrapReport,
    TaskEvent,
    TaskRecord,
    TaskState,
    TaskStore,
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
from llmos.kernel.store.sealing import ERROR, EVENT, REQUEST, TRACE, Sealer
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

T = TypeVar("T")
log = logging.getLogger(__name__)

FILE_NAME = "tasks.sqlite3"
LOCK_NAME = "tasks.sqlite3.lock"
SCHEMA_VERSION = 4
BUSY_TIMEOUT_S = 5.0
# SQLite's "the file is locked by another connection" codes: a write that meets them at
# BEGIN was not applied and may be tried again.
LOCKED_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
# The most jobs one transaction applies: bounds how long the first caller of a batch waits
# for the others (a few milliseconds at most) while the queue is long.
MAX_BATCH = 256
# How long the thread lets the caller's event loop run before it takes the jobs queued
# behind the one it took (see "Group commit"): this many turns of the loop (a turn runs
# what was ready when it began, so a callback that queues itself again counts them), or
# this long if the loop is slower to turn.
GATHER_TURNS = 8
GATHER_MAX_S = 0.005
# Commits between two checkpoints of the WAL into the main file (see "Checkpoints beside
# the writer"). A task's write adds a few pages to the WAL, so this keeps it near SQLite's
# own default of 1,000 pages.
CHECKPOINT_EVERY_COMMITS = 200

# Version 1. Offsets are per task and consecutive, so events and traces are keyed by
# (task_id, seq) in WITHOUT ROWID tables: a task's log is one contiguous range of the index.
# `attempt_offset` is the offset of the event that started the current attempt (0, or the
# latest re-queue): `output` is the text logged since.
SCHEMA_V1 = (
    """
    CREATE TABLE tasks (
        task_id        TEXT PRIMARY KEY,
        tenant         TEXT NOT NULL,
        state          INTEGER NOT NULL,
        model          TEXT NOT NULL,
        priority       INTEGER NOT NULL,
        request        BLOB NOT NULL,
        created_at     REAL NOT NULL,
        updated_at     REAL NOT NULL,
        finished_at    REAL,
        finish_reason  INTEGER NOT NULL,
        usage          BLOB NOT NULL,
        error          TEXT NOT NULL,
        attempts       INTEGER NOT NULL,
        attempt_offset INTEGER NOT NULL
    )
    """,
    "CREATE INDEX tasks_by_created ON tasks (created_at, task_id)",
    "CREATE INDEX tasks_by_tenant ON tasks (tenant, created_at, task_id)",
    "CREATE INDEX tasks_by_state ON tasks (state, created_at, task_id)",
    """
    CREATE TABLE events (
        task_id       TEXT NOT NULL,
        seq           INTEGER NOT NULL,
        kind          TEXT NOT NULL CHECK (kind IN ('state', 'text')),
        state         INTEGER NOT NULL,
        text          TEXT NOT NULL,
        finish_reason INTEGER NOT NULL,
        PRIMARY KEY (task_id, seq)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE traces (
        task_id TEXT NOT NULL,
        seq     INTEGER NOT NULL,
        step    BLOB NOT NULL,
        PRIMARY KEY (task_id, seq)
    ) WITHOUT ROWID
    """,
)
# Upgrades from each older version to the next, applied in order inside one transaction.
# 1 -> 2: the blind index of each task's data subjects (keyed HMACs, never values), for
# ForgetSubject; keyed by token for the lookup, indexed by task for the deletion.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """
        CREATE TABLE subjects (
            token   BLOB NOT NULL,
            task_id TEXT NOT NULL,
            PRIMARY KEY (token, task_id)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX subjects_by_task ON subjects (task_id)",
    ),
    # 2 -> 3 seals the text columns (`_seal_rows`); the schema itself is unchanged.
    2: (),
    # 3 -> 4: how many characters the current attempt's output holds, so a text write that
    # says where it starts is stored once (`unstored_text`). A RUNNING task of an older file
    # is re-queued by recovery (count 0 again), so 0 is right for every existing row.
    3: ("ALTER TABLE tasks ADD COLUMN output_chars INTEGER NOT NULL DEFAULT 0",),
}
# Tables keyed by task id besides `tasks`: what deleting a task deletes.
PER_TASK_TABLES = ("events", "traces", "subjects")
# The sealed columns, for sealing, counting and re-wrapping: (table, column, sealing field,
# key columns). A task's events all use the "event" field, its trace steps "trace".
SEALED_COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("tasks", "request", REQUEST, "task_id, 0"),
    ("tasks", "error", ERROR, "task_id, 0"),
    ("events", "text", EVENT, "task_id, seq"),
    ("traces", "step", TRACE, "task_id, seq"),
)

TASK_COLUMNS = (
    "task_id, tenant, state, model, priority, request, created_at, updated_at, finished_at, "
    "finish_reason, usage, error, attempts, attempt_offset"
)


def _not_found(task_id: str) -> NotFound:
    return NotFound(
        f"no task {task_id!r}: it was never submitted here, or its tenant was forgotten",
        reason="TASK_NOT_FOUND",
        metadata={"task_id": task_id},
    )


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, *, write: bool) -> Iterator[None]:
    """BEGIN IMMEDIATE for writes (take the write lock up front, so reading an offset and
    inserting it cannot interleave with another writer), plain BEGIN for a consistent read."""
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # SQLite may already have rolled back (a full disk, a failed COMMIT).
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _task_row(conn: sqlite3.Connection, task_id: str, query: str | None = None) -> tuple[Any, ...]:
    """The task's row, by `query` (its TASK_COLUMNS by default, or a query that reads more
    beside them); NotFound when there is no such task."""
    row: tuple[Any, ...] | None = conn.execute(
        query or f"SELECT {TASK_COLUMNS} FROM tasks WHERE task_id = ?", (task_id,)
    ).fetchone()
    if row is None:
        raise _not_found(task_id)
    return row


# A task's row, the offsets of its next event and trace step and its output's length, for
# a transition that reads no output: one statement instead of three.
TASK_ROW_AND_NEXT_OFFSETS = (
    f"SELECT {TASK_COLUMNS}, "
    "(SELECT COALESCE(MAX(seq) + 1, 0) FROM events WHERE events.task_id = tasks.task_id), "
    "(SELECT COALESCE(MAX(seq) + 1, 0) FROM traces WHERE traces.task_id = tasks.task_id), "
    "output_chars FROM tasks WHERE task_id = ?"
)
# A task's row and its output's length, for a transition that reads the output back.
TASK_ROW_AND_OUTPUT_CHARS = f"SELECT {TASK_COLUMNS}, output_chars FROM tasks WHERE task_id = ?"


def _require_task(conn: sqlite3.Connection, task_id: str) -> None:
    if conn.execute("SELECT 1 FROM tasks WHERE task_id = ?", (task_id,)).fetchone() is None:
        raise _not_found(task_id)


def _output(conn: sqlite3.Connection, sealer: Sealer, task_id: str, attempt_offset: int) -> str:
    rows = conn.execute(
        "SELECT text FROM events WHERE task_id = ? AND seq >= ? AND kind = 'text' ORDER BY seq",
        (task_id, attempt_offset),
    )
    return "".join(sealer.open_text(task_id, EVENT, text) for (text,) in rows)


def _record(
    sealer: Sealer, row: tuple[Any, ...], output: str, *, brief: bool = False
) -> TaskRecord:
    """The record of a `tasks` row; `brief` leaves the request sealed (b"")."""
    return TaskRecord(
        task_id=row[0],
        tenant=row[1],
        state=common_pb2.TaskState.ValueType(row[2]),
        model=row[3],
        priority=common_pb2.Priority.ValueType(row[4]),
        request=b"" if brief else sealer.open(row[0], REQUEST, row[5]),
        created_at=row[6],
        updated_at=row[7],
        finished_at=row[8],
        finish_reason=common_pb2.FinishReason.ValueType(row[9]),
        usage=bytes(row[10]),
        output=output,
        error=sealer.open_text(row[0], ERROR, row[11]),
        attempts=row[12],
    )


def _read_record(conn: sqlite3.Connection, sealer: Sealer, task_id: str) -> TaskRecord:
    row = _task_row(conn, task_id)
    return _record(sealer, row, _output(conn, sealer, task_id, row[13]))


def _next_offset(conn: sqlite3.Connection, table: str, task_id: str) -> int:
    (offset,) = conn.execute(
        f"SELECT COALESCE(MAX(seq) + 1, 0) FROM {table} WHERE task_id = ?", (task_id,)
    ).fetchone()
    return int(offset)


# A new row: TASK_COLUMNS' values, then `output_chars`.
INSERT_TASK = f"INSERT INTO tasks ({TASK_COLUMNS}, output_chars) VALUES ({', '.join('?' * 15)})"
INSERT_EVENT = (
    "INSERT INTO events (task_id, seq, kind, state, text, finish_reason) VALUES (?, ?, ?, ?, ?, ?)"
)


def _event_row(
    sealer: Sealer,
    task_id: str,
    offset: int,
    *,
    kind: Literal["state", "text"],
    state: TaskState,
    text: str,
    finish_reason: FinishReason,
) -> tuple[Any, ...]:
    """An `events` row, its text sealed."""
    return (
        task_id,
        offset,
        kind,
        int(state),
        sealer.seal_text(task_id, EVENT, text),
        int(finish_reason),
    )


@dataclasses.dataclass(frozen=True, slots=True)
class _Move:
    """A checked transition as the store writes it. `interrupted` counts an attempt that
    did not finish: always for a re-queue, and for a task failed by `recover`. `text` (the
    caller checked the task takes text) is logged just before the state event."""

    to_state: TaskState
    now: float
    finish_reason: FinishReason
    usage: bytes | None = None
    error: str | None = None
    interrupted: bool = False
    text: str = ""


def _apply_transition(
    conn: sqlite3.Connection,
    sealer: Sealer,
    row: tuple[Any, ...],
    move: _Move,
    offset: int | None = None,
) -> tuple[Any, ...]:
    """Write a checked transition and its "state" event (the caller holds the transaction);
    the task's row as it now is. `offset` is the task's next event offset, when the caller
    knows it (one query fewer); text and state event go in one statement."""
    if offset is None:
        offset = _next_offset(conn, "events", row[0])
    new_row, events = _transitioned(sealer, row, move, offset)
    conn.execute(
        "UPDATE tasks SET state = ?, updated_at = ?, finished_at = ?, finish_reason = ?, "
        "usage = ?, error = ?, attempts = ?, attempt_offset = ?, "
        "output_chars = CASE WHEN ? THEN 0 ELSE output_chars + ? END WHERE task_id = ?",
        (new_row[2], *new_row[7:], move.to_state == QUEUED, len(move.text), row[0]),
    )
    conn.executemany(INSERT_EVENT, events)
    return new_row


def _transitioned(
    sealer: Sealer, row: tuple[Any, ...], move: _Move, offset: int
) -> tuple[tuple[Any, ...], builtins.list[tuple[Any, ...]]]:
    """A transition worked out without touching the file: the task's row as it leaves it
    (in TASK_COLUMNS order) and the event rows it logs from `offset` on."""
    to_state, error, text = move.to_state, move.error, move.text
    finish_reason, now, usage = move.finish_reason, move.now, move.usage
    task_id = row[0]
    events: builtins.list[tuple[Any, ...]] = []
    if text:
        events.append(
            _event_row(
                sealer,
                task_id,
                offset,
                kind="text",
                state=row[2],
                text=text,
                finish_reason=common_pb2.FINISH_REASON_UNSPECIFIED,
            )
        )
        offset += 1
    attempts = row[12] + 1 if move.interrupted else row[12]
    attempt_offset = offset if to_state == QUEUED else row[13]
    finished_at = now if to_state in FINAL_STATES else None
    stored_error = (
        sealer.seal_text(task_id, ERROR, error)
        if error is not None
        else (b"" if to_state == SUCCEEDED else row[11])
    )
    stored_usage = row[10] if usage is None else usage
    events.append(
        _event_row(
            sealer,
            task_id,
            offset,
            kind="state",
            state=to_state,
            text=error or "",
            finish_reason=finish_reason,
        )
    )
    new_row = (
        *row[:2],
        int(to_state),
        *row[3:7],
        now,
        finished_at,
        int(finish_reason),
        stored_usage,
        stored_error,
        attempts,
        attempt_offset,
    )
    return new_row, events


def _insert_text(
    conn: sqlite3.Connection, sealer: Sealer, task_id: str, state: TaskState, text: str
) -> int:
    """Log `text` as the task's next event (the caller checked the task runs); its offset."""
    offset = _next_offset(conn, "events", task_id)
    conn.execute(
        INSERT_EVENT,
        _event_row(
            sealer,
            task_id,
            offset,
            kind="text",
            state=state,
            text=text,
            finish_reason=common_pb2.FINISH_REASON_UNSPECIFIED,
        ),
    )
    return offset


def _insert_steps(
    conn: sqlite3.Connection,
    sealer: Sealer,
    task_id: str,
    steps: Sequence[bytes],
    first: int | None = None,
) -> None:
    """Append serialized trace steps to the task's trace, in order, sealed; `first` is the
    trace's next offset when the caller knows it (a new task's: 0)."""
    if not steps:
        return
    if first is None:
        first = _next_offset(conn, "traces", task_id)
    conn.executemany(
        "INSERT INTO traces (task_id, seq, step) VALUES (?, ?, ?)",
        [
            (task_id, first + index, sealer.seal(task_id, TRACE, step))
            for index, step in enumerate(steps)
        ],
    )


# -- the writer thread -------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Job:
    """One operation waiting for the store's thread, and where its outcome goes.

    `writes` puts it in a savepoint of the batch's write transaction (a read needs none:
    it changes nothing to undo). `alone` runs it outside any batch, on a connection with no
    transaction open, after everything queued before it committed; it manages its own
    transactions (`forget_tenant`, which checkpoints the WAL, and closing). `last` ends the
    thread once it ran.
    """

    operation: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    writes: bool = True
    alone: bool = False
    last: bool = False
    outcome: Any = None
    error: BaseException | None = None
    # A transition applied by this job's operation too (`_Joinable`): it fails with it.
    joined: _Job | None = None

    def fail(self, error: BaseException) -> None:
        self.outcome, self.error = None, error
        if self.joined is not None:
            self.joined.fail(error)


_Finish = Callable[[sqlite3.Connection, tuple[Any, ...], builtins.list[tuple[Any, ...]]], None]


class _Joinable:
    """A queued `create`, open to the task's final transition until the thread starts it.

    Under load a task's create waits in the thread's queue while the runtime works, and a
    short task is often done before the thread gets to it (72% of tasks at saturation,
    2026-11-30). The kernel's transition then joins the create (`follows_create`): one job
    inserts the task as the transition leaves it, with every event and step, instead of a
    job that inserts it and another that reads it back and updates it. The lock makes
    "joined" and "started" exclusive: the thread's `start` and the loop's `join` each
    decide under it, and the loop never waits for it (busy: it does not join).
    """

    def __init__(self, running: bool) -> None:
        self.lock = threading.Lock()
        self.running = running  # the create stores it RUNNING (else QUEUED)
        self.started = False
        # Writes the task as the joined transition leaves it, given the row and events the
        # create would have written; sets the transition job's outcome.
        self.finish: _Finish | None = None
        self.create_job: _Job | None = None  # set by `SqliteTaskStore._run`

    def join(self, finish: _Finish, job: _Job) -> bool:
        """Attach a transition (`finish`, whose outcome goes to `job`) unless the create has
        started; whether it was attached."""
        if self.create_job is None or not self.lock.acquire(blocking=False):
            return False
        try:
            if self.started:
                return False
            self.finish = finish
            self.create_job.joined = job
            return True
        finally:
            self.lock.release()

    def start(self) -> None:
        """On the thread, as the create's operation begins: nothing joins after this."""
        with self.lock:
            self.started = True


class _Copier:
    """Checkpoints (see the module doc, "Checkpoints beside the writer, then a short
    catch-up"): a second connection that copies the WAL into the main file while the
    writer writes, and the checkpoints made on the writer's connection. `lock` keeps them
    to one at a time: SQLite answers a checkpoint busy while another runs."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self.lock = threading.Lock()
        # Used by one thread at a time (under `lock`), whichever worker `copy` runs on.
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self.conn.execute(f"PRAGMA synchronous = {synchronous}")  # how a checkpoint syncs
            self.conn.execute("PRAGMA wal_autocheckpoint = 0")
        except BaseException:
            self.conn.close()
            raise

    def copy(self) -> None:
        """In a worker thread: copy what the WAL holds now into the main file, waiting for
        no reader or writer."""
        with self.lock:
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def catch_up(self, conn: sqlite3.Connection) -> None:
        """On the writer's connection, with nothing being written: copy the frames written
        since `copy` began, so that the next write starts the WAL over."""
        with self.lock:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def truncate(self, conn: sqlite3.Connection) -> bool:
        """Copy the WAL into the main file (whose freed pages secure_delete zeroed) and empty
        it, so the old frames holding deleted rows are gone too; whether it did. Needs no
        open transaction. Another process reading the file past the busy timeout keeps the
        WAL: SQLite then reports the checkpoint busy instead of failing, so the frames stay
        (`scrub` tells the operator)."""
        with self.lock:
            (busy, _, _) = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            log.warning(
                "the task store's WAL could not be emptied after a deletion: another process "
                "holds a read transaction on it; the deleted rows' old frames stay until it ends"
            )
        return not busy

    def close(self) -> None:
        """Before the writer's connection closes: the last connection to close folds the WAL
        into the main file."""
        with self.lock:
            self.conn.close()


class _Writer:
    """The store's thread: opens the connection and applies queued jobs in batches (see the
    module doc, "Group commit"), holding `lock` while it uses the connection."""

    def __init__(self, conn: sqlite3.Connection, jobs: queue.SimpleQueue[_Job]) -> None:
        self.conn = conn
        self.jobs = jobs
        # Held while the connection is used: by this thread for a batch, by an event loop
        # for a job it applies itself (`SqliteTaskStore._run`).
        self.lock = threading.Lock()
        # Jobs taken from the queue and applied (written by this thread only).
        self.applied = 0
        # Commits since the last checkpoint (written with `lock` held).
        self.commits = 0
        # Whether the batch being applied may wait for another process's lock (`_apply`).
        self.may_wait = False

    def serve(self) -> None:
        """Apply batches until a `last` job ran."""
        while True:
            batch = self._next_batch()
            stop = next((i for i, job in enumerate(batch) if job.last), None)
            if stop is not None:
                for late in batch[stop + 1 :]:  # never happens: close() is the last submit
                    late.fail(_closed_error())
                with self.lock:
                    self._apply(batch[: stop + 1], may_wait=True)
                _deliver(batch)
                return
            with self.lock:
                self._apply(batch, may_wait=True)
                self.applied += len(batch)
            _deliver(batch)

    def _next_batch(self) -> builtins.list[_Job]:
        """The job at the head of the queue (waiting for one) and those queued behind it."""
        batch = [self.jobs.get()]
        _let_loop_turn(batch[0].future.get_loop(), GATHER_TURNS, GATHER_MAX_S)
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        return batch

    def _apply(self, batch: builtins.list[_Job], *, may_wait: bool = False) -> None:
        """Run `batch` in order: runs of ordinary jobs as one transaction each, `alone`
        jobs on their own between them. `may_wait` (on the store's thread only): wait up
        to `BUSY_TIMEOUT_S` for a lock another process holds, else fail at once."""
        self.may_wait = may_wait
        group: builtins.list[_Job] = []
        for job in batch:
            if job.alone:
                self._transact(group)
                group = []
                with self._waiting() if may_wait else contextlib.nullcontext():
                    _attempt(self.conn, job, savepoint=False)
            else:
                group.append(job)
        self._transact(group)

    @contextlib.contextmanager
    def _waiting(self) -> Iterator[None]:
        """The busy timeout raised for what runs inside (it is 0 otherwise)."""
        self.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        try:
            yield
        finally:
            with contextlib.suppress(sqlite3.ProgrammingError):  # the close job closed it
                self.conn.execute("PRAGMA busy_timeout = 0")

    def _begin(self, writes: bool) -> None:
        """Open the transaction; on the thread, wait for a lock held elsewhere only once
        it is met (no statement spent on the busy timeout otherwise)."""
        statement = "BEGIN IMMEDIATE" if writes else "BEGIN"
        try:
            self.conn.execute(statement)
        except sqlite3.OperationalError as exc:
            if not (self.may_wait and _is_locked(exc)):
                raise
            with self._waiting():
                self.conn.execute(statement)

    def _transact(self, group: builtins.list[_Job]) -> None:
        """Apply `group` in as few transactions as SQLite allows (one, unless it rolls one
        back on its own)."""
        while group:
            group = self._transact_once(group)

    def _transact_once(self, group: builtins.list[_Job]) -> builtins.list[_Job]:
        """One transaction over `group`; returns the jobs it did not reach because SQLite
        rolled the whole transaction back (they go into the next one).

        A group is first applied plainly. Only if one of its jobs fails is that attempt
        rolled back and the group applied again with a savepoint per job, so that the
        failing job loses only its own writes: jobs rarely fail, and two statements per
        job (SAVEPOINT, RELEASE) were a fifth of a group's statements."""
        writes = any(job.writes for job in group)
        try:
            self._begin(writes)
        except sqlite3.Error as exc:
            return _refuse_writes(group, exc, writes)
        if self._applied_plainly(group):
            self._commit(group)
            return []
        _roll_back(self.conn)
        if len(group) == 1:  # nothing else to keep: its error is the outcome
            return []
        for job in group:
            job.outcome, job.error = None, None
        try:
            self._begin(writes)
        except sqlite3.Error as exc:
            return _refuse_writes(group, exc, writes)
        applied: builtins.list[_Job] = []
        for index, job in enumerate(group):
            _attempt(self.conn, job, savepoint=job.writes)
            if not self.conn.in_transaction:  # SQLite gave the transaction up (disk full, I/O)
                for earlier in applied:
                    earlier.fail(job.error or sqlite3.OperationalError("transaction lost"))
                return group[index + 1 :]
            if job.error is None:
                applied.append(job)
        self._commit(applied)
        return []

    def _applied_plainly(self, group: builtins.list[_Job]) -> bool:
        """Apply `group` in the open transaction with no savepoints; whether every job
        succeeded (else the caller rolls the transaction back)."""
        for job in group:
            _attempt(self.conn, job, savepoint=False)
            if job.error is not None or not self.conn.in_transaction:
                return False
        return True

    def _commit(self, applied: builtins.list[_Job]) -> None:
        """Commit the open transaction; if that fails, none of `applied` took effect."""
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _roll_back(self.conn)
            for job in applied:  # nothing of the batch was stored
                job.fail(exc)
            return
        self.commits += 1


def _is_locked(error: BaseException | None) -> bool:
    """Whether `error` is SQLite's "locked by another connection" (nothing was applied)."""
    return (
        isinstance(error, sqlite3.OperationalError)
        and error.sqlite_errorcode & 0xFF in LOCKED_CODES  # primary code of an extended one
    )


def _attempt(conn: sqlite3.Connection, job: _Job, *, savepoint: bool) -> None:
    """Run one job; on failure undo exactly its own writes and keep its error."""
    if savepoint:
        conn.execute("SAVEPOINT job")
    try:
        job.outcome = job.operation(conn)
    except Exception as exc:  # handed to its caller, whatever it is
        job.fail(exc)
        if savepoint and conn.in_transaction:
            try:
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
            except sqlite3.Error:
                _roll_back(conn)
        return
    if savepoint:
        conn.execute("RELEASE job")


def _roll_back(conn: sqlite3.Connection) -> None:
    """End the open transaction, if SQLite has not already."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _refuse_writes(
    group: builtins.list[_Job], error: sqlite3.Error, writes: bool
) -> builtins.list[_Job]:
    """The batch could not begin (the write lock is held elsewhere past the busy timeout):
    its writes fail with that error; its reads are returned to run in a read transaction,
    which a held write lock does not block under WAL."""
    for job in group:
        if job.writes or not writes:
            job.fail(error)
    return [job for job in group if not job.writes] if writes else []


def _let_loop_turn(loop: asyncio.AbstractEventLoop, turns: int, timeout: float) -> None:
    """On the store's thread: wait until `loop` has turned `turns` times, or `timeout`
    seconds (a closed loop makes no more jobs: no wait)."""
    turned = threading.Event()
    try:
        loop.call_soon_threadsafe(_count_turns, loop, turned, turns)
    except RuntimeError:
        return
    turned.wait(timeout)


def _count_turns(loop: asyncio.AbstractEventLoop, turned: threading.Event, left: int) -> None:
    """On the loop: one turn more; the callback queued now runs in the loop's next turn."""
    if left <= 1:
        turned.set()
    else:
        loop.call_soon(_count_turns, loop, turned, left - 1)


def _deliver(batch: builtins.list[_Job]) -> None:
    """Hand every job's outcome to its caller: one hop to each event loop for the batch."""
    loops: dict[asyncio.AbstractEventLoop, builtins.list[_Job]] = {}
    for job in batch:
        loops.setdefault(job.future.get_loop(), []).append(job)
    for loop, jobs in loops.items():
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
            loop.call_soon_threadsafe(_settle, jobs)


def _settle(jobs: builtins.list[_Job]) -> None:
    """On the event loop: resolve each job's future (one its caller cancelled stays so),
    then that of the transition it applied too."""
    for job in jobs:
        _resolve(job)
        if job.joined is not None:
            _resolve(job.joined)


def _resolve(job: _Job) -> None:
    if job.future.done():
        return
    if job.error is not None:
        job.future.set_exception(job.error)
    else:
        job.future.set_result(job.outcome)


def _joined_elsewhere(conn: sqlite3.Connection) -> None:
    """The operation of a transition joined to a create: the create's job applies it."""
    raise AssertionError("a joined transition is applied by its create's job")


def _closed_error() -> FailedPrecondition:
    return FailedPrecondition("the task store is closed", reason="STORE_CLOSED")


def _serve(
    path: Path,
    synchronous: str,
    sealer: Sealer,
    jobs: queue.SimpleQueue[_Job],
    opened: concurrent.futures.Future[tuple[int, _Writer, _Copier]],
) -> None:
    """The thread's whole life: open the files, report the lock's fd, the writer and the
    copier, serve the queue."""
    if not opened.set_running_or_notify_cancel():
        return
    try:
        conn, copier, lock_fd = _open_files(path, synchronous, sealer)
    except BaseException as exc:
        opened.set_exception(exc)
        return
    writer = _Writer(conn, jobs)
    opened.set_result((lock_fd, writer, copier))
    writer.serve()


class SqliteTaskStore(TaskStore):
    """The `TaskStore` contract on one SQLite file; create it with `await SqliteTaskStore.open`."""

    joins_creates = True

    def __init__(
        self,
        path: Path,
        jobs: queue.SimpleQueue[_Job],
        writer: _Writer,
        copier: _Copier,
        *,
        lock_fd: int,
        clock: Callable[[], float],
        sealer: Sealer,
        apply_when_idle: bool,
    ) -> None:
        """Use `open`: the connection lives with the thread that serves `jobs`."""
        self.path = path
        self.sealer = sealer
        self._jobs = jobs
        self._writer = writer
        self._copier = copier
        self._lock_fd = lock_fd
        self._clock = clock
        self._closed = False
        self._apply_when_idle = apply_when_idle
        # Jobs put on the queue. Written by the one event loop the store serves only, so
        # that `_writer.applied` equal to it means nothing is outstanding.
        self._submitted = 0
        # The checkpoint under way, if any (`_checkpoint_when_due`).
        self._checkpoint: asyncio.Task[None] | None = None
        # How many tasks the caller runs at once (`watch_load`); none known: one.
        self._tasks_running: Callable[[], int] = lambda: 1
        # Creates submitted and not yet ended, by task id: a transition may join one.
        self._joinable: dict[str, _Joinable] = {}

    def watch_load(self, tasks_running: Callable[[], int]) -> None:
        self._tasks_running = tasks_running

    @classmethod
    async def open(
        cls,
        data_dir: str | os.PathLike[str],
        *,
        keys: KeyRing,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        clock: Callable[[], float] = time.time,
    ) -> SqliteTaskStore:
        """Open (creating if needed) `<data_dir>/tasks.sqlite3` and bring its schema up to date.

        FailedPrecondition(STORE_LOCKED) when another live process has the store open, and
        FailedPrecondition(STORE_SCHEMA_TOO_NEW) for a file a newer llmos wrote. `keys`
        seal and open the text fields (kernel/store/sealing.py). `clock` stamps updated_at
        and finished_at (a fake one makes times predictable).
        """
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        path = Path(data_dir) / FILE_NAME
        sealer = Sealer(keys)
        jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        opened: concurrent.futures.Future[tuple[int, _Writer, _Copier]] = (
            concurrent.futures.Future()
        )
        # A daemon thread: a kernel that exits without closing the store is a crash, which
        # WAL mode survives; it must not hang the interpreter's exit.
        threading.Thread(
            target=_serve,
            args=(path, synchronous, sealer, jobs, opened),
            name="llmos-task-store",
            daemon=True,
        ).start()
        lock_fd, writer, copier = await asyncio.wrap_future(opened)
        return cls(
            path,
            jobs,
            writer,
            copier,
            lock_fd=lock_fd,
            clock=clock,
            sealer=sealer,
            apply_when_idle=synchronous == "NORMAL",
        )

    async def _run(
        self,
        operation: Callable[[sqlite3.Connection], T],
        *,
        writes: bool = True,
        alone: bool = False,
        last: bool = False,
        small: bool = False,
        joinable: _Joinable | None = None,
    ) -> T:
        """Run `operation` after everything submitted before it: on the store's thread, in
        the same transaction as whatever else is queued with it (see "Group commit"), or,
        if it is `small`, the caller runs one task at most and nothing is outstanding, here
        and now (see "A lone task's writes skip the thread"); `writes`, `alone` and `last`
        as in `_Job`. `joinable`: a create's, told its job (a transition may join it)."""
        if self._closed and not last:
            raise FailedPrecondition(f"the task store {self.path} is closed", reason="STORE_CLOSED")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        job = _Job(operation, future, writes=writes, alone=alone, last=last)
        if joinable is not None:
            joinable.create_job = job
        try:
            if small and self._tasks_running() <= 1 and self._idle() and self._applied_here(job):
                self._checkpoint_when_due()
                if job.error is not None:
                    raise job.error
                outcome: T = job.outcome
                return outcome
            self._submitted += 1
            self._jobs.put(job)
            try:
                return await future
            finally:
                self._checkpoint_when_due()
        except sqlite3.Error as exc:
            raise self._failure(exc) from exc

    def _failure(self, error: sqlite3.Error) -> LlmosError:
        """A sqlite3 error in the project's terms. A full disk, an unreadable file, a lock
        held too long by an outside reader: the store cannot serve now, which is what
        UNAVAILABLE tells a client; anything else is STORE_ERROR."""
        if isinstance(error, sqlite3.OperationalError):
            return Unavailable(
                f"the task store {self.path} failed: {error}", reason="STORE_UNAVAILABLE"
            )
        return LlmosError(f"the task store {self.path} failed: {error}", reason="STORE_ERROR")

    def _checkpoint_when_due(self) -> None:
        """Start a checkpoint once `CHECKPOINT_EVERY_COMMITS` commits were made since the
        last (one at a time; nobody waits for it)."""
        if self._checkpoint is not None or self._closed:
            return
        if self._writer.commits < CHECKPOINT_EVERY_COMMITS:
            return
        self._checkpoint = asyncio.get_running_loop().create_task(self._checkpoint_wal())

    async def _checkpoint_wal(self) -> None:
        """Copy the WAL into the main file beside the writer, then the frames written
        meanwhile on the writer's thread (see "Checkpoints beside the writer"). A failure is
        logged and tried again after as many commits."""
        writer, copier = self._writer, self._copier

        def catch_up(conn: sqlite3.Connection) -> None:
            copier.catch_up(conn)
            writer.commits = 0

        try:
            await asyncio.to_thread(copier.copy)
            if not self._closed:  # else the writer's close folds the WAL in
                await self._run(catch_up, writes=False, alone=True)
        except Exception as exc:
            log.warning("checkpoint of the task store %s failed: %s", self.path, exc)
            # Not under the writer's lock (the loop must not wait for a batch): a commit
            # counted meanwhile may be lost, which moves the next try by one commit.
            writer.commits = 0
        finally:
            self._checkpoint = None

    def _idle(self) -> bool:
        """Whether every job submitted so far has been applied; if so, the writer's lock is
        now held by the caller, who applies a job and releases it."""
        writer = self._writer
        if not self._apply_when_idle or self._submitted != writer.applied:
            return False
        return writer.lock.acquire(blocking=False)

    def _applied_here(self, job: _Job) -> bool:
        """Apply `job` on this thread (the caller holds the writer's lock), without waiting
        for SQLite's write lock: if another process holds it, nothing was applied and the
        job goes to the store's thread, which may wait the busy timeout without blocking
        the event loop. Whether it was applied (its outcome or error is on `job`)."""
        writer = self._writer
        try:
            writer._apply([job])
        finally:
            writer.lock.release()
        if _is_locked(job.error):
            job.outcome, job.error = None, None
            return False
        return True

    async def create(self, record: TaskRecord, *, running: bool = False) -> None:
        check_new_record(record)
        sealer = self.sealer
        task_id = record.task_id
        # QUEUED, and with `running` RUNNING at once: the row is inserted as the transition
        # leaves it and both state events go in one statement (a new task has nothing to
        # read first: its first event is offset 0, its attempt starts there).
        unspecified = int(common_pb2.FINISH_REASON_UNSPECIFIED)
        events = [(task_id, 0, "state", int(record.state), b"", unspecified)]
        if running:
            events.append((task_id, 1, "state", int(RUNNING), b"", unspecified))
        joinable = self._joinable[task_id] = _Joinable(running)

        def operation(conn: sqlite3.Connection) -> None:
            joinable.start()
            row = (
                task_id,
                record.tenant,
                int(RUNNING if running else record.state),
                record.model,
                int(record.priority),
                sealer.seal(task_id, REQUEST, record.request),
                record.created_at,
                self._clock() if running else record.updated_at,
                None,
                int(record.finish_reason),
                record.usage,
                sealer.seal_text(task_id, ERROR, record.error),
                record.attempts,
                0,
                0,
            )
            try:
                if joinable.finish is None:
                    conn.execute(INSERT_TASK, row)
                    conn.executemany(INSERT_EVENT, events)
                    # Its output and trace will be sealed at its end, when the client waits
                    # for that write: their DEKs are made now, while the runtime works
                    # (wrapping them was ~33 of the end write's ~230 µs, 2026-11-30).
                    sealer.prepare(task_id, EVENT, TRACE)
                else:  # as the joined transition leaves it
                    joinable.finish(conn, row, events)
            except sqlite3.IntegrityError as exc:
                raise AlreadyExists(
                    f"task {task_id!r} already exists",
                    reason="DUPLICATE_TASK",
                    metadata={"task_id": task_id},
                ) from exc

        try:
            await self._run(operation, small=True, joinable=joinable)
        finally:
            self._joinable.pop(task_id, None)
            # The job's operation holds `joinable`: without this, a cycle per task, left
            # to the garbage collector (2.4% of the loop's time at saturation, 2026-11-30).
            joinable.create_job = None

    async def get(self, task_id: str) -> TaskRecord:
        def operation(conn: sqlite3.Connection) -> TaskRecord:
            return _read_record(conn, self.sealer, task_id)

        return await self._run(operation, writes=False)

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
        follows_create: bool = False,
        attempt: int | None = None,
    ) -> TaskRecord:
        steps = tuple(trace)
        joinable = self._joinable.get(task_id) if follows_create else None
        # Joined to its own create, still queued: no other writer can have moved the task,
        # so `attempt` has nothing to check there.
        if joinable is not None:
            created = RUNNING if joinable.running else QUEUED
            move = self._checked_move(
                task_id,
                created,
                to_state,
                finish_reason,
                usage=usage,
                error=error,
                text=unstored_text(task_id, text, text_at, 0),  # a new task holds none
            )
            joined = None if move is None else self._join(joinable, task_id, move, steps, brief)
            if joined is not None:
                try:
                    return await joined
                except sqlite3.Error as exc:
                    raise self._failure(exc) from exc

        def operation(conn: sqlite3.Connection) -> TaskRecord:
            if brief:  # no output to read back: the row and the next offsets in one query
                found = _task_row(conn, task_id, TASK_ROW_AND_NEXT_OFFSETS)
                row, (next_event, next_step, stored) = found[:-3], found[-3:]
            else:
                found = _task_row(conn, task_id, TASK_ROW_AND_OUTPUT_CHARS)
                row, stored = found[:-1], found[-1]
            check_attempt(task_id, row[12], attempt)
            current = common_pb2.TaskState.ValueType(row[2])
            unstored = unstored_text(task_id, text, text_at, stored)
            move = self._checked_move(
                task_id, current, to_state, finish_reason, usage=usage, error=error, text=unstored
            )
            if move is None:  # the final transition it already made: nothing to write
                if brief:
                    return _record(self.sealer, row, "", brief=True)
                return _record(self.sealer, row, _output(conn, self.sealer, task_id, row[13]))
            if brief:
                new_row = _apply_transition(conn, self.sealer, row, move, next_event)
                _insert_steps(conn, self.sealer, task_id, steps, first=next_step)
                return _record(self.sealer, new_row, "", brief=True)
            # One read gives both the next offset and the attempt's output so far: every
            # event from the attempt's first on (at least that one) is at or after it.
            since = conn.execute(
                "SELECT seq, kind, text FROM events WHERE task_id = ? AND seq >= ? ORDER BY seq",
                (task_id, row[13]),
            ).fetchall()
            new_row = _apply_transition(
                conn, self.sealer, row, move, since[-1][0] + 1 if since else None
            )
            _insert_steps(conn, self.sealer, task_id, steps)
            if to_state == QUEUED:  # a new attempt starts at this state event: no output
                return _record(self.sealer, new_row, "")
            output = "".join(
                self.sealer.open_text(task_id, EVENT, sealed)
                for _, kind, sealed in since
                if kind == "text"
            )
            return _record(self.sealer, new_row, output + unstored)

        return await self._run(operation, small=True)

    def _checked_move(
        self,
        task_id: str,
        current: TaskState,
        to_state: TaskState,
        finish_reason: FinishReason | None,
        *,
        usage: bytes | None,
        error: str | None,
        text: str,
    ) -> _Move | None:
        """The transition from `current` as the store will write it, checked as the contract
        says (raising what it names); None for a final transition the task already made."""
        if not check_transition(task_id, current, to_state):
            return None
        reason = finish_reason_for(task_id, to_state, finish_reason)
        if text:
            check_takes_text(task_id, current)
        interrupted = current == RUNNING and to_state == QUEUED
        return _Move(to_state, self._clock(), reason, usage, error, interrupted, text)

    def _join(
        self, joinable: _Joinable, task_id: str, move: _Move, steps: tuple[bytes, ...], brief: bool
    ) -> asyncio.Future[TaskRecord] | None:
        """Attach the transition to the task's queued create (see `_Joinable`); its future,
        or None when the create has started (the caller then queues it behind)."""
        sealer = self.sealer
        future: asyncio.Future[TaskRecord] = asyncio.get_running_loop().create_future()
        job = _Job(_joined_elsewhere, future)

        def finish(
            conn: sqlite3.Connection, row: tuple[Any, ...], events: builtins.list[tuple[Any, ...]]
        ) -> None:
            new_row, more = _transitioned(sealer, row, move, len(events))
            output_chars = 0 if move.to_state == QUEUED else len(move.text)
            conn.execute(INSERT_TASK, (*new_row, output_chars))
            conn.executemany(INSERT_EVENT, [*events, *more])
            _insert_steps(conn, sealer, task_id, steps, first=0)
            output = "" if brief or move.to_state == QUEUED else move.text
            job.outcome, job.error = _record(sealer, new_row, output, brief=brief), None

        return future if joinable.join(finish, job) else None

    async def append_text(
        self, task_id: str, text: str, *, at: int | None = None, attempt: int | None = None
    ) -> int:
        def operation(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT state, output_chars, attempts FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
            if row is None:
                raise _not_found(task_id)
            check_attempt(task_id, row[2], attempt)
            state = common_pb2.TaskState.ValueType(row[0])
            check_takes_text(task_id, state)
            unstored = unstored_text(task_id, text, at, row[1])
            if not unstored and text:  # all of it is here already: the latest event's offset
                return _next_offset(conn, "events", task_id) - 1
            offset = _insert_text(conn, self.sealer, task_id, state, unstored)
            conn.execute(
                "UPDATE tasks SET updated_at = ?, output_chars = output_chars + ? "
                "WHERE task_id = ?",
                (self._clock(), len(unstored), task_id),
            )
            return offset

        return await self._run(operation, small=True)

    async def events(
        self, task_id: str, offset: int = 0, limit: int = MAX_EVENTS_PER_READ
    ) -> builtins.list[TaskEvent]:
        check_event_range(offset, limit)

        def operation(conn: sqlite3.Connection) -> builtins.list[TaskEvent]:
            _require_task(conn, task_id)
            rows = conn.execute(
                "SELECT seq, kind, state, text, finish_reason FROM events "
                "WHERE task_id = ? AND seq >= ? ORDER BY seq LIMIT ?",
                (task_id, offset, limit),
            ).fetchall()
            return [
                TaskEvent(
                    offset=seq,
                    kind="state" if kind == "state" else "text",
                    state=common_pb2.TaskState.ValueType(state),
                    text=self.sealer.open_text(task_id, EVENT, text),
                    finish_reason=common_pb2.FinishReason.ValueType(finish_reason),
                )
                for seq, kind, state, text, finish_reason in rows
            ]

        return await self._run(operation, writes=False)

    async def add_trace_step(self, task_id: str, step: bytes) -> None:
        def operation(conn: sqlite3.Connection) -> None:
            _require_task(conn, task_id)
            _insert_steps(conn, self.sealer, task_id, (step,))

        await self._run(operation, small=True)

    async def trace(self, task_id: str) -> builtins.list[bytes]:
        def operation(conn: sqlite3.Connection) -> builtins.list[bytes]:
            _require_task(conn, task_id)
            rows = conn.execute(
                "SELECT step FROM traces WHERE task_id = ? ORDER BY seq", (task_id,)
            ).fetchall()
            return [self.sealer.open(task_id, TRACE, step) for (step,) in rows]

        return await self._run(operation, writes=False)

    async def list(
        self,
        tenant: str | None = None,
        state: TaskState | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> tuple[builtins.list[TaskRecord], str]:
        check_page_size(page_size)
        after = decode_page_token(page_token) if page_token else None
        clauses: builtins.list[str] = []
        params: builtins.list[Any] = []
        if tenant is not None:
            clauses.append("tenant = ?")
            params.append(tenant)
        if state is not None:
            clauses.append("state = ?")
            params.append(int(state))
        if after is not None:
            clauses.append("(created_at, task_id) < (?, ?)")
            params.extend(after)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        query = (
            f"SELECT {TASK_COLUMNS} FROM tasks {where} "
            "ORDER BY created_at DESC, task_id DESC LIMIT ?"
        )

        def operation(conn: sqlite3.Connection) -> tuple[builtins.list[TaskRecord], str]:
            rows = conn.execute(query, (*params, page_size + 1)).fetchall()
            page = rows[:page_size]
            outputs = _outputs(conn, self.sealer, page)
            records = [_record(self.sealer, row, outputs.get(row[0], "")) for row in page]
            more = len(rows) > page_size
            token = encode_page_token(page[-1][6], page[-1][0]) if more else ""
            return records, token

        return await self._run(operation, writes=False)

    async def recover(self, requeue_running: bool = True, max_attempts: int = 3) -> RecoveryReport:
        check_max_attempts(max_attempts)

        def operation(conn: sqlite3.Connection) -> RecoveryReport:
            requeued: builtins.list[str] = []
            failed: builtins.list[str] = []
            running = conn.execute(
                f"SELECT {TASK_COLUMNS} FROM tasks WHERE state = ? ORDER BY created_at, task_id",
                (int(RUNNING),),
            ).fetchall()
            now = self._clock()
            for row in running:
                again, reason = recovery_error(row[12] + 1, max_attempts, requeue_running)
                to_state = QUEUED if again else FAILED
                move = _Move(
                    to_state,
                    now,
                    finish_reason_for(row[0], to_state, None),
                    error=reason,
                    interrupted=True,
                )
                _apply_transition(conn, self.sealer, row, move)
                (requeued if again else failed).append(row[0])
            queued = conn.execute(
                "SELECT task_id FROM tasks WHERE state = ? ORDER BY created_at, task_id",
                (int(QUEUED),),
            ).fetchall()
            return RecoveryReport(
                queued=tuple(task_id for (task_id,) in queued),
                requeued=tuple(requeued),
                failed=tuple(failed),
            )

        return await self._run(operation)

    async def forget_tenant(self, tenant: str) -> int:
        copier = self._copier

        def operation(conn: sqlite3.Connection) -> int:
            with _transaction(conn, write=True):
                for table in PER_TASK_TABLES:
                    conn.execute(
                        f"DELETE FROM {table} WHERE task_id IN "
                        "(SELECT task_id FROM tasks WHERE tenant = ?)",
                        (tenant,),
                    )
                deleted = conn.execute("DELETE FROM tasks WHERE tenant = ?", (tenant,)).rowcount
            copier.truncate(conn)
            return int(deleted)

        return await self._run(operation, alone=True)

    async def add_subjects(self, task_id: str, tokens: Sequence[bytes]) -> None:
        rows = [(bytes(token), task_id) for token in tokens]

        def operation(conn: sqlite3.Connection) -> None:
            _require_task(conn, task_id)
            conn.executemany("INSERT OR IGNORE INTO subjects (token, task_id) VALUES (?, ?)", rows)

        await self._run(operation, small=True)

    async def find_subject(self, tenant: str, tokens: Sequence[bytes]) -> builtins.list[str]:
        wanted = [bytes(token) for token in tokens]
        if not wanted:
            return []
        marks = ", ".join("?" for _ in wanted)

        def operation(conn: sqlite3.Connection) -> builtins.list[str]:
            rows = conn.execute(
                "SELECT DISTINCT s.task_id FROM subjects AS s JOIN tasks AS t "
                f"ON t.task_id = s.task_id WHERE t.tenant = ? AND s.token IN ({marks}) "
                "ORDER BY s.task_id",
                (tenant, *wanted),
            ).fetchall()
            return [str(task_id) for (task_id,) in rows]

        return await self._run(operation, writes=False)

    async def delete(self, task_ids: Sequence[str]) -> int:
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return 0
        copier = self._copier

        def operation(conn: sqlite3.Connection) -> int:
            with _transaction(conn, write=True):
                deleted = _delete_tasks(conn, ids)
            copier.truncate(conn)
            return deleted

        return await self._run(operation, alone=True)

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
        clauses = ["created_at < ?"]
        params: builtins.list[Any] = [created_before]
        if tenant is not None:  # the tenant index, else the creation-time index
            clauses.append("tenant = ?")
            params.append(tenant)
        if after is not None:
            clauses.append("(created_at, task_id) > (?, ?)")
            params.extend(after)
        query = (
            f"SELECT task_id, tenant, state, created_at FROM tasks WHERE {' AND '.join(clauses)} "
            "ORDER BY created_at, task_id LIMIT ?"
        )
        kept = frozenset(keep)
        copier = self._copier

        def operation(conn: sqlite3.Connection) -> Expiry:
            rows = conn.execute(query, (*params, limit)).fetchall()
            doomed = [
                str(task_id)
                for task_id, owner, state, _ in rows
                if state in FINAL_STATES and (tenant is not None or owner not in kept)
            ]
            if doomed:
                with _transaction(conn, write=True):
                    _delete_tasks(conn, doomed)
                copier.truncate(conn)
            last = (float(rows[-1][3]), str(rows[-1][0])) if len(rows) == limit else None
            return Expiry(tuple(doomed), last)

        return await self._run(operation, alone=True)

    async def scrub(self) -> builtins.list[str]:
        """Every deletion already scrubbed the freed pages and the WAL, unless a reader in
        another process kept the WAL then: try once more, and name what is left."""
        copier = self._copier

        def operation(conn: sqlite3.Connection) -> builtins.list[str]:
            if copier.truncate(conn):
                return []
            return [
                f"{self.path}-wal still holds frames written before the deletion: another "
                f"process kept a read transaction open on {self.path} for over "
                f"{BUSY_TIMEOUT_S:g} s; end it and forget again to empty the WAL"
            ]

        return await self._run(operation, alone=True)

    async def rewrap(self, cursor: str = "", limit: int = 200) -> RewrapReport:
        position = _decode_cursor(cursor)
        sealer = self.sealer

        def operation(conn: sqlite3.Connection) -> RewrapReport:
            column, after_id, after_seq = position
            scanned = rewrapped = failed = 0
            while column < len(SEALED_COLUMNS) and scanned < limit:
                table, name, field, key = SEALED_COLUMNS[column]
                seq = "seq" if table != "tasks" else "0"
                order = "task_id, seq" if table != "tasks" else "task_id"
                want = limit - scanned
                rows = conn.execute(
                    f"SELECT task_id, {seq}, {name} FROM {table} "
                    f"WHERE ({key}) > (?, ?) ORDER BY {order} LIMIT ?",
                    (after_id, after_seq, want),
                ).fetchall()
                scanned += len(rows)
                for task_id, number, value in rows:
                    try:
                        fresh = sealer.rewrap(task_id, field, value)
                    except LlmosError:
                        failed += 1
                        continue
                    if fresh is not None:
                        conn.execute(
                            f"UPDATE {table} SET {name} = ? WHERE ({key}) = (?, ?)",
                            (fresh, task_id, number),
                        )
                        rewrapped += 1
                if len(rows) < want:
                    column, after_id, after_seq = column + 1, "", -1
                else:
                    after_id, after_seq = rows[-1][0], rows[-1][1]
            done = column >= len(SEALED_COLUMNS)
            return RewrapReport(
                scanned=scanned,
                rewrapped=rewrapped,
                failed=failed,
                cursor="" if done else json.dumps([column, after_id, after_seq]),
            )

        return await self._run(operation)

    async def key_usage(self) -> dict[str, int]:
        def operation(conn: sqlite3.Connection) -> dict[str, int]:
            counts: dict[str, int] = {}
            for table, name, _, _ in SEALED_COLUMNS:
                for key_id, count in conn.execute(
                    f"SELECT substr({name}, 2, instr({name}, x'00') - 2), COUNT(*) "
                    f"FROM {table} WHERE length({name}) > 0 GROUP BY 1"
                ):
                    label = bytes(key_id).decode("ascii", "replace") if key_id else "?"
                    counts[label] = counts.get(label, 0) + int(count)
            return counts

        return await self._run(operation, writes=False)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._checkpoint is not None:  # its copy ends before the copier closes
                await asyncio.wait([self._checkpoint])
            await asyncio.to_thread(self._copier.close)
            # Queued behind every operation already submitted, which therefore complete;
            # the thread ends once it closed the connection.
            await self._run(_close_connection, alone=True, last=True)
        finally:
            os.close(self._lock_fd)


def _delete_tasks(conn: sqlite3.Connection, task_ids: builtins.list[str]) -> int:
    """Delete the tasks and every row keyed by them (the caller holds the transaction)."""
    deleted = 0
    for start in range(0, len(task_ids), 500):  # under SQLite's bound-parameter limit
        chunk = task_ids[start : start + 500]
        marks = ", ".join("?" for _ in chunk)
        for table in PER_TASK_TABLES:
            conn.execute(f"DELETE FROM {table} WHERE task_id IN ({marks})", chunk)
        deleted += conn.execute(f"DELETE FROM tasks WHERE task_id IN ({marks})", chunk).rowcount
    return int(deleted)


def _close_connection(conn: sqlite3.Connection) -> None:
    conn.close()


def _outputs(
    conn: sqlite3.Connection, sealer: Sealer, rows: builtins.list[tuple[Any, ...]]
) -> dict[str, str]:
    """The current attempt's output of each task in `rows`, in one query."""
    if not rows:
        return {}
    marks = ", ".join("?" for _ in rows)
    texts: dict[str, builtins.list[str]] = {}
    for task_id, text in conn.execute(
        "SELECT e.task_id, e.text FROM events AS e JOIN tasks AS t ON t.task_id = e.task_id "
        f"WHERE e.task_id IN ({marks}) AND e.kind = 'text' AND e.seq >= t.attempt_offset "
        "ORDER BY e.task_id, e.seq",
        [row[0] for row in rows],
    ):
        texts.setdefault(task_id, []).append(sealer.open_text(task_id, EVENT, text))
    return {task_id: "".join(parts) for task_id, parts in texts.items()}


def _lock(path: Path) -> int:
    """An exclusive, non-blocking flock on `path`; the fd holds it until closed or death."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise FailedPrecondition(
            f"the task store in {path.parent} is in use by another process (a kernel already "
            "runs on this data directory); stop it, or give this one its own data directory",
            reason="STORE_LOCKED",
        ) from exc
    return fd


def _open_files(
    path: Path, synchronous: str, sealer: Sealer
) -> tuple[sqlite3.Connection, _Copier, int]:
    """On the store's thread: create the directory, take the lock, connect (the writer's
    connection, then the copier's, once the schema is there). Blocking work."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = _lock(path.parent / LOCK_NAME)
    try:
        conn = _connect(path, synchronous, sealer)
        try:
            return conn, _Copier(path, synchronous), lock_fd
        except BaseException:
            conn.close()
            raise
    except BaseException:
        os.close(lock_fd)
        raise


def _connect(path: Path, synchronous: str, sealer: Sealer) -> sqlite3.Connection:
    """Open the file, set it up, and create or upgrade the schema."""
    # The writer's lock, not sqlite3's same-thread check, keeps it to one thread at a time.
    conn = sqlite3.connect(
        path, isolation_level=None, timeout=BUSY_TIMEOUT_S, check_same_thread=False
    )
    try:
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise FailedPrecondition(
                f"{path}: SQLite refused WAL mode (got {mode!r}); is the file on a network "
                "file system?",
                reason="STORE_NO_WAL",
            )
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # the thread checkpoints instead
        with _transaction(conn, write=True):
            _migrate(conn, path, sealer)
        # Old WAL frames may hold what an upgrade just sealed, or a crashed run's pages.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA busy_timeout = 0")  # raised by the thread for its batches
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection, path: Path, sealer: Sealer) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version "
        "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    (version,) = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
    if version > SCHEMA_VERSION:
        raise FailedPrecondition(
            f"{path} has task-store schema version {version}, newer than this llmos "
            f"understands ({SCHEMA_VERSION}); upgrade llmos or use another data directory",
            reason="STORE_SCHEMA_TOO_NEW",
        )
    if version == 0:
        for statement in SCHEMA_V1:
            conn.execute(statement)
        version = 1  # then every upgrade, as for an old file (nothing to seal yet)
        conn.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
            (version, time.time()),
        )
    while version < SCHEMA_VERSION:
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
        if version == 2:
            _seal_rows(conn, sealer)
        version += 1
        conn.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
            (version, time.time()),
        )


def _seal_rows(conn: sqlite3.Connection, sealer: Sealer) -> None:
    """Upgrade 2 -> 3: seal every text column an older file kept in the clear."""
    for table, column, field, key in SEALED_COLUMNS:
        rows = conn.execute(f"SELECT {key}, {column} FROM {table}").fetchall()
        for task_id, seq, value in rows:
            plain = value.encode() if isinstance(value, str) else bytes(value)
            conn.execute(
                f"UPDATE {table} SET {column} = ? WHERE task_id = ?"
                + (" AND seq = ?" if table != "tasks" else ""),
                (sealer.seal(task_id, field, plain), task_id)
                + ((seq,) if table != "tasks" else ()),
            )


def _decode_cursor(cursor: str) -> tuple[int, str, int]:
    """A `rewrap` position: (index into SEALED_COLUMNS, task id, seq) after which to go on."""
    if not cursor:
        return 0, "", -1
    try:
        column, task_id, seq = json.loads(cursor)
        return int(column), str(task_id), int(seq)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(
            'rewrap cursor is not one this store returned; pass "" to start a pass',
            reason="BAD_CURSOR",
        ) from exc
