"""The task-store contract: what every backend (SQLite now, Redis later) promises the kernel.

The kernel accepts a task, answers the client with its id, and runs it later; the store is
what makes "accepted" mean "will reach a final state, even across a kernel crash". So the
contract is small and strict:

- A task is a `TaskRecord` plus an append-only log of `TaskEvent`s (state changes and
  generated text, each with a per-task offset the store assigns) plus its trace steps.
  `WatchTask` replays the log from any offset, so a client that reconnects resumes exactly
  where it left off.
- State changes go through `transition`, which allows only the moves in `TRANSITIONS` and
  writes the new state and its "state" event in one atomic step (with, when the kernel
  passes them, the text and trace steps the attempt produced since its last write: one
  round trip where there would be several). Applying the same final
  transition twice is a no-op that returns the stored record (a worker that retries its
  completion, or two deliveries of the same queued message, must not produce two results);
  any other move out of a final state is refused.
- `recover` runs at kernel start: nothing that was RUNNING when the kernel died is left
  RUNNING, and nothing is dropped; it is re-queued or failed with a reason.

The rules that do not depend on the storage (the transition table, page tokens, argument
checks) live here as plain functions so that every backend enforces exactly the same ones;
the contract tests in tests/contract/test_task_store.py run unchanged against each backend.
"""

from __future__ import annotations

import abc
import base64
import binascii
import builtins
import dataclasses
import json
import math
from collections.abc import Callable, Collection, Sequence
from typing import Literal, TypeAlias

from llmos.services.errors import FailedPrecondition, InvalidArgument, LlmosError, NotFound
from llmos.v1 import common_pb2

TaskState: TypeAlias = common_pb2.TaskState.ValueType
FinishReason: TypeAlias = common_pb2.FinishReason.ValueType
Priority: TypeAlias = common_pb2.Priority.ValueType
EventKind: TypeAlias = Literal["state", "text"]

QUEUED = common_pb2.TASK_STATE_QUEUED
RUNNING = common_pb2.TASK_STATE_RUNNING
SUCCEEDED = common_pb2.TASK_STATE_SUCCEEDED
FAILED = common_pb2.TASK_STATE_FAILED
CANCELLED = common_pb2.TASK_STATE_CANCELLED
REFUSED = common_pb2.TASK_STATE_REFUSED

FINAL_STATES: frozenset[TaskState] = frozenset({SUCCEEDED, FAILED, CANCELLED, REFUSED})
# The finish reasons the protocol defines, as a set once: `FinishReason.values()` builds a
# list on every call, and every final transition checks its reason against them.
FINISH_REASONS: frozenset[FinishReason] = frozenset(common_pb2.FinishReason.values())

