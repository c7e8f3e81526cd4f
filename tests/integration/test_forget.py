"""Retention and forgetting through the real kernel and privacy service, on both task
stores: after ForgetSubject / ForgetTenant nothing of the forgotten tasks is left, neither
through the API nor in the raw bytes of the SQLite files (main file and WAL), the Redis
keys under the stack's prefix, or the vault's file; a short retention deletes a tenant's
finished tasks and no other tenant's.

The stack: kernel, echo runtime and privacy service as separate processes (`llmos serve`),
with a policy that runs the privacy stages only (no safety service to start), a tenant
whose tasks are kept one second, and a sweep every 0.2 s. The echo runtime streams the
redacted prompt back, so the restored output, the events and the stored request all hold
the PII that must disappear.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from redistools import REDIS_URL, delete_prefix, fresh_prefix, raw_bytes
from stacktools import Served

from llmos.services.errors import error_info
from llmos.v1 import common_pb2, kernel_pb2, privacy_pb2, privacy_pb2_grpc

CONFIG = """
kernel_retention_sweep_s = 0.2
kernel_runtime_concurrency = 1

[policy]
stages = ["privacy:redact", "privacy:restore"]
mandatory = []

[tenants.brief]
retention = "1s"
"""
EMAIL = "alice.forget@example.com"
PHONE = "(415) 555-0172"
SUBJECT_PROMPT = f"Please email {EMAIL} or call {PHONE} about the invoice"
OTHER_PROMPT = "Please email bob.stays@example.com about the invoice"
# Every form of the subject's values that must not survive, as stored bytes.
FORGOTTEN_VALUES = (EMAIL, "415) 555-0172", "4155550172")


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Served, str]]:
    """The running processes and the Redis prefix ("" for the SQLite store)."""
    workdir = tmp_path_factory.mktemp(f"forget-{request.param}")
    (workdir / "data").mkdir()
    (workdir / "data" / "llmos.toml").write_text(CONFIG, encoding="utf-8")
    env = {"LLMOS_RUNTIME_ENGINE": "echo", "LLMOS_METRICS_PORT": "-1"}
    prefix = ""
    if request.param == "redis":
        prefix = fresh_prefix("forget")
        env |= {
            "LLMOS_TASK_STORE": "redis",
            "LLMOS_REDIS_URL": REDIS_URL,
            "LLMOS_REDIS_PREFIX": prefix,
        }
    running = Served(workdir, env)
    try:
        running.start("kernel")
        running.start("runtime")
        running.start("privacy")
        running.wait_registered("runtime", "privacy", timeout_s=180)
        yield running, prefix
    finally:
        running.stop()
        if prefix:
            delete_prefix(prefix)


def metadata(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("x-llmos-tenant", tenant),)


def submit(served: Served, prompt: str, tenant: str) -> str:
    with served.stack.channel() as channel:
        reply = served.stack.kernel(channel).Submit(
            kernel_pb2.SubmitRequest(request=kernel_pb2.GenerateRequest(prompt=prompt)),
            metadata=metadata(tenant),
            timeout=30,
        )
    return reply.task_id


def get(served: Served, task_id: str) -> kernel_pb2.GetTaskResponse:
    with served.stack.channel() as channel:
        return served.stack.kernel(channel).GetTask(
            kernel_pb2.GetTaskRequest(task_id=task_id), timeout=10
        )


def wait_state(served: Served, task_id: str, states: set[int], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (state := get(served, task_id).task.state) not in states:
        if time.monotonic() > deadline:
            pytest.fail(f"task {task_id} still {state} after {timeout_s}s")
        time.sleep(0.05)


def wait_finished(served: Served, *task_ids: str) -> None:
    for task_id in task_ids:
        wait_state(served, task_id, {common_pb2.TASK_STATE_SUCCEEDED})


def code_of(call: object) -> grpc.StatusCode:
    try:
        if callable(call):
            result = call()
            if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
                list(result)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def assert_gone_through_the_api(served: Served, task_id: str, tenant: str) -> None:
    with served.stack.channel() as channel:
        kernel = served.stack.kernel(channel)
        for call in (
            lambda: kernel.GetTask(kernel_pb2.GetTaskRequest(task_id=task_id), timeout=10),
            lambda: kernel.GetTrace(kernel_pb2.GetTraceRequest(task_id=task_id), timeout=10),
            lambda: kernel.WatchTask(kernel_pb2.WatchTaskRequest(task_id=task_id), timeout=10),
        ):
            assert code_of(call) == grpc.StatusCode.NOT_FOUND
        listed = kernel.ListTasks(
            kernel_pb2.ListTasksRequest(tenant=tenant, page_size=1000), timeout=10
        )
        assert task_id not in {task.task_id for task in listed.tasks}
        everyone = kernel.ListTasks(kernel_pb2.ListTasksRequest(page_size=1000), timeout=10)
        assert task_id not in {task.task_id for task in everyone.tasks}
    assert gone(lambda: restore(served, task_id, tenant))


def file_bytes(*paths: Path) -> bytes:
    """The raw bytes of each file that exists (a truncated WAL may not)."""
    return b"".join(path.read_bytes() for path in paths if path.exists())


def stored_bytes(served: Served, prefix: str) -> bytes:
    """What the task store holds, raw: the SQLite file and its WAL, or the Redis keys."""
    if prefix:
        return raw_bytes(prefix, dump=False)
    data = served.workdir / "data"
    return file_bytes(data / "tasks.sqlite3", data / "tasks.sqlite3-wal")


def vault_bytes(served: Served) -> bytes:
    vault = served.workdir / "data" / "privacy" / "vault.sqlite3"
    return file_bytes(vault, vault.with_name("vault.sqlite3-wal"))


def assert_absent(raw: bytes, *forgotten: str) -> None:
    for value in forgotten:
        assert value.encode() not in raw, f"{value!r} is still in the stored bytes"


def test_forget_subject_leaves_nothing_of_its_tasks(stack: tuple[Served, str]) -> None:
    served, prefix = stack
    forgotten = submit(served, SUBJECT_PROMPT, "acme")
    kept = submit(served, OTHER_PROMPT, "acme")
    elsewhere = submit(served, SUBJECT_PROMPT, "initech")  # the same person, another tenant
    wait_finished(served, forgotten, kept, elsewhere)
    assert get(served, forgotten).output == SUBJECT_PROMPT  # restored for the client
    # The raw reads see what is stored: the task ids are there before the forget.
    assert forgotten.encode() in stored_bytes(served, prefix)
    assert forgotten.encode() in vault_bytes(served)

    with served.stack.channel() as channel:
        reply = served.stack.kernel(channel).ForgetSubject(
            # Written as a person might give it: other case, spaces, phone punctuation.
            kernel_pb2.ForgetSubjectRequest(tenant="acme", subject="  ALICE.Forget@example.com "),
            timeout=60,
        )

    assert list(reply.task_ids) == [forgotten]
    assert (reply.tasks_deleted, reply.tasks_cancelled) == (1, 0)
    assert reply.vault_entries_deleted >= 2  # the email and the phone number
    assert_gone_through_the_api(served, forgotten, "acme")
    assert_absent(stored_bytes(served, prefix), forgotten)  # (initech still has the values)
    assert_absent(vault_bytes(served), forgotten)
    # Not forgotten: the tenant's other task, and the same person's task of another tenant.
    assert get(served, kept).output == OTHER_PROMPT
    assert get(served, elsewhere).output == SUBJECT_PROMPT

    # The same subject found through the phone number, written differently, in initech.
    done = served.stack.llmos("forget", "subject", "--tenant", "initech", "415.555.0172")
    assert done.returncode == 0, done.stderr
    assert f"task {elsewhere}" in done.stdout
    assert_gone_through_the_api(served, elsewhere, "initech")
    assert get(served, kept).output == OTHER_PROMPT
    # Both of the subject's tasks forgotten: none of its values is stored anywhere.
    assert_absent(stored_bytes(served, prefix), forgotten, elsewhere, *FORGOTTEN_VALUES)
    assert_absent(vault_bytes(served), forgotten, elsewhere)


def test_forget_refuses_bad_input_and_answers_empty_for_unknown_tenants(
    stack: tuple[Served, str],
) -> None:
    served, _ = stack
    with served.stack.channel() as channel:
        kernel = served.stack.kernel(channel)
        for call in (
            lambda: kernel.ForgetSubject(
                kernel_pb2.ForgetSubjectRequest(tenant="acme", subject="   "), timeout=10
            ),
            lambda: kernel.ForgetSubject(
                kernel_pb2.ForgetSubjectRequest(tenant="", subject=EMAIL), timeout=10
            ),
            lambda: kernel.ForgetTenant(kernel_pb2.ForgetTenantRequest(tenant=""), timeout=10),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            info = error_info(caught.value)
            assert info is not None and info.reason in {"EMPTY_SUBJECT", "TENANT_REQUIRED"}
        nobody = kernel.ForgetTenant(
            kernel_pb2.ForgetTenantRequest(tenant="never-seen"), timeout=30
        )
        unknown = kernel.ForgetSubject(
            kernel_pb2.ForgetSubjectRequest(tenant="never-seen", subject=EMAIL), timeout=30
        )
    assert (nobody.tasks_deleted, nobody.vault_entries_deleted) == (0, 0)
    assert (unknown.tasks_deleted, list(unknown.task_ids)) == (0, [])
    done = served.stack.llmos("forget", "subject", "--tenant", "acme", "")
    assert done.returncode == 1
    assert "EMPTY_SUBJECT" in done.stderr


def test_forget_tenant_cancels_its_running_work_and_leaves_nothing(
    stack: tuple[Served, str],
) -> None:
    served, prefix = stack
    finished = submit(served, SUBJECT_PROMPT, "leaving")
    other = submit(served, SUBJECT_PROMPT, "staying")
    wait_finished(served, finished, other)
    runtime = served.children["runtime"]
    runtime.send_signal(signal.SIGSTOP)  # the runtime hangs: the next task stays RUNNING
    try:
        running = submit(served, SUBJECT_PROMPT, "leaving")
        wait_state(served, running, {common_pb2.TASK_STATE_RUNNING})
        queued = submit(served, SUBJECT_PROMPT, "leaving")  # behind it (concurrency 1)
        wait_redacted(served, running)
        with served.stack.channel() as channel:
            reply = served.stack.kernel(channel).ForgetTenant(
                kernel_pb2.ForgetTenantRequest(tenant="leaving"), timeout=120
            )
    finally:
        runtime.send_signal(signal.SIGCONT)

    assert (reply.tasks_deleted, reply.tasks_cancelled) == (3, 2)
    assert reply.vault_entries_deleted >= 4  # two values in each of two redacted tasks
    assert any("cancelled 2" in note for note in reply.notes)
    for task_id in (finished, running, queued):
        assert_gone_through_the_api(served, task_id, "leaving")
    raw = stored_bytes(served, prefix)
    assert_absent(raw, finished, running, queued)
    assert_absent(vault_bytes(served), finished, running, queued)
    if prefix:  # nothing under the prefix names the tenant any more
        assert_absent(raw, "leaving")
    assert get(served, other).output == SUBJECT_PROMPT


def wait_redacted(served: Served, task_id: str, timeout_s: float = 30) -> None:
    """Until the task's trace shows privacy:redact (its vault entries exist)."""
    deadline = time.monotonic() + timeout_s
    with served.stack.channel() as channel:
        kernel = served.stack.kernel(channel)
        while True:
            trace = kernel.GetTrace(kernel_pb2.GetTraceRequest(task_id=task_id), timeout=10)
            if any(step.stage == "privacy:redact" for step in trace.steps):
                return
            if time.monotonic() > deadline:
                pytest.fail(f"task {task_id} not redacted after {timeout_s}s")
            time.sleep(0.05)


