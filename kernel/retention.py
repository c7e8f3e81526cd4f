"""Retention: the kernel's sweeper deletes finished tasks older than their tenant's policy
allows (`retention` in `[policy]` / `[tenants.NAME]`, kernel/policy.py).

Every `kernel_retention_sweep_s` it runs one sweep: for each tenant with a table of its
own and a retention, `TaskStore.expire(now - retention, tenant=NAME)`; then, when
`[policy]` has one, the same over every other tenant (`keep` = the tenants with tables,
which follow their own). A task's age counts from its creation, so what a retention says
is "nothing a client sent is kept longer than this once its task ended"; a queued or
running task is never expired, however old (the store refuses to).

The work per sweep is bounded: each `expire` examines at most `kernel_retention_batch`
tasks, and a scope that stopped at the bound resumes where it stopped at the next sweep
(its `resume_after`), so a backlog drains over several sweeps without one long stall, and
old tasks of tenants that keep theirs are not re-read from the start every time. With
several kernels on one Redis each sweeps; deletions are idempotent, so that costs reads,
not correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable

from llmos.kernel.policy import Policies
from llmos.kernel.store import TaskStore
from llmos.kernel.store.contract import MAX_EXPIRE_BATCH
from llmos.services.errors import InvalidArgument, LlmosError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Scope:
    """What one `expire` call of a sweep covers: one tenant, or (tenant None) every tenant
    but those in `keep`, with the retention that applies."""

    tenant: str | None
    retention_s: float
    keep: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return "default policy" if self.tenant is None else f"tenant {self.tenant}"


def scopes(policies: Policies) -> tuple[Scope, ...]:
    """The scopes a sweep covers: those whose retention is not 0 (keep)."""
    named = frozenset(policies.tenants)
    found = [
        Scope(tenant, policy.retention_s)
        for tenant, policy in sorted(policies.tenants.items())
        if policy.retention_s > 0
    ]
    if policies.default.retention_s > 0:
        found.append(Scope(None, policies.default.retention_s, named))
    return tuple(found)


class RetentionSweeper:
    """Deletes expired tasks in the background; `sweep` runs one pass (tests call it)."""

    def __init__(
        self,
        store: TaskStore,
        policies: Policies,
        *,
        interval_s: float = 60.0,
        batch: int = 500,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 1 <= batch <= MAX_EXPIRE_BATCH:
            raise InvalidArgument(
                f"setting 'kernel_retention_batch' must be between 1 and {MAX_EXPIRE_BATCH}, "
                f"got {batch}",
                reason="BAD_SETTING",
            )
        self.store = store
        self.scopes = scopes(policies)
        self.interval_s = interval_s
        self.batch = batch
        self._clock = clock
        self._resume: dict[Scope, tuple[float, str]] = {}
        self._task: asyncio.Task[None] | None = None

    async def sweep(self) -> int:
        """One pass over every scope; the number of tasks deleted."""
        deleted = 0
        now = self._clock()
        for scope in self.scopes:
            expiry = await self.store.expire(
                now - scope.retention_s,
                tenant=scope.tenant,
                keep=scope.keep,
                after=self._resume.get(scope),
                limit=self.batch,
            )
            if expiry.resume_after is None:
                self._resume.pop(scope, None)
            else:
                self._resume[scope] = expiry.resume_after
            if expiry.deleted:
                log.info(
                    "retention: deleted %d finished tasks of %s older than %gs",
                    len(expiry.deleted),
                    scope.name,
                    scope.retention_s,
                )
            deleted += len(expiry.deleted)
        return deleted

    def start(self) -> None:
        if self.scopes and self.interval_s > 0:
            self._task = asyncio.create_task(self._sweep_forever(), name="retention")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except LlmosError as error:  # the store down for a while: try at the next sweep
                log.warning("retention sweep failed: %s", error.message)
            await asyncio.sleep(self.interval_s)