# Every legal move. RUNNING -> QUEUED is the re-queue of an interrupted attempt (a kernel
# that crashed or stopped while it ran); it counts the attempt in `attempts`.
TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    QUEUED: frozenset({RUNNING, CANCELLED, REFUSED, FAILED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLED, QUEUED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
    REFUSED: frozenset(),
}

# The finish reason a final state gets when the caller gives none, so that a FAILED or
# CANCELLED task never reads "unspecified" to a client.
DEFAULT_FINISH_REASON: dict[TaskState, FinishReason] = {
    FAILED: common_pb2.FINISH_REASON_ERROR,
    CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
}

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_EVENTS_PER_READ = 1000


def state_name(state: int) -> str:
    """ "RUNNING" for TASK_STATE_RUNNING, for messages people read."""
    try:
        return common_pb2.TaskState.Name(common_pb2.TaskState.ValueType(state)).removeprefix(
            "TASK_STATE_"
        )
    except ValueError:
        return str(state)


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    """One task as stored: what was asked, where it stands, and what it produced so far.

    `request` is a serialized `kernel_pb2.GenerateRequest` and `usage` a serialized
    `common_pb2.Usage` (b"" until known): the store keeps bytes and never parses them, so the
    proto can evolve without a store migration. Times are epoch seconds. `output` is the text
    of the current attempt (a re-queue starts it afresh; the earlier text stays in the event
    log). `error` says why the task is not (yet) a success: set by FAILED, CANCELLED,
    REFUSED and re-queues when a reason is given, cleared by SUCCEEDED. `attempts` counts
    interrupted attempts (re-queues), so it is 0 for a task that ran once.
    """

    task_id: str
    tenant: str
    state: TaskState
    model: str
    priority: Priority
    request: bytes
    created_at: float
    updated_at: float
    finished_at: float | None = None
    finish_reason: FinishReason = common_pb2.FINISH_REASON_UNSPECIFIED
    usage: bytes = b""
    output: str = ""
    error: str = ""
    attempts: int = 0

    @classmethod
    def queued(
        cls,
        task_id: str,
        *,
        tenant: str,
        model: str,
        priority: Priority,
        request: bytes,
        now: float,
    ) -> TaskRecord:
        """A freshly accepted task, as `TaskStore.create` expects it."""
        return cls(
            task_id=task_id,
            tenant=tenant,
            state=QUEUED,
            model=model,
            priority=priority,
            request=request,
            created_at=now,
            updated_at=now,
        )

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


@dataclasses.dataclass(frozen=True)
class TaskEvent:
    """One entry of a task's log, as `WatchTask` streams it.

    `offset` is 0-based and consecutive per task (the store assigns it), so a client resumes
    with the offset after the last one it saw. A "state" event records a transition: `state`
    is the new state, `text` the reason when one was given (e.g. why a task was re-queued or
    failed), `finish_reason` is set on final states. A "text" event carries generated text
    in `text`; its `state` is the task's state when it was appended (RUNNING).
    """

    offset: int
    kind: EventKind
    state: TaskState
    text: str = ""
    finish_reason: FinishReason = common_pb2.FINISH_REASON_UNSPECIFIED


@dataclasses.dataclass(frozen=True)
class RecoveryReport:
    """What `recover` did, so the kernel can log it and schedule the work again.

    `queued` holds every task that is QUEUED after recovery (those that were queued before
    the crash and those just re-queued), oldest first: the kernel runs them again.
    `requeued` and `failed` are the RUNNING tasks found, by what happened to them.
    """

    queued: tuple[str, ...] = ()
    requeued: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()


# The most tasks one `expire` call examines (and so deletes): bounds a sweep's work.
MAX_EXPIRE_BATCH = 1000


@dataclasses.dataclass(frozen=True)
class Expiry:
    """What one `expire` call did, and where the next should go on.

    `deleted` are the task ids deleted. `resume_after` is the (created_at, task_id) of the
    last task examined when the call stopped at its `limit` (there may be more to expire
    after it), None when it reached the end of what was old enough: the next sweep then
    starts from the oldest again.
    """

    deleted: tuple[str, ...] = ()
    resume_after: tuple[float, str] | None = None


def check_expire_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_EXPIRE_BATCH:
        raise InvalidArgument(
            f"limit must be between 1 and {MAX_EXPIRE_BATCH}, got {limit}", reason="BAD_LIMIT"
        )


@dataclasses.dataclass(frozen=True)
class RewrapReport:
    """One `rewrap` step: values looked at, moved to the active key, that could not be
    opened (left as they are), and where the next step goes on ("" once a pass is done)."""

    scanned: int
    rewrapped: int
    failed: int
    cursor: str


def check_transition(task_id: str, current: TaskState, to_state: TaskState) -> bool:
    """Whether `current -> to_state` should be applied (True) or is an idempotent repeat.

    False means the task already sits in the final state asked for, so the caller returns the
    stored record unchanged. Anything else illegal raises: an unknown target state is
    InvalidArgument(BAD_TASK_STATE), a move out of a final state
    FailedPrecondition(TASK_FINISHED), any other move not in `TRANSITIONS`
    FailedPrecondition(ILLEGAL_TRANSITION).
    """
    if to_state not in TRANSITIONS:
        raise InvalidArgument(
            f"task {task_id}: {to_state} is not a task state to move to; use one of "
            f"{sorted(state_name(state) for state in TRANSITIONS)}",
            reason="BAD_TASK_STATE",
        )
    if current in FINAL_STATES:
        if current == to_state:
            return False
        raise FailedPrecondition(
            f"task {task_id} already finished as {state_name(current)}; "
            f"it cannot become {state_name(to_state)}",
            reason="TASK_FINISHED",
            metadata={"task_id": task_id, "state": state_name(current)},
        )
    if to_state not in TRANSITIONS.get(current, frozenset()):
        raise FailedPrecondition(
            f"task {task_id} is {state_name(current)} and cannot move to "
            f"{state_name(to_state)}; from {state_name(current)} it may become "
            f"{sorted(state_name(state) for state in TRANSITIONS.get(current, frozenset()))}",
            reason="ILLEGAL_TRANSITION",
            metadata={"task_id": task_id, "state": state_name(current)},
        )
    return True


def finished_or_gone(error: LlmosError) -> bool:
    """Whether a write was refused because the task is final (`check_transition`'s
    TASK_FINISHED) or no longer exists: then nothing of it is left to run or to end."""
    return isinstance(error, NotFound) or error.reason == "TASK_FINISHED"


def finish_reason_for(
    task_id: str, to_state: TaskState, given: FinishReason | None
) -> FinishReason:
    """The finish reason to store on entering `to_state`.

    Only final states have one; a reason given for any other state is a caller's mistake,
    InvalidArgument(BAD_FINISH_REASON), rather than something silently dropped.
    """
    if given is not None and given not in FINISH_REASONS:
        raise InvalidArgument(
            f"task {task_id}: {given} is not a finish reason", reason="BAD_FINISH_REASON"
        )
    if to_state in FINAL_STATES:
        if given is None or given == common_pb2.FINISH_REASON_UNSPECIFIED:
            return DEFAULT_FINISH_REASON.get(to_state, common_pb2.FINISH_REASON_UNSPECIFIED)
        return given
    if given is not None and given != common_pb2.FINISH_REASON_UNSPECIFIED:
        raise InvalidArgument(
            f"task {task_id}: only a final state has a finish reason, not {state_name(to_state)}",
            reason="BAD_FINISH_REASON",
        )
    return common_pb2.FINISH_REASON_UNSPECIFIED


def check_takes_text(task_id: str, state: TaskState) -> None:
    """Only a RUNNING task produces text: FailedPrecondition(TASK_FINISHED) once it is final,
    FailedPrecondition(TASK_NOT_RUNNING) in any other state."""
    if state in FINAL_STATES:
        raise FailedPrecondition(
            f"task {task_id} already finished as {state_name(state)}; it takes no more text",
            reason="TASK_FINISHED",
            metadata={"task_id": task_id, "state": state_name(state)},
        )
    if state != RUNNING:
        raise FailedPrecondition(
            f"task {task_id} is {state_name(state)}; only a RUNNING task produces text",
            reason="TASK_NOT_RUNNING",
            metadata={"task_id": task_id, "state": state_name(state)},
        )


def check_attempt(task_id: str, attempts: int, attempt: int | None) -> None:
    """A write of attempt `attempt` (the task's `attempts` when that attempt began; None:
    unchecked) to a task whose count is now `attempts`: FailedPrecondition(ATTEMPT_OVER)
    when they differ. The task was re-queued since, by the kernel that took it over when
    the writer's claim lapsed; the writer's late text or end must not land in the new
    attempt."""
    if attempt is not None and attempt != attempts:
        raise FailedPrecondition(
            f"task {task_id} was queued again since this attempt began (it is in attempt "
            f"{attempts + 1}, the write is from attempt {attempt + 1}): another kernel took it "
            "over, and this attempt's writes are dropped",
            reason="ATTEMPT_OVER",
            metadata={"task_id": task_id},
        )


def unstored_text(task_id: str, text: str, at: int | None, stored: int) -> str:
    """The part of `text` a store still lacks, for a write that says where `text` starts.

    `at` is the caller's count of the attempt's output characters before `text` (None: no
    count, keep it all); `stored` is the store's own count. A write whose reply was lost
    (Redis dropped the connection after running it) is sent again, alone or joined with
    newer text: what the store already holds is dropped from the front, so the output never
    holds a piece twice. A store that holds fewer characters than `at` lacks an earlier
    write: FailedPrecondition(OUTPUT_GAP), and nothing is applied.
    """
    if at is None:
        return text
    if at < 0:
        raise InvalidArgument(
            f"task {task_id}: a text write starts at character {at}; it must be 0 or more",
            reason="BAD_TEXT_OFFSET",
        )
    if stored < at:
        raise FailedPrecondition(
            f"task {task_id} holds {stored} characters of output, and this text starts at "
            f"character {at}: an earlier write is missing (or another attempt owns the task)",
            reason="OUTPUT_GAP",
            metadata={"task_id": task_id},
        )
    return text[stored - at :]


def briefly(record: TaskRecord) -> TaskRecord:
    """`record` without its request and output, as `TaskStore.transition(brief=True)`
    returns it."""
    return dataclasses.replace(record, request=b"", output="")


def check_new_record(record: TaskRecord) -> None:
    """`create` accepts only a freshly queued task: the log must start with QUEUED."""
    if not record.task_id:
        raise InvalidArgument("a task needs a non-empty task_id", reason="BAD_TASK_ID")
    if record.state != QUEUED:
        raise InvalidArgument(
            f"task {record.task_id}: a new task must be QUEUED, not {state_name(record.state)}; "
            "create it queued, then transition it",
            reason="BAD_TASK_STATE",
        )
    if record.finished_at is not None or record.attempts < 0 or record.output:
        raise InvalidArgument(
            f"task {record.task_id}: a new task has no finished_at, no output and attempts >= 0",
            reason="BAD_TASK_RECORD",
        )


def check_page_size(page_size: int) -> None:
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(
            f"page_size must be between 1 and {MAX_PAGE_SIZE}, got {page_size}",
            reason="BAD_PAGE_SIZE",
        )


def check_event_range(offset: int, limit: int) -> None:
    if offset < 0:
        raise InvalidArgument(f"offset must be >= 0, got {offset}", reason="BAD_OFFSET")
    if not 1 <= limit <= MAX_EVENTS_PER_READ:
        raise InvalidArgument(
            f"limit must be between 1 and {MAX_EVENTS_PER_READ}, got {limit}", reason="BAD_LIMIT"
        )


def encode_page_token(created_at: float, task_id: str) -> str:
    """An opaque token naming the last record of a page (newest-first order).

    The position, not a numeric offset, so a page boundary stays put while new tasks arrive
    and old ones finish: no duplicates, no gaps.
    """
    raw = json.dumps([created_at, task_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[float, str]:
    """The (created_at, task_id) a token names; InvalidArgument(BAD_PAGE_TOKEN) otherwise."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument(
            "page_token is not one this server issued; pass the next_page_token of the "
            "previous page, or none for the first page",
            reason="BAD_PAGE_TOKEN",
        ) from exc
    if (
        isinstance(value, builtins.list)
        and len(value) == 2
        and isinstance(value[0], int | float)
        and not isinstance(value[0], bool)
        and math.isfinite(value[0])
        and isinstance(value[1], str)
    ):
        return float(value[0]), value[1]
    raise InvalidArgument(
        "page_token is not one this server issued; pass the next_page_token of the previous "
        "page, or none for the first page",
        reason="BAD_PAGE_TOKEN",
    )


class TaskStore(abc.ABC):
    """Durable tasks, their event logs and traces. Every method is a coroutine.

    Errors: an unknown task id is NotFound(TASK_NOT_FOUND) naming the id; bad arguments are
    InvalidArgument with a reason saying which (BAD_PAGE_TOKEN, BAD_PAGE_SIZE, ...); moves
    the state machine forbids are FailedPrecondition (TASK_FINISHED, ILLEGAL_TRANSITION).
    A call that is cancelled while the backend is working may still have taken effect, as
    with any remote call; the operations are atomic, so it took effect wholly or not at all.
    """

    # Whether `transition(follows_create=True)` may be called while the task's `create` is
    # still in flight: the store then orders the two itself (see `transition`).
    joins_creates = False

    @abc.abstractmethod
    async def create(self, record: TaskRecord, *, running: bool = False) -> None:
        """Store a new QUEUED task and its first event (offset 0, state QUEUED).

        A task id already stored is AlreadyExists(DUPLICATE_TASK): the kernel mints ids, so
        a duplicate is a bug or a replay, and the stored task must not be overwritten.

        `running` is for a task the kernel starts the moment it accepts it (a free slot and
        nothing queued ahead): the task is stored as `create` then `transition(RUNNING)`
        would leave it (events QUEUED at offset 0, RUNNING at offset 1), in one round trip.
        A backend that cannot write both at once writes them in that order; a crash between
        the two leaves the task QUEUED, which `recover` runs again like any queued task.
        """

    @abc.abstractmethod
    async def get(self, task_id: str) -> TaskRecord:
        """The task as stored now."""

    @abc.abstractmethod
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
        """Move the task to `to_state` and log a "state" event, atomically; the new record.

        Legal moves are `TRANSITIONS`. Entering a final state sets `finished_at` and the
        finish reason (`DEFAULT_FINISH_REASON` when none is given). RUNNING -> QUEUED counts an
        interrupted attempt (`attempts` + 1) and starts `output` afresh. `usage` and `error`
        replace the stored values when given; `error` is also the event's text. Repeating the
        final transition a task already made returns the record unchanged and logs nothing.

        `text` and `trace` let the kernel store what a running task produced since its last
        write together with the change that ends the attempt, in the same atomic step (one
        round trip instead of several): `text`, when not empty, is logged as a "text" event
        just before the "state" event, as `append_text` would (so only a RUNNING task takes
        it: FailedPrecondition(TASK_NOT_RUNNING) otherwise, and nothing is applied); `trace`
        steps are appended to the trace, in order, as `add_trace_step` would. A refused
        transition writes neither, and neither does a repeated final transition. `text_at`
        says where `text` starts in the attempt's output, and `attempt` which attempt
        writes, as for `append_text`.

        `brief` is for a caller that reads only the record's state and fields (the kernel,
        ending a task): the record comes back with `request` b"" and `output` "", which
        spares the SQLite store reading the output back and opening the sealed request.

        `follows_create` is the caller's word that it wrote nothing else for the task since
        its `create`, which may still be in flight (the kernel ends a short task before its
        first write has landed). A store that `joins_creates` then applies the transition
        after that create without the caller waiting for it, in the same step when the
        create has not started yet; if the create fails, the transition fails with it.
        Others ignore it (the caller waits for the create first).
        """

    @abc.abstractmethod
    async def append_text(
        self, task_id: str, text: str, *, at: int | None = None, attempt: int | None = None
    ) -> int:
        """Log generated text and add it to `output`, atomically; the event's offset.

        Only a RUNNING task produces text: FailedPrecondition(TASK_FINISHED) once it is final,
        FailedPrecondition(TASK_NOT_RUNNING) while it is queued. Concurrent appends get
        distinct, consecutive offsets.

        `at`, when given, is how many characters of the attempt's output come before `text`
        (the store counts them too; a re-queue starts the count again). Then a write sent
        twice is stored once: the part of `text` the store already holds is dropped
        (`unstored_text`), and when that is all of it nothing is logged and the offset is the
        task's latest event's. The kernel gives it on every write, since a Redis write whose
        reply was lost is sent again.

        `attempt`, when given, is the task's `attempts` when the writer's attempt began: a
        task queued again since refuses the write (`check_attempt`, ATTEMPT_OVER), so a
        kernel whose claim lapsed while it stalled cannot write into the attempt of the
        kernel that took the task over.
        """

    @abc.abstractmethod
    async def events(
        self, task_id: str, offset: int = 0, limit: int = MAX_EVENTS_PER_READ
    ) -> builtins.list[TaskEvent]:
        """Up to `limit` events with offsets >= `offset`, in order (empty when caught up)."""

    @abc.abstractmethod
    async def add_trace_step(self, task_id: str, step: bytes) -> None:
        """Append one serialized `common_pb2.TraceStep` to the task's trace (any state)."""

    @abc.abstractmethod
    async def trace(self, task_id: str) -> builtins.list[bytes]:
        """The task's trace steps, in the order they were added."""

    @abc.abstractmethod
    async def list(
        self,
        tenant: str | None = None,
        state: TaskState | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> tuple[builtins.list[TaskRecord], str]:
        """One page of tasks, newest first (created_at, then task_id, descending).

        Filters are optional and combine. The second value is the token for the next page,
        "" on the last one. Tokens come from `encode_page_token`.
        """

    @abc.abstractmethod
    async def recover(self, requeue_running: bool = True, max_attempts: int = 3) -> RecoveryReport:
        """Account for every unfinished task after a kernel crash; call before serving.

        Each RUNNING task was interrupted: it is re-queued (`attempts` + 1, a "state" event
        and `error` saying why), or marked FAILED (finish reason ERROR, an error saying it was
        interrupted by a kernel crash) once it has been interrupted `max_attempts` times, or
        at once when `requeue_running` is False. Returns every QUEUED task, oldest first.
        Nothing is deleted or left RUNNING.
        """

    @abc.abstractmethod
    async def forget_tenant(self, tenant: str) -> int:
        """Delete every task of `tenant` with its events, trace and subject index; the
        number of tasks. Like `delete`, whatever state the tasks are in, and leaves no
        bytes of them in the backend's live files (see `delete`)."""

    # -- retention and forgetting (docs/privacy.md "Retention and forgetting") -----------

    @abc.abstractmethod
    async def add_subjects(self, task_id: str, tokens: Sequence[bytes]) -> None:
        """Record the blind index of the task's data subjects (PrivacyService.Redact's
        `subject_index`: keyed HMACs, never values), for `find_subject`. Adding a token
        twice is a no-op. NotFound(TASK_NOT_FOUND) for an unknown task, so an index never
        outlives (or is written after) the deletion of its task."""

    @abc.abstractmethod
    async def find_subject(self, tenant: str, tokens: Sequence[bytes]) -> builtins.list[str]:
        """The ids of `tenant`'s tasks indexed under any of `tokens`, sorted."""

    @abc.abstractmethod
    async def delete(self, task_ids: Sequence[str]) -> int:
        """Delete these tasks, whatever their state, with their events, traces and subject
        index; the number that existed. Unknown ids are skipped. The caller stops a task
        before deleting it (a running task's later writes then fail with NotFound and
        create nothing). What is deleted is gone from the backend's live files too: SQLite
        overwrites the freed pages (secure_delete) and truncates the WAL; Redis deletes
        the keys, index entries and queue-stream entries that named the tasks (its
        append-only file keeps history until rewritten: `scrub`)."""

    @abc.abstractmethod
    async def expire(
        self,
        created_before: float,
        *,
        tenant: str | None = None,
        keep: Collection[str] = (),
        after: tuple[float, str] | None = None,
        limit: int = MAX_EXPIRE_BATCH,
    ) -> Expiry:
        """Delete finished tasks created before `created_before`, oldest first, as `delete`
        does: those of `tenant`, or, when it is None, of every tenant not in `keep`.

        QUEUED and RUNNING tasks are never expired, however old: a task is deleted only
        once final. Bounded work: at most `limit` tasks are examined, starting after the
        position `after` (a previous call's `resume_after`, or None for the oldest).
        """

    @abc.abstractmethod
    async def scrub(self) -> builtins.list[str]:
        """After a forget: make what was deleted unrecoverable from the backend's own files
        where it can, and say what was done or what still holds history, for the operator
        (SQLite: nothing left to do; Redis: an append-only-file rewrite started)."""

    @abc.abstractmethod
    async def rewrap(self, cursor: str = "", limit: int = 200) -> RewrapReport:
        """Move up to `limit` sealed values onto the key ring's active key (key rotation).

        Looks at about `limit` stored values from `cursor` ("" starts a pass), so one call is
        a bounded piece of work (SQLite: at most `limit`; Redis: the values of about
        `limit / 4` tasks, a SCAN step); the report's cursor continues the pass. Only the
        wrapped data key of each value is rewritten (services/keyring.py). A value that does
        not open (its key is missing, it was altered) is counted in `failed` and left as is.
        Values being written meanwhile are sealed with the active key already.
        """

    @abc.abstractmethod
    async def key_usage(self) -> dict[str, int]:
        """How many stored sealed values name each key id ("?" for one that is not an
        envelope): what `llmos keys status` shows. Reads the whole store."""

    def watch_load(self, tasks_running: Callable[[], int]) -> None:
        """Tell the store how to learn how many tasks its caller is running at once (the
        kernel's runner calls this). A backend may write differently for one task than for
        many: the SQLite store writes a lone task's changes at once on the caller's event
        loop, and many tasks' changes in shared transactions on its thread. By default the
        figure is ignored."""
        del tasks_running

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish pending work and release the backend. Idempotent; any other call made
        afterwards is FailedPrecondition(STORE_CLOSED)."""


def recovery_error(attempts: int, max_attempts: int, requeue_running: bool) -> tuple[bool, str]:
    """Whether an interrupted task with `attempts` (already counting this one) is re-queued,
    and the reason recorded for it. Shared so every backend words it the same way."""
    if not requeue_running:
        return False, (
            "interrupted by a kernel crash while running; not re-queued (re-queueing of "
            "running tasks is disabled)"
        )
    if attempts >= max_attempts:
        return False, (
            f"interrupted by a kernel crash while running; gave up after {attempts} "
            f"interrupted attempts (max_attempts={max_attempts})"
        )
    return True, (
        f"interrupted by a kernel crash while running (attempt {attempts} of {max_attempts}); "
        "re-queued"
    )


def check_max_attempts(max_attempts: int) -> None:
    if max_attempts < 1:
        raise InvalidArgument(
            f"max_attempts must be >= 1, got {max_attempts}", reason="BAD_MAX_ATTEMPTS"
        )
