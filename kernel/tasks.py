"""Tasks: every request the kernel accepts, from admission to its recorded end.

Both entry points make a task. `Submit` returns its id at once and the work runs on
without the client; `Generate` makes one too and streams it live, and a client that
disconnects cancels it. The path of a task:

1. admit — the scheduler takes a ticket (priority class, tenant, deadline) or refuses at
   once with RESOURCE_EXHAUSTED and a retry-after hint; the task is stored QUEUED;
2. dispatch — the dispatch loop asks the scheduler for the next ticket whenever work
   arrives or a slot frees; tickets whose deadline passed while queued are dropped before
   dispatch and the task FAILS with that reason;
3. run — RUNNING; the before-model stages the tenant's policy chooses (kernel/policy.py:
   plugins:before, safety:input, privacy:redact by default), the runtime's
   streamed Generate (the remaining deadline bounds it; cancelling the task cancels the
   call, which frees the runtime's batch slot), the after-model stages, then record:
   SUCCEEDED with usage, or FAILED / CANCELLED with the reason in the trace.

Every step appends a TraceStep. State and text go to the task store, so `WatchTask`
replays a task from any offset and a kernel restart loses nothing: on start, tasks that
were QUEUED or interrupted RUNNING are admitted again (`TaskStore.recover`).

With a shared work queue (several kernels on one Redis, `kernel.store.work_queue`) a
`Submit` goes onto the shared queue instead of this kernel's scheduler; a feeder takes
entries from it while this kernel has room, and acknowledges each once its final state is
stored. Recovery is then the queue's: dead kernels' entries are taken over, not recovered
at start. A `Generate` still runs where its client is connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc

from llmos.kernel import metrics as kernel_metrics
from llmos.kernel.call_endings import CallEndings
from llmos.kernel.memory import Headroom, kv_evidence
from llmos.kernel.output import OutputPath
from llmos.kernel.pending import NOTHING_TAKEN, PendingWrites
from llmos.kernel.policy import Policies, TenantPolicy
from llmos.kernel.registry import Registry
from llmos.kernel.scheduler import Dispatch, Priority, Scheduler, Ticket
from llmos.kernel.stages import Plugins, Stage, StageContext, for_policy, services_required
from llmos.kernel.store import TaskRecord, TaskStore, finished_or_gone
from llmos.kernel.store.work_queue import RedisWorkQueue, Work
from llmos.services.channels import outgoing_metadata
from llmos.services.errors import DeadlineExceeded, LlmosError, NotFound, from_rpc_error
from llmos.services.logs import request_id_var, task_id_var
from llmos.services.randomness import random_bytes
from llmos.services.timing import duration, now_timestamp, since
from llmos.v1 import common_pb2, kernel_pb2, runtime_pb2, runtime_pb2_grpc

log = logging.getLogger(__name__)

RUNTIME = "runtime"
STREAM_END = None


class _NoOutput(enum.Enum):
    NO_OUTPUT = enum.auto()


NO_OUTPUT = _NoOutput.NO_OUTPUT  # a stream's queue held nothing (`_early_output`)
# How long CancelTask waits for another kernel to stop a task it runs.
REMOTE_CANCEL_WAIT_S = 3.0
# Runtime stubs kept (one per runtime channel) before the cache starts over.
MAX_STUBS = 64
# Event-loop turns a task that started at once gets before its first write: one for the run
# to reach its first call (the runtime's, or a stage's), one for grpc.aio's task to start
# sending it, one for the request to leave. A lone task's writes are applied on the loop
# (kernel/store/sqlite.py), so without them the write would run first and the call wait
# for it; with them the call is on its way while the write runs. Measured
# (docs/performance.md): with 3 turns the request leaves before the write (with 2 it does
# not), and a sequential call ends 0.05-0.10 ms sooner. Only for a task alone on the
# kernel: under load other tasks' work fills the loop anyway, and the turns would cost CPU
# at saturation.
HEAD_START_TURNS = 3
# How long a Generate whose task started at once waits, once the task is stored, for the
# runtime's first output, so that the task id goes out with it: one message fewer for a
# short answer. A task whose output takes longer (a real model's first token) gets its id
# alone when this ends; a queued task gets it at once.
FIRST_OUTPUT_WAIT_S = 0.002


@dataclasses.dataclass
class Running:
    """A dispatched task: its asyncio task and the live listener of a Generate call."""

    task: asyncio.Task[None] | None = None
    listener: asyncio.Queue[kernel_pb2.GenerateResponse | None] | None = None
    deadline: float | None = None
    # Why it failed, kept whole (status code, reason) for the streaming client.
    error: LlmosError | None = None
    # The request id of the call that made the task, for the logs and downstream calls.
    request_id: str = ""
    # Another kernel took its queue entry over: stop without writing a state.
    lost: bool = False
    # Its final record, as this kernel stored it: the end of its stream reads it here.
    final: TaskRecord | None = None
    # The host-memory headroom this kernel saw when it admitted the task (kernel/memory.py).
    headroom: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # safety:input's refusal: the runtime is skipped and the client reads this instead.
    refusal: str | None = None
    # privacy:redact put placeholders in the request: the output is restored on its way out.
    restore: bool = False
    # A plugin with modify_output is enabled: the output is held here until plugins:after
    # has run (None: it streams live), and what plugins:after changed it to.
    held: list[runtime_pb2.RuntimeServiceGenerateResponse] | None = None
    changed_output: str | None = None
    # The outcome of the task's first write, while it may be in flight (`_accept`): True
    # stored, False refused, None not known (its caller left mid-write). None here: the
    # task was stored before it was admitted (recovered, or taken from the shared queue).
    stored: asyncio.Future[bool | None] | None = None
    # The task's `attempts` count when this run began (None until it is RUNNING): every
    # write of the run carries it, so once another kernel took the task over (this kernel
    # stalled past its claim) the run's late writes are refused (ATTEMPT_OVER).
    attempt: int | None = None
    # The run is storing its last transition (its end, or a re-queue): a cancel now waits
    # for it instead of interrupting it, or the store could hold an end the kernel never
    # finished telling (the plugins' task event, `final`) while the cancel's own end is
    # refused as TASK_FINISHED.
    ending: bool = False


class TaskRunner:
    """Admits, dispatches, runs and records tasks."""

    def __init__(
        self,
        registry: Registry,
        store: TaskStore,
        scheduler: Scheduler,
        queue: RedisWorkQueue | None = None,
        max_local: int = 64,
        *,
        policies: Policies | None = None,
        plugins: Plugins | None = None,
        headroom: Headroom | None = None,
    ) -> None:
        """`queue` is the shared work queue when several kernels share the store; then this
        kernel holds at most `max_local` tasks (queued here or running) at a time.
        `policies` choose each tenant's stages (the built-in default when None);
        `plugins` runs the plugin stages (kernel/plugins.py; None: they are skipped);
        `headroom` refuses new work when host memory is low (None: never refused)."""
        self.headroom = Headroom(registry, 0) if headroom is None else headroom
        self.policies = Policies() if policies is None else policies
        self.plugins = plugins
        self.registry = registry
        self.store = store
        self.scheduler = scheduler
        kernel_metrics.watch_scheduler(scheduler, [RUNTIME])
        self.queue = queue
        self.max_local = max_local
        self._live: dict[str, Running] = {}
        store.watch_load(self._live.__len__)
        # Text and trace steps of running tasks, written with their next transition.
        self._pending: dict[str, PendingWrites] = {}
        self._wakeup = asyncio.Event()
        # Tickets whose deadline passed while queued, for the dispatch loop to record.
        self._expired: list[Ticket] = []
        self._room = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._shared: list[asyncio.Task[None]] = []
        self._closing = False
        # A stub per runtime channel: building one makes a callable for every RPC.
        self._stubs: dict[grpc.aio.Channel, runtime_pb2_grpc.RuntimeServiceAsyncStub] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # `_event_loop`
        self._call_endings = CallEndings()

    # -- lifecycle --------------------------------------------------------------------

    @property
    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the runner serves, asked for once: CPython's `get_running_loop` asks the
        OS for the process id on every call (a system call, several per task otherwise)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._dispatch_forever(), name="dispatch")
        if self.queue is not None:
            await self.queue.start()
            self._shared = [
                asyncio.create_task(self._feed_forever(self.queue), name="feed"),
                asyncio.create_task(self._follow(self.queue.cancels, lost=False), name="cancels"),
                asyncio.create_task(self._follow(self.queue.lost, lost=True), name="lost"),
            ]
            return
        report = await self.store.recover()
        if report.queued or report.failed:
            log.info(
                "recovered tasks: %d to run again, %d failed after repeated interruption",
                len(report.queued),
                len(report.failed),
            )
        if report.queued:
            self._recovery = asyncio.create_task(self._readmit(report.queued), name="recovery")

    async def _readmit(self, task_ids: tuple[str, ...]) -> None:
        """Admit recovered tasks once the services they need have registered again (after a
        crash they re-register within a lease period); until then they wait, stored QUEUED."""
        kinds = services_required(self.policies.all()) | {common_pb2.SERVICE_KIND_RUNTIME}
        # Polled twice a second, and only while recovering: not worth a notification path.
        while not all(self.registry.serving(kind) for kind in kinds):  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        for task_id in task_ids:
            record = await self.store.get(task_id)
            if record.state != common_pb2.TASK_STATE_QUEUED:  # cancelled meanwhile
                continue
            try:
                self._admit(record, deadline=None)
            except LlmosError as error:  # a full queue: stays QUEUED for the next start
                log.warning("recovered task %s not admitted: %s", task_id, error.message)
        self._wakeup.set()

    async def close(self) -> None:
        """Stop dispatching; running tasks go back to QUEUED for the next start (with a
        shared queue: back on the queue, for any kernel)."""
        self._closing = True
        background = [self._recovery, self._loop_task, *self._shared]
        for task in background:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in background if t is not None), return_exceptions=True)
        for running in list(self._live.values()):
            if running.task is not None:
                running.task.cancel()
        await asyncio.gather(
            *(r.task for r in self._live.values() if r.task is not None), return_exceptions=True
        )
        await self._call_endings.close()
        if self.queue is not None:
            for task_id in list(self.queue.held):  # taken but never started
                with contextlib.suppress(LlmosError):
                    record = await self.store.get(task_id)
                    await self.queue.release(task_id, record.priority)
            await self.queue.close()

    # -- entry points -----------------------------------------------------------------

    async def submit(
        self,
        request: kernel_pb2.GenerateRequest,
        tenant: str,
        deadline: float | None = None,
        *,
        streamed: bool = False,
    ) -> str:
        """Accept a task: stored QUEUED and admitted to the scheduler (or, with a shared
        queue and unless `streamed`, put on the shared queue), or refused at once. Its id
        is returned once it is stored."""
        record = self._new_record(request, tenant)
        if self.queue is not None and not streamed:
            await self.queue.submit(record)  # refuses (queue full) before anything is stored
            kernel_metrics.task_entered(common_pb2.TASK_STATE_QUEUED)
            self._task_event(record, common_pb2.TASK_STATE_QUEUED)
            return record.task_id
        await self._first_write(record, *self._accept(record, deadline))
        return record.task_id

    def _new_record(self, request: kernel_pb2.GenerateRequest, tenant: str) -> TaskRecord:
        priority = Priority.from_proto(request.priority)
        self.headroom.check(priority)  # the cached figure: no call to the hardware service
        return TaskRecord.queued(
            _task_id(),
            tenant=tenant,
            model=request.model,
            priority=common_pb2.Priority.ValueType(int(priority)),
            request=request.SerializeToString(),
            now=time.time(),
        )

    def _accept(
        self,
        record: TaskRecord,
        deadline: float | None,
        listener: asyncio.Queue[kernel_pb2.GenerateResponse | None] | None = None,
    ) -> tuple[Running, bool]:
        """Admit `record` here; returns its `Running` and whether it started at once. The
        caller then stores it (`_first_write`).

        With a free slot and nothing ahead of it the task starts now, and is stored RUNNING
        by the same write that stores it: one round trip to the store, not two. And it
        starts before that write is made, so the runtime call overlaps the commit instead
        of following it (`HEAD_START_TURNS`); the run writes nothing before the write says
        the task is stored (`_stored`), and the client hears of the task only once it is."""
        self._admit(record, deadline, listener)  # refuses before anything is stored
        running = self._live[record.task_id]
        running.stored = self._event_loop.create_future()
        at_once = None if self.queue is not None else self._dispatch_ready(held=record.task_id)
        if at_once is None or at_once.ticket is None:
            return running, False
        self._start(at_once.ticket, at_once.effective, started=record)
        return running, True

    async def _first_write(self, record: TaskRecord, running: Running, started: bool) -> None:
        """Store an accepted task; undo its admission if the store refuses it. A caller
        that leaves meanwhile leaves the outcome unknown (the write may yet land)."""
        stored = running.stored
        assert stored is not None
        try:
            if started and len(self._live) == 1:  # alone: its call leaves before the write
                for _ in range(HEAD_START_TURNS):
                    await asyncio.sleep(0)
            if self.queue is not None:
                await self.queue.attach(record)
            else:
                await self.store.create(record, running=started)
        except asyncio.CancelledError:
            _settle_write(stored, None)
            raise
        except BaseException:
            _settle_write(stored, False)
            if started and running.task is not None:
                running.task.cancel()  # it writes nothing (`_stored`); its end frees the slot
            else:
                self.scheduler.cancel(record.task_id)
                self._live.pop(record.task_id, None)
            raise
        _settle_write(stored, True)
        kernel_metrics.task_entered(common_pb2.TASK_STATE_QUEUED)
        self._task_event(record, common_pb2.TASK_STATE_QUEUED)
        if started:
            kernel_metrics.task_entered(common_pb2.TASK_STATE_RUNNING)
            self._task_event(record, common_pb2.TASK_STATE_RUNNING)
        else:
            self._wakeup.set()

    async def _stored(self, task_id: str, running: Running) -> bool:
        """Whether the task is in the store, once its first write has ended. A task that
        started while that write was in flight writes nothing before this says so (a
        store may apply writes out of order), and nothing at all if it says no."""
        stored = running.stored
        if stored is None:
            return True
        if not stored.done():
            await stored  # a cancelled caller cancels it: then the store is asked
        outcome = None if stored.cancelled() else stored.result()
        if outcome is None:
            try:
                await self.store.get(task_id)
            except NotFound:
                return False
        return outcome is not False

    async def stream(
        self, request: kernel_pb2.GenerateRequest, tenant: str, deadline: float | None
    ) -> AsyncIterator[kernel_pb2.GenerateResponse]:
        """Generate: a task whose output is streamed live; leaving cancels it."""
        listener: asyncio.Queue[kernel_pb2.GenerateResponse | None] = asyncio.Queue()
        record = self._new_record(request, tenant)
        task_id = record.task_id
        running, started = self._accept(record, deadline, listener)
        try:
            await self._first_write(record, running, started)  # then the client hears of it
            first, ended = kernel_pb2.GenerateResponse(task_id=task_id), False
            head = await _early_output(listener, wait=started)
            if head is not NO_OUTPUT:  # output came before the task was stored, or soon after
                if head is STREAM_END:
                    ended = True
                else:  # the first message carries it too: one message fewer
                    head.task_id = task_id
                    first = head
            yield first
            while not ended and (piece := await listener.get()) is not STREAM_END:
                yield piece
            if running.error is not None:
                raise running.error
            record = running.final or await self.store.get(task_id)
            if record.state == common_pb2.TASK_STATE_CANCELLED:  # by CancelTask
                yield kernel_pb2.GenerateResponse(
                    task_id=task_id, finish_reason=common_pb2.FINISH_REASON_CANCELLED
                )
            elif record.state != common_pb2.TASK_STATE_SUCCEEDED:
                failure = DeadlineExceeded if "deadline" in record.error else LlmosError
                raise failure(
                    f"task {task_id} ended {common_pb2.TaskState.Name(record.state)}: "
                    f"{record.error}",
                    reason="TASK_NOT_COMPLETED",
                )
        finally:
            # Left early, or ended by another kernel (a task never stored needs nothing).
            if running.final is None and await self._stored(task_id, running):
                await self.cancel(task_id, quietly=True)

    async def cancel(self, task_id: str, *, quietly: bool = False) -> TaskRecord:
        """Cancel a queued or running task; a finished one is returned as it is."""
        record = await self.store.get(task_id)
        if record.finished:
            return record
        if self.scheduler.cancel(task_id):
            waiting = self._live.pop(task_id, None)
            self._room.set()
            try:
                record = await self._transition(
                    task_id, common_pb2.TASK_STATE_CANCELLED, error="cancelled while queued"
                )
            except LlmosError as error:
                await self._let_go(task_id, error)
                raise
            await self._settle(task_id)
            if waiting is not None and waiting.listener is not None:
                waiting.listener.put_nowait(STREAM_END)
            return record
        running = self._live.get(task_id)
        if running is not None and running.task is not None:
            if not running.ending:
                running.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, LlmosError):
                await running.task
        elif record.state == common_pb2.TASK_STATE_QUEUED:
            # Stored but not admitted here: a recovered task waiting for the services, or
            # one on the shared queue (whichever kernel takes it finds it cancelled).
            return await self._transition(
                task_id, common_pb2.TASK_STATE_CANCELLED, error="cancelled while queued"
            )
        elif self.queue is not None and record.state == common_pb2.TASK_STATE_RUNNING:
            return await self._cancel_elsewhere(self.queue, task_id)
        if not quietly:
            log.info("task %s cancelled", task_id)
        return await self.store.get(task_id)

    async def _cancel_elsewhere(self, queue: RedisWorkQueue, task_id: str) -> TaskRecord:
        """Ask the kernel running `task_id` to cancel it; wait a little for it to end."""
        await queue.publish_cancel(task_id)
        give_up = time.monotonic() + REMOTE_CANCEL_WAIT_S
        record = await self.store.get(task_id)
        while not record.finished and time.monotonic() < give_up:
            await asyncio.sleep(0.05)
            record = await self.store.get(task_id)
        return record

    async def watch(self, task_id: str, offset: int) -> AsyncIterator[kernel_pb2.WatchTaskResponse]:
        """The task's events from `offset`, following it live until it ends."""
        while True:
            events = await self.store.events(task_id, offset)
            for event in events:
                yield kernel_pb2.WatchTaskResponse(
                    offset=event.offset,
                    state=event.state,
                    text=event.text if event.kind == "text" else "",
                    finish_reason=event.finish_reason,
                )
                offset = event.offset + 1
            if not events and (await self.store.get(task_id)).finished:
                return
            if not events:
                await asyncio.sleep(0.05)

    # -- admission and dispatch ---------------------------------------------------------

    def _admit(
        self,
        record: TaskRecord,
        deadline: float | None,
        listener: asyncio.Queue[kernel_pb2.GenerateResponse | None] | None = None,
        waited_s: float = 0.0,
    ) -> None:
        """Queue `record` here; `listener` gets a Generate's pieces; `waited_s` is time it
        already spent queued elsewhere (on the shared queue), which counts towards its
        aging."""
        now = time.monotonic()
        priority = Priority.from_proto(record.priority)
        try:
            self.scheduler.admit(
                Ticket(
                    task_id=record.task_id,
                    tenant=record.tenant,
                    priority=priority,
                    service=RUNTIME,
                    enqueued_at=now - waited_s,
                    deadline=deadline,
                ),
                now,
            )
        except LlmosError as error:
            kernel_metrics.admission_refused(priority, error.reason)
            raise
        self._live[record.task_id] = Running(
            listener=listener,
            deadline=deadline,
            request_id=request_id_var.get(),
            headroom=self.headroom.evidence,
        )

    async def _settle(self, task_id: str) -> None:
        """The task's final state is stored: with a shared queue, acknowledge its entry."""
        if self.queue is not None:
            with contextlib.suppress(LlmosError):  # Redis down: it is taken over, found done
                await self.queue.done(task_id)

    async def _let_go(self, task_id: str, refused: LlmosError | None) -> None:
        """This kernel is done with the task, whose last write was stored (`refused` None)
        or refused. Its queue entry is acknowledged only when the task is final or gone:
        an unfinished one (the store unreachable past its retries) keeps its entry, which
        lapses and is taken over, so the task runs again instead of staying unfinished
        with nothing to run it; a streamed one is failed by this kernel once the store is
        back (`RedisWorkQueue.abandon`)."""
        if refused is None or finished_or_gone(refused):
            await self._settle(task_id)
        elif self.queue is not None:
            self.queue.abandon(task_id)

    # -- the shared queue -----------------------------------------------------------------

    async def _feed_forever(self, queue: RedisWorkQueue) -> None:
        """Take work from the shared queue whenever this kernel has room for it. Stops on
        `_closing` too: a cancel landing inside a Redis command may be swallowed."""
        while not self._closing:
            room = self.max_local - len(self._live)
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                works = await queue.take(room)
            except LlmosError as error:  # Redis unreachable past its retries: keep trying
                log.warning("could not take work from the shared queue: %s", error.message)
                await asyncio.sleep(1.0)
                continue
            for work in works:
                await self._take(queue, work)
            if works:
                self._wakeup.set()

    async def _take(self, queue: RedisWorkQueue, work: Work) -> None:
        try:
            record = await self.store.get(work.task_id)
        except NotFound:  # its tenant was forgotten meanwhile
            await queue.done(work.task_id)
            return
        if record.finished:  # cancelled while queued, or finished by a kernel that then died
            await queue.done(work.task_id)
            return
        if record.state == common_pb2.TASK_STATE_RUNNING:  # its kernel died mid-run
            record = await self._transition(
                work.task_id,
                common_pb2.TASK_STATE_QUEUED,
                error=f"the kernel running it stopped renewing its claim; taken over by "
                f"{queue.kernel_id} (delivery {work.deliveries})",
            )
        self._admit(record, None, waited_s=max(0.0, time.time() - record.created_at))

    async def _follow(self, task_ids: asyncio.Queue[str], *, lost: bool) -> None:
        """Cancel local tasks another kernel asked to cancel, or whose entries it took."""
        while True:
            task_id = await task_ids.get()
            running = self._live.get(task_id)
            if running is None:
                continue
            if lost:
                running.lost = True
                self.scheduler.cancel(task_id)
                if running.task is not None:
                    running.task.cancel()
                else:
                    self._live.pop(task_id, None)
            else:
                with contextlib.suppress(LlmosError):
                    await self.cancel(task_id)

    def _dispatch_ready(self, held: str = "") -> Dispatch | None:
        """Start every ticket the scheduler hands out now, except `held`'s: its dispatch is
        returned, for the caller to start once the task is stored. Tickets whose deadline
        passed while queued go to the dispatch loop, which records them FAILED. With nothing
        queued there is nothing to hand out or expire: the scheduler is not asked."""
        mine = None
        while self.scheduler.queued:
            dispatch = self.scheduler.dispatch(time.monotonic())
            if dispatch.expired:
                self._expired.extend(dispatch.expired)
                self._wakeup.set()
            if dispatch.ticket is None:
                return mine
            if dispatch.ticket.task_id == held:
                mine = dispatch
            else:
                self._start(dispatch.ticket, dispatch.effective)
        return mine

    def _start(
        self, ticket: Ticket, effective: Priority | None, started: TaskRecord | None = None
    ) -> None:
        """Run a dispatched ticket; `started` is its record when it is stored RUNNING."""
        kernel_metrics.task_dispatched(ticket.priority, time.monotonic() - ticket.enqueued_at)
        running = self._live.setdefault(ticket.task_id, Running())
        running.task = self._event_loop.create_task(
            self._run(ticket, effective, started), name=ticket.task_id
        )

    async def _dispatch_forever(self) -> None:
        while True:
            self._dispatch_ready()
            if self._expired:
                expired = self._expired.pop(0)
                await self._end_unrun(expired.task_id, "its deadline passed while it was queued")
                self._room.set()
                continue
            next_deadline = self.scheduler.next_deadline()
            timeout = None if next_deadline is None else max(0.0, next_deadline - time.monotonic())
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _end_unrun(self, task_id: str, why: str) -> None:
        running = self._live.pop(task_id, None)
        refused = None
        try:
            await self._transition(task_id, common_pb2.TASK_STATE_FAILED, error=why, brief=True)
        except LlmosError as error:
            refused = error
        await self._let_go(task_id, refused)
        if running is not None and running.listener is not None:
            running.listener.put_nowait(STREAM_END)

    # -- running one task -------------------------------------------------------------

    async def _run(
        self, ticket: Ticket, effective: Priority | None, started: TaskRecord | None = None
    ) -> None:
        """Run a dispatched task to its end; `started` is its record if it is already
        stored RUNNING (by `submit`), else this moves it to RUNNING first."""
        task_id_var.set(ticket.task_id)
        running = self._live[ticket.task_id]
        request_id_var.set(running.request_id)
        try:
            record = started or await self._transition(
                ticket.task_id, common_pb2.TASK_STATE_RUNNING
            )
        except LlmosError as error:  # cancelled through another kernel before it started
            await self._not_started(ticket.task_id, running, error)
            return
        running.attempt = record.attempts
        policy = self.policies.for_tenant(ticket.tenant)
        before, after = for_policy(policy)
        await self._trace(ticket.task_id, self._admit_step(ticket, effective, running, policy))
        request = kernel_pb2.GenerateRequest.FromString(record.request)
        if any(stage.name == "plugins:after" for stage in after) and (
            self.plugins is not None and self.plugins.holds_output()
        ):
            running.held = []  # a plugin may replace the output: hold it until then
        try:
            # plugins:before may change the prompt: the model gets the request as it leaves.
            request = await self._stages(before, ticket, request, running.deadline)
            # The runtime's queue orders by the class the task was dispatched at.
            request.priority = common_pb2.Priority.ValueType(int(effective or ticket.priority))
            output, usage = await self._generate(ticket, request, running)
            await self._stages(after, ticket, request, running.deadline, output)
            self._deliver_held(ticket.task_id, running)
            # Done before its first write landed (common under load): the store applies the
            # end after that write, with it if it can; it fails if that write did.
            joins = started is not None and self._first_write_pending(running)
            if not joins and not await self._stored(ticket.task_id, running):
                return  # refused: nothing to record
            running.ending = True
            await self._transition(
                ticket.task_id,
                common_pb2.TASK_STATE_SUCCEEDED,
                finish_reason=usage.finish_reason,
                usage=usage.usage.SerializeToString(),
                steps=(_record_step("succeeded"),),
                brief=True,
                follows_create=joins,
            )
            await self._settle(ticket.task_id)
        except asyncio.CancelledError:
            if running.lost:  # another kernel runs it now; it writes the outcome
                raise
            if not await self._stored(ticket.task_id, running):  # never stored: no state
                raise
            if self._closing:  # a planned stop: run it again at the next start
                await asyncio.shield(self._requeue(ticket.task_id, record.priority))
            else:
                await asyncio.shield(
                    self._finish(ticket.task_id, common_pb2.TASK_STATE_CANCELLED, "cancelled")
                )
            raise
        except LlmosError as error:
            running.error = error
            await self._failed(ticket.task_id, running, f"{error.reason}: {error.message}")
        except Exception as error:  # recorded, never lost; the kernel keeps serving
            log.exception("task failed unexpectedly")
            await self._failed(ticket.task_id, running, repr(error))
        finally:
            self._forget(ticket.task_id, running)

    async def _not_started(self, task_id: str, running: Running, error: LlmosError) -> None:
        """Its start was refused: free its slot. Its queue entry is acknowledged only when
        the task is final or gone; an unfinished one keeps its entry, to be run again."""
        log.info("task %s not started: %s", task_id, error.message)
        self._forget(task_id, running)
        await self._let_go(task_id, error)

    def _admit_step(
        self, ticket: Ticket, effective: Priority | None, running: Running, policy: TenantPolicy
    ) -> common_pb2.TraceStep:
        """The `admit` trace step: how the task was scheduled and under which policy."""
        evidence = {
            "policy": policy.name,  # chose the stages: one it leaves out writes no step
            "tenant": ticket.tenant,
            "priority": ticket.priority.label,
            "ran_as": (effective or ticket.priority).label,
        }
        evidence.update(running.headroom)
        if self.queue is not None:
            evidence["kernel"] = self.queue.kernel_id
        return common_pb2.TraceStep(
            stage="admit",
            service="kernel",
            started_at=now_timestamp(),
            duration=duration(time.monotonic() - ticket.enqueued_at),
            decision="dispatched",
            reason="scheduled by priority class, tenant fair share and deadline",
            evidence=evidence,
        )

    def _first_write_pending(self, running: Running) -> bool:
        """Whether the task's first write is in flight and the store can take the task's
        next transition before it lands (`TaskStore.joins_creates`). Nothing else of the
        task's is written meanwhile: every other write waits for `_stored`."""
        stored = running.stored
        return self.store.joins_creates and stored is not None and not stored.done()

    def _forget(self, task_id: str, running: Running) -> None:
        """The task no longer occupies this kernel: free its slot and end its stream."""
        self.scheduler.release(task_id)
        self._live.pop(task_id, None)
        pending = self._pending.pop(task_id, None)
        if pending is not None:  # its attempt ended without a state written here
            pending.discard()
        if running.listener is not None:
            running.listener.put_nowait(STREAM_END)
        if self.scheduler.queued:  # a slot is free for them (nothing queued: nothing to do)
            self._wakeup.set()
        self._room.set()

    async def _requeue(self, task_id: str, priority: common_pb2.Priority.ValueType) -> None:
        await self._end(
            task_id,
            common_pb2.TASK_STATE_QUEUED,
            "the kernel stopped; queued again",
            _record_step("requeued", "the kernel stopped while it ran"),
        )
        if self.queue is not None:
            with contextlib.suppress(LlmosError):  # else taken over once its claim lapses
                await self.queue.release(task_id, priority)

    async def _failed(self, task_id: str, running: Running, why: str) -> None:
        """Record the task FAILED, if it was stored (else its submitter reports the store's
        error, and there is nothing to record)."""
        if await self._stored(task_id, running):
            await self._finish(task_id, common_pb2.TASK_STATE_FAILED, why)

    async def _finish(self, task_id: str, state: common_pb2.TaskState.ValueType, why: str) -> None:
        outcome = common_pb2.TaskState.Name(state).removeprefix("TASK_STATE_").lower()
        await self._let_go(
            task_id, await self._end(task_id, state, why, _record_step(outcome, why))
        )

    async def _end(
        self,
        task_id: str,
        state: common_pb2.TaskState.ValueType,
        why: str,
        record: common_pb2.TraceStep,
    ) -> LlmosError | None:
        """Store the last transition this kernel makes for the task (a final state, or a
        re-queue) with its `record` step; the error that refused it, if any. A task that
        cannot take it (finished or cancelled elsewhere, forgotten, or taken over by
        another kernel) still gets its trace: the steps are written on their own, as far
        as the store takes them. A takeover is logged as a warning: this kernel ran the
        task while another ran it too (it stalled past its claim)."""
        running = self._live.get(task_id)
        if running is not None:
            running.ending = True
        try:
            await self._transition(task_id, state, error=why, steps=(record,), brief=True)
        except LlmosError as error:
            log.log(
                logging.WARNING if error.reason == "ATTEMPT_OVER" else logging.INFO,
                "task %s: its end (%s) was not stored: %s: %s",
                task_id,
                common_pb2.TaskState.Name(state),
                error.reason,
                error.message,
            )
            pending = self._pending.pop(task_id, None)
            steps = () if pending is None else (await pending.take()).steps
            with contextlib.suppress(LlmosError):  # the store is unreachable: the task runs again
                for step in (*steps, record.SerializeToString()):
                    await asyncio.shield(self.store.add_trace_step(task_id, step))
            return error
        return None

    async def _stages(
        self,
        stages: tuple[Stage, ...],
        ticket: Ticket,
        request: kernel_pb2.GenerateRequest,
        deadline: float | None,
        output: str | None = None,
    ) -> kernel_pb2.GenerateRequest:
        """Run `stages` on the prompt (or on `output`, after the model); trace every step,
        then raise the error that refuses the task, if a stage returned one. Returns the
        request as the stages leave it. A refusal (safety:input blocked) ends the stages
        there and is kept on the task, for `_generate` to answer with."""
        running = self._live.get(ticket.task_id)
        for stage in stages:
            text = output if output is not None else _prompt_text(request)
            context = StageContext(
                ticket.task_id, ticket.tenant, text, deadline, request, output, self.plugins,
                output_held=running is not None and running.held is not None,
            )  # fmt: skip
            result = await stage.run(self.registry, context)
            for step in result.steps:
                await self._trace(ticket.task_id, step)
            if result.subjects:  # before the task can end: ForgetSubject must find it
                if running is not None:  # a write: only once the task is stored
                    await self._stored(ticket.task_id, running)
                await self.store.add_subjects(ticket.task_id, result.subjects)
            if result.request is not None:
                request = result.request
            if result.output is not None and running is not None and running.held is not None:
                output = running.changed_output = result.output
            if result.error is not None:
                raise result.error
            if running is not None:
                running.restore = running.restore or result.restore
                if result.refusal is not None:
                    running.refusal = result.refusal
                    break
        return request

    async def _generate(
        self, ticket: Ticket, request: kernel_pb2.GenerateRequest, running: Running
    ) -> tuple[str, runtime_pb2.RuntimeServiceGenerateResponse]:
        """Stream the runtime's output through safety:output and privacy:restore to the
        client and the task's text; a refused request never reaches the runtime."""
        pieces: list[str] = []
        if running.refusal is not None:  # a refusal is the task's output, not an error
            refused = runtime_pb2.RuntimeServiceGenerateResponse(
                text=running.refusal, finish_reason=common_pb2.FINISH_REASON_SAFETY
            )
            self._release(ticket.task_id, running, pieces, [refused])
            return running.refusal, refused
        runtime = self.registry.pick(common_pb2.SERVICE_KIND_RUNTIME)
        output = OutputPath(
            self.registry,
            self.policies.for_tenant(ticket.tenant),
            task_id=ticket.task_id,
            tenant=ticket.tenant,
            deadline=running.deadline,
            restore=running.restore,
        )
        started, clock = now_timestamp(), time.monotonic()
        timeout = None if running.deadline is None else max(0.001, running.deadline - clock)
        call = self._runtime_stub(runtime.channel).Generate(
            runtime_pb2.RuntimeServiceGenerateRequest(
                model=request.model,
                prompt=request.prompt,
                messages=request.messages,
                sampling=request.sampling,
                task_id=ticket.task_id,
                priority=request.priority,
            ),
            timeout=timeout,
            metadata=outgoing_metadata(x_llmos_task_id=ticket.task_id),
        )
        step = common_pb2.TraceStep(
            stage="runtime:generate", service=runtime.info.name, started_at=started
        )
        answered = False  # the runtime's last piece came: its status is not waited for
        try:
            last, answered = await self._relay(call, output, ticket.task_id, running, pieces)
        except grpc.aio.AioRpcError as error:
            step.decision, step.reason = "failed", f"{error.code().name}: {error.details()}"
            step.duration.CopyFrom(since(clock))
            await self._trace(ticket.task_id, step)
            raise from_rpc_error(
                error, f"Generate on {runtime.info.name} at {runtime.info.address}"
            ) from error
        finally:
            if answered:
                self._call_endings.follow(call, ticket.task_id, runtime.info.name)
            else:
                call.cancel()  # a no-op when finished; on cancel it frees the runtime's slot
            output.cancel()
        step.decision = "completed"
        step.reason = common_pb2.FinishReason.Name(last.finish_reason)
        if output.blocked:
            step.decision, step.reason = "stopped", "safety:output blocked the stream"
        step.evidence["completion_tokens"] = str(last.usage.completion_tokens)
        step.evidence["prompt_tokens"] = str(last.usage.prompt_tokens)
        if last.HasField("kv_admission"):  # the runtime's memory decision for the sequence
            step.evidence.update(kv_evidence(last.kv_admission))
        step.duration.CopyFrom(since(clock))
        await self._trace(ticket.task_id, step)
        for stream_step in output.steps():
            await self._trace(ticket.task_id, stream_step)
        if output.blocked:
            last = output.refused(last)
            self._release(ticket.task_id, running, pieces, [last])
        return "".join(pieces), last

    async def _relay(
        self,
        call: grpc.aio.UnaryStreamCall[Any, runtime_pb2.RuntimeServiceGenerateResponse],
        output: OutputPath,
        task_id: str,
        running: Running,
        pieces: list[str],
    ) -> tuple[runtime_pb2.RuntimeServiceGenerateResponse, bool]:
        """Pass the runtime's pieces through the output path until its last piece (the one
        with a finish reason), or until safety:output blocks. Returns the last piece read
        and whether it was the runtime's last: then the call's status is left to
        `CallEndings` (everything the task records is in that piece)."""
        last = runtime_pb2.RuntimeServiceGenerateResponse()
        answered = False
        async for piece in call:
            last = piece
            self._release(task_id, running, pieces, await output.feed(piece))
            if output.blocked:  # safety:output: stop the runtime, end with the refusal
                return last, False
            if piece.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                answered = True
                break
        self._release(task_id, running, pieces, await output.close())
        return last, answered

    def _runtime_stub(self, channel: grpc.aio.Channel) -> runtime_pb2_grpc.RuntimeServiceAsyncStub:
        stub = self._stubs.get(channel)
        if stub is None:
            if len(self._stubs) >= MAX_STUBS:  # runtimes come and go: forget the old ones
                self._stubs.clear()
            stub = self._stubs[channel] = runtime_pb2_grpc.RuntimeServiceStub(channel)
        return stub

    def _release(
        self,
        task_id: str,
        running: Running,
        pieces: list[str],
        released: list[runtime_pb2.RuntimeServiceGenerateResponse],
    ) -> None:
        """What the output path lets through goes to the client and, as the client sees
        it (restored), to the task's stored text."""
        for piece in released:
            if piece.text:
                pieces.append(piece.text)
            if running.held is not None:  # to the client once plugins:after has run
                running.held.append(piece)
                continue
            if piece.text:
                self._pending_of(task_id).add_text(piece.text)
            if running.listener is not None:
                running.listener.put_nowait(_to_client(piece))

    def _deliver_held(self, task_id: str, running: Running) -> None:
        """Release the output held for plugins:after: as it came, or, when a plugin
        changed it, as one piece with the new text and the last piece's finish and usage."""
        held, running.held = running.held, None
        if held is None:
            return
        if running.changed_output is not None:
            last = held[-1] if held else runtime_pb2.RuntimeServiceGenerateResponse()
            whole = runtime_pb2.RuntimeServiceGenerateResponse()
            whole.CopyFrom(last)
            whole.text, whole.token_ids[:] = running.changed_output, []
            whole.model = next((piece.model for piece in held if piece.model), whole.model)
            held = [whole]
        self._release(task_id, running, [], held)

    async def _transition(
        self,
        task_id: str,
        state: common_pb2.TaskState.ValueType,
        *,
        finish_reason: common_pb2.FinishReason.ValueType | None = None,
        usage: bytes | None = None,
        error: str | None = None,
        steps: tuple[common_pb2.TraceStep, ...] = (),
        brief: bool = False,
        follows_create: bool = False,
    ) -> TaskRecord:
        """Store a transition together with what the task produced since its last write
        (its pending text and trace steps) and `steps`, in one atomic step: one round trip
        to the store. Then count the task as entering `state`. A refused transition raises
        before it is counted, and what was pending stays pending. `brief`: the record comes
        back without request and output (`TaskStore.transition`), for a caller that reads
        neither; `follows_create` as there."""
        pending = self._pending.get(task_id)
        taken = NOTHING_TAKEN if pending is None else await pending.take()
        for step in steps:
            kernel_metrics.stage_ran(step)
        running = self._live.get(task_id)
        try:
            record = await self.store.transition(
                task_id,
                state,
                finish_reason=finish_reason,
                usage=usage,
                error=error,
                text=taken.text,
                text_at=taken.at,
                trace=(*taken.steps, *(step.SerializeToString() for step in steps)),
                brief=brief,
                follows_create=follows_create,
                attempt=None if running is None else running.attempt,
            )
        except LlmosError:
            if pending is not None:
                pending.restore(taken)
            raise
        kernel_metrics.task_entered(state)
        self._task_event(record, state, error)
        if record.finished:
            self._pending.pop(task_id, None)
            if running is not None:
                running.final = record
        return record

    def _task_event(
        self, record: TaskRecord, state: common_pb2.TaskState.ValueType, why: str | None = None
    ) -> None:
        """Tell the plugins (llmos_on_task_event): queued for them, never waited for."""
        if self.plugins is not None:
            self.plugins.task_event(
                record.task_id,
                record.tenant,
                common_pb2.TaskState.Name(state).removeprefix("TASK_STATE_"),
                why or "",
                functools.partial(self._trace, record.task_id),
            )

    async def _trace(self, task_id: str, step: common_pb2.TraceStep) -> None:
        """Add a step to the task's trace: while it runs here, with its pending writes
        (so with its next transition, or within `kernel.pending.STEP_FLUSH_S`); else at once."""
        kernel_metrics.stage_ran(step)
        running = self._live.get(task_id)
        if running is not None and running.final is None:
            self._pending_of(task_id).add_step(step.SerializeToString())
            return
        await asyncio.shield(self.store.add_trace_step(task_id, step.SerializeToString()))

    def _pending_of(self, task_id: str) -> PendingWrites:
        pending = self._pending.get(task_id)
        if pending is None:
            running = self._live.get(task_id)
            stored = None if running is None else running.stored
            pending = self._pending[task_id] = PendingWrites(
                self.store,
                task_id,
                stored=stored,
                loop=self._event_loop,
                attempt=None if running is None else running.attempt,
            )
        return pending