def test_a_short_retention_deletes_that_tenants_finished_tasks_only(
    stack: tuple[Served, str],
) -> None:
    served, prefix = stack
    brief = submit(served, SUBJECT_PROMPT, "brief")
    lasting = submit(served, SUBJECT_PROMPT, "lasting")
    wait_finished(served, brief, lasting)

    deadline = time.monotonic() + 60
    while not (gone(lambda: get(served, brief)) and gone(lambda: restore(served, brief, "brief"))):
        if time.monotonic() > deadline:
            pytest.fail("the task of tenant brief (or its vault entries) not expired within 60s")
        time.sleep(0.2)

    # Swept whole: events, trace and vault entries, from the API as from the files.
    assert_gone_through_the_api(served, brief, "brief")
    assert_absent(stored_bytes(served, prefix), brief)
    assert_absent(vault_bytes(served), brief)
    # The other tenant keeps its task, created at the same moment, sweep after sweep.
    time.sleep(1.0)
    assert get(served, lasting).output == SUBJECT_PROMPT
    assert restore(served, lasting, "lasting").text == EMAIL


def gone(call: object) -> bool:
    return code_of(call) == grpc.StatusCode.NOT_FOUND


def restore(served: Served, task_id: str, tenant: str) -> privacy_pb2.PrivacyServiceRestoreResponse:
    with grpc.insecure_channel(served.stack.services()["privacy"].address) as channel:
        return privacy_pb2_grpc.PrivacyServiceStub(channel).Restore(
            privacy_pb2.PrivacyServiceRestoreRequest(
                text="<EMAIL_ADDRESS_1>", tenant=tenant, conversation_id=task_id
            ),
            timeout=10,
        )


