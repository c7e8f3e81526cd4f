"""Forgetting: KernelService.ForgetTenant and ForgetSubject delete a tenant's or a data
subject's tasks, traces, events and vault entries, for the admin API and `llmos forget`.

What each does, in order (each step is safe to repeat, so a call that failed half-way is
simply made again):

- **ForgetTenant**: cancel the tenant's queued and running tasks (so nothing writes after
  the deletion), delete its vault conversations (PrivacyService.ForgetTenant), delete its
  tasks with their events, traces and subject index (`TaskStore.forget_tenant`), then
  `TaskStore.scrub`.
- **ForgetSubject**: ask PrivacyService.ForgetSubject for the subject's blind index (keyed
  HMACs under every key of the ring; the kernel holds no key) - it deletes the vault
  conversations holding the subject as it answers; find the tenant's tasks under that
  index (`TaskStore.find_subject`) or named by those conversations; cancel the unfinished
  ones; delete them; call ForgetSubject again naming the tasks, so their conversations go
  even where the subject's own value was not redacted (or a cancelled task wrote to the
  vault meanwhile); then scrub.

A tenant or subject with nothing stored is not an error: the answer says 0 (forgetting
twice must succeed twice, and "unknown" cannot be told from "already forgotten"). The
privacy service must be up: without it the vault cannot be cleared nor a subject's index
computed, so the call fails UNAVAILABLE and says what it did before (tasks cancelled).
What a subject lookup can find: tasks whose prompt went through privacy:redact (the
index is written there); docs/privacy.md "Retention and forgetting" lists what it cannot.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol, TypeAlias

import grpc

from llmos.kernel.registry import Registry
from llmos.kernel.store import FINAL_STATES, TaskStore
from llmos.services.channels import outgoing_metadata
from llmos.services.errors import InvalidArgument, LlmosError, NotFound, from_rpc_error
from llmos.v1 import common_pb2, kernel_pb2, privacy_pb2, privacy_pb2_grpc

log = logging.getLogger(__name__)

ForgetTenantReply: TypeAlias = privacy_pb2.PrivacyServiceForgetTenantResponse
ForgetSubjectReply: TypeAlias = privacy_pb2.PrivacyServiceForgetSubjectResponse

# How long one call to the privacy service may take: ForgetSubject opens no entries but a
# tenant's vault may be large.
PRIVACY_TIMEOUT_S = 30.0
MAX_SUBJECT_CHARS = 1_000
UNFINISHED = (common_pb2.TASK_STATE_QUEUED, common_pb2.TASK_STATE_RUNNING)


class Canceller(Protocol):
    """The task runner, as forgetting uses it: cancel a task and wait until it stopped."""

    store: TaskStore

    async def cancel(self, task_id: str, *, quietly: bool = False) -> object: ...


def check_tenant(tenant: str) -> str:
    if not tenant.strip():
        raise InvalidArgument(
            "tenant is required: name the tenant to forget (requests without one belong to "
            "'default'; say so explicitly)",
            reason="TENANT_REQUIRED",
        )
    return tenant


def check_subject(subject: str) -> str:
    if not subject.strip():
        raise InvalidArgument(
            "subject is empty: give the PII value the data subject is known by (an email "
            "address, a phone number, a name...)",
            reason="EMPTY_SUBJECT",
        )
    if len(subject) > MAX_SUBJECT_CHARS:
        raise InvalidArgument(
            f"subject has {len(subject):,} characters; a PII value has at most "
            f"{MAX_SUBJECT_CHARS:,}",
            reason="SUBJECT_TOO_LONG",
        )
    return subject


class Forgetter:
    """Runs the two forget calls against the runner's store and the privacy service."""

    def __init__(self, runner: Canceller, registry: Registry) -> None:
        self.runner = runner
        self.registry = registry

    @property
    def store(self) -> TaskStore:
        return self.runner.store

    async def forget_tenant(self, tenant: str) -> kernel_pb2.ForgetTenantResponse:
        tenant = check_tenant(tenant)
        cancelled = await self._cancel(await self._unfinished_of(tenant))
        done = f"{len(cancelled)} queued or running tasks were cancelled; nothing was deleted"
        reply = await self._vault_tenant(tenant, done)
        deleted = await self.store.forget_tenant(tenant)
        notes = [f"cancelled {len(cancelled)} queued or running tasks first"] if cancelled else []
        notes += await self.store.scrub()
        log.info(
            "forgot tenant %s: %d tasks (%d cancelled first), %d vault entries",
            tenant,
            deleted,
            len(cancelled),
            reply.deleted,
        )
        return kernel_pb2.ForgetTenantResponse(
            tasks_deleted=deleted,
            tasks_cancelled=len(cancelled),
            vault_entries_deleted=reply.deleted,
            notes=notes,
        )

    async def forget_subject(self, tenant: str, subject: str) -> kernel_pb2.ForgetSubjectResponse:
        tenant = check_tenant(tenant)
        subject = check_subject(subject)
        first = await self._vault_subject(tenant, subject, (), "nothing was deleted")
        task_ids = set(await self.store.find_subject(tenant, list(first.subject_index)))
        task_ids.update(await self._tasks_of(tenant, first.conversation_ids))
        found = sorted(task_ids)
        unfinished = [
            task_id
            for task_id in found
            if (await self._state(task_id)) in UNFINISHED  # None (gone) is not unfinished
        ]
        cancelled = await self._cancel(unfinished)
        deleted = await self.store.delete(found)
        done = (
            f"{deleted} tasks were deleted ({len(cancelled)} cancelled first) and "
            f"{first.deleted} vault entries; their remaining conversations were not: retry"
        )
        second = await self._vault_subject(tenant, subject, found, done)
        notes = [f"cancelled {len(cancelled)} queued or running tasks first"] if cancelled else []
        notes += await self.store.scrub()
        log.info(
            "forgot a subject of tenant %s: %d tasks (%d cancelled first), %d vault entries",
            tenant,
            deleted,
            len(cancelled),
            first.deleted + second.deleted,
        )
        return kernel_pb2.ForgetSubjectResponse(
            tasks_deleted=deleted,
            tasks_cancelled=len(cancelled),
            vault_entries_deleted=first.deleted + second.deleted,
            task_ids=found,
            notes=notes,
        )

    async def _unfinished_of(self, tenant: str) -> list[str]:
        task_ids: list[str] = []
        for state in UNFINISHED:
            token = ""
            while True:
                records, token = await self.store.list(
                    tenant=tenant, state=state, page_size=1000, page_token=token
                )
                task_ids.extend(record.task_id for record in records)
                if not token:
                    break
        return task_ids

    async def _tasks_of(self, tenant: str, conversations: Sequence[str]) -> list[str]:
        """The conversations that are tasks of `tenant` (the kernel names each task's
        conversation by the task id)."""
        owned = []
        for conversation in conversations:
            try:
                if (await self.store.get(conversation)).tenant == tenant:
                    owned.append(conversation)
            except NotFound:
                continue
        return owned

    async def _state(self, task_id: str) -> int | None:
        try:
            return (await self.store.get(task_id)).state
        except NotFound:
            return None

    async def _cancel(self, task_ids: Sequence[str]) -> list[str]:
        """Cancel each task and wait for it to stop; the ids that were still unfinished."""
        cancelled = []
        for task_id in task_ids:
            try:
                record = await self.store.get(task_id)
                if record.state in FINAL_STATES:
                    continue
                await self.runner.cancel(task_id, quietly=True)
            except NotFound:
                continue
            cancelled.append(task_id)
        return cancelled

    def _privacy(self, done: str) -> privacy_pb2_grpc.PrivacyServiceAsyncStub:
        """A stub for the privacy service; a failure says what was done before (`done`)."""
        try:
            entry = self.registry.pick(common_pb2.SERVICE_KIND_PRIVACY)
        except LlmosError as error:
            raise _after(error, done) from error
        return privacy_pb2_grpc.PrivacyServiceStub(entry.channel)

    async def _vault_tenant(self, tenant: str, done: str) -> ForgetTenantReply:
        stub = self._privacy(done)
        try:
            reply: ForgetTenantReply = await stub.ForgetTenant(
                privacy_pb2.PrivacyServiceForgetTenantRequest(tenant=tenant),
                timeout=PRIVACY_TIMEOUT_S,
                metadata=outgoing_metadata(),
            )
        except grpc.aio.AioRpcError as error:
            raise _after(from_rpc_error(error, "privacy ForgetTenant"), done) from error
        return reply

    async def _vault_subject(
        self, tenant: str, subject: str, conversations: Sequence[str], done: str
    ) -> ForgetSubjectReply:
        stub = self._privacy(done)
        try:
            reply: ForgetSubjectReply = await stub.ForgetSubject(
                privacy_pb2.PrivacyServiceForgetSubjectRequest(
                    tenant=tenant, subject=subject, conversation_ids=conversations
                ),
                timeout=PRIVACY_TIMEOUT_S,
                metadata=outgoing_metadata(),
            )
        except grpc.aio.AioRpcError as error:
            raise _after(from_rpc_error(error, "privacy ForgetSubject"), done) from error
        return reply


def _after(error: LlmosError, done: str) -> LlmosError:
    """A new error of `error`'s kind and reason whose message also says that forgetting
    needs the privacy service and what was done before it failed. New, not `error` changed:
    raising an error from itself would make its cause chain a loop."""
    return type(error)(
        f"{error.message}; forgetting needs the privacy service (its vault, and the key of a "
        f"subject's index): {done}",
        reason=error.reason,
        metadata=error.metadata,
    )