def _task_id() -> str:
    """32 hex digits: the time in milliseconds (48 bits), then 80 random bits, as in a
    UUIDv7. Ids made one after another sort together, so the store's writes of the tasks
    running at once land on the same few pages of every index keyed by task id, and a
    commit writes those few pages (a random id dirties a page of each index per task, and
    SQLite writes every dirty page whole to its log). The 80 random bits keep ids as
    unguessable as they need to be."""
    return (time.time_ns() // 1_000_000).to_bytes(6, "big").hex() + random_bytes(10).hex()


async def _early_output(
    listener: asyncio.Queue[kernel_pb2.GenerateResponse | None], *, wait: bool
) -> kernel_pb2.GenerateResponse | _NoOutput | None:
    """The stream's next message if it is there already or, with `wait`, if it comes within
    `FIRST_OUTPUT_WAIT_S`; NO_OUTPUT otherwise (left in the queue when it came too late)."""
    if not listener.empty():
        return listener.get_nowait()
    if not wait:
        return NO_OUTPUT
    try:
        async with asyncio.timeout(FIRST_OUTPUT_WAIT_S):
            return await listener.get()
    except TimeoutError:
        return NO_OUTPUT


def _settle_write(stored: asyncio.Future[bool | None], outcome: bool | None) -> None:
    if not stored.done():  # cancelled by a run that was waiting for it
        stored.set_result(outcome)


def _prompt_text(request: kernel_pb2.GenerateRequest) -> str:
    """The text the input stages check: the prompt, or every chat message's content."""
    return request.prompt or "\n".join(m.content for m in request.messages)


def _record_step(outcome: str, why: str = "") -> common_pb2.TraceStep:
    """The trace's last step: how the task ended here (succeeded, failed, requeued...)."""
    return common_pb2.TraceStep(
        stage="record",
        service="kernel",
        started_at=now_timestamp(),
        decision=outcome,
        reason=why,
    )


def _to_client(piece: runtime_pb2.RuntimeServiceGenerateResponse) -> kernel_pb2.GenerateResponse:
    response = kernel_pb2.GenerateResponse(
        text=piece.text,
        token_ids=piece.token_ids,
        finish_reason=piece.finish_reason,
        model=piece.model,
    )
    if piece.HasField("usage"):
        response.usage.CopyFrom(piece.usage)
    return response