def test_without_the_privacy_service_forgetting_fails_saying_what_it_did(
    stack: tuple[Served, str],
) -> None:
    """Last in this module: it stops the privacy service."""
    served, _ = stack
    kept = submit(served, SUBJECT_PROMPT, "unlucky")
    wait_finished(served, kept)
    privacy = served.children["privacy"]
    privacy.send_signal(signal.SIGTERM)  # a planned stop: it deregisters
    privacy.wait(timeout=60)
    deadline = time.monotonic() + 30
    while "privacy" in served.stack.services():
        if time.monotonic() > deadline:
            pytest.fail("the privacy service is still registered 30s after it stopped")
        time.sleep(0.2)

    with served.stack.channel() as channel:
        kernel = served.stack.kernel(channel)
        for call in (
            lambda: kernel.ForgetTenant(
                kernel_pb2.ForgetTenantRequest(tenant="unlucky"), timeout=30
            ),
            lambda: kernel.ForgetSubject(
                kernel_pb2.ForgetSubjectRequest(tenant="unlucky", subject=EMAIL), timeout=30
            ),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "forgetting needs the privacy service" in (caught.value.details() or "")
            assert "nothing was deleted" in (caught.value.details() or "")
    assert get(served, kept).output == SUBJECT_PROMPT  # nothing was deleted, as it says
