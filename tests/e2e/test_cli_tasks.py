"""`llmos tasks` as a user runs it, against a kernel with the echo runtime (`llmos serve`; no
model): it follows the pages of ListTasks up to --limit, filters by tenant and state, and
says on stderr when more tasks match than it showed."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from stacktools import Served, Stack

from llmos.kernel.cli import TASKS_PAGE_SIZE
from llmos.v1 import common_pb2, kernel_pb2

# More than one page, so listing them all takes two ListTasks calls.
TASKS = TASKS_PAGE_SIZE + 30


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A kernel and an echo runtime; safety is down, so tenant `pager`'s tasks fail closed
    (FAILED, quickly) and tenant `lenient`'s succeed (its policy lets safety fail open)."""
    workdir = tmp_path_factory.mktemp("cli-tasks")
    (workdir / "data").mkdir()
    (workdir / "data" / "llmos.toml").write_text(
        '[policy]\nstages = ["safety:input", "safety:output"]\n'
        '[tenants.lenient]\nfail_open = ["safety:input", "safety:output"]\n',
        encoding="utf-8",
    )
    served = Served(workdir, {"LLMOS_RUNTIME_ENGINE": "echo", "LLMOS_METRICS_PORT": "-1"})
    try:
        served.start("kernel")
        served.start("runtime")
        served.wait_registered("runtime")
        yield served.stack
    finally:
        served.stop()


def submit(stack: Stack, tenant: str, count: int) -> list[str]:
    with stack.channel() as channel:
        kernel = stack.kernel(channel)
        return [
            kernel.Submit(
                kernel_pb2.SubmitRequest(request=kernel_pb2.GenerateRequest(prompt=f"task {i}")),
                timeout=10,
                metadata=(("x-llmos-tenant", tenant),),
            ).task_id
            for i in range(count)
        ]


def wait_finished(stack: Stack, task_ids: list[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    with stack.channel() as channel:
        kernel = stack.kernel(channel)
        for task_id in task_ids:
            while True:
                task = kernel.GetTask(kernel_pb2.GetTaskRequest(task_id=task_id), timeout=10).task
                if task.state not in (common_pb2.TASK_STATE_QUEUED, common_pb2.TASK_STATE_RUNNING):
                    break
                assert time.monotonic() < deadline, f"task {task_id} still {task.state}"
                time.sleep(0.05)


@pytest.fixture(scope="module")
def pager_tasks(stack: Stack) -> list[str]:
    """TASKS failed tasks of tenant `pager` and three succeeded ones of `lenient`."""
    failed = submit(stack, "pager", TASKS)
    succeeded = submit(stack, "lenient", 3)
    wait_finished(stack, failed + succeeded)
    return failed


def listed(stack: Stack, *args: str) -> tuple[list[str], str]:
    """The task ids `llmos tasks ARGS` prints, in order, and its stderr."""
    done = stack.llmos("tasks", *args)
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["TASK", "TENANT", "STATE", "TOKENS", "CREATED"]
    return [row.split()[0] for row in rows], done.stderr


def test_limit_zero_follows_every_page(stack: Stack, pager_tasks: list[str]) -> None:
    ids, stderr = listed(stack, "--tenant", "pager", "--limit", "0")

    assert ids == list(reversed(pager_tasks)), "every task once, newest first"
    assert stderr == ""


def test_a_limit_beyond_one_page_is_met_exactly(stack: Stack, pager_tasks: list[str]) -> None:
    ids, stderr = listed(stack, "--tenant", "pager", "--limit", str(TASKS_PAGE_SIZE + 10))

    assert ids == list(reversed(pager_tasks))[: TASKS_PAGE_SIZE + 10]
    assert "more may match" in stderr


def test_the_default_shows_twenty(stack: Stack, pager_tasks: list[str]) -> None:
    ids, stderr = listed(stack, "--tenant", "pager")

    assert ids == list(reversed(pager_tasks))[:20]
    assert "raise --limit" in stderr


def test_a_limit_as_large_as_the_listing_says_nothing_more(
    stack: Stack, pager_tasks: list[str]
) -> None:
    ids, stderr = listed(stack, "--tenant", "pager", "--limit", str(TASKS + 50))

    assert len(ids) == TASKS
    assert stderr == ""


def test_filters_by_state_and_tenant_across_pages(stack: Stack, pager_tasks: list[str]) -> None:
    failed, _ = listed(stack, "--state", "failed", "--limit", "0")
    succeeded, _ = listed(stack, "--state", "succeeded", "--limit", "0")
    lenient, _ = listed(stack, "--tenant", "lenient", "--state", "succeeded", "--limit", "0")

    assert set(failed) == set(pager_tasks)
    assert len(succeeded) == len(lenient) == 3
    assert listed(stack, "--tenant", "nobody", "--limit", "0") == ([], "")


def test_a_negative_limit_is_a_usage_error(stack: Stack) -> None:
    done = stack.llmos("tasks", "--limit", "-1")

    assert done.returncode == 2
    assert "--limit: invalid count value: '-1'" in done.stderr
