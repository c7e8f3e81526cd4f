"""Retention and forgetting in the task store: how fast each backend deletes.

For SQLite (a fresh data directory) and Redis (the test server, a fresh prefix), N
finished tasks are stored (each with a few text events, two trace steps and two subject
tokens, about what a short request leaves), then:

- `expire_tasks_per_s`: tasks deleted per second by `expire` sweeps of `--batch` tasks
  (resuming after each), until none is left, including SQLite's WAL truncation per sweep;
- `sweep_ms_p50` / `sweep_ms_max`: one such sweep;
- `find_subject_ms`: one `find_subject` lookup among the N tasks' index (one token);
- `forget_tenant_ms`: `forget_tenant` of a tenant holding `--tenant-tasks` tasks among N;
- `add_subjects_ms_p50`: one `add_subjects` write (the extra store write a request with
  PII costs the kernel).

Prints one JSON object. `python bench/retention.py [--tasks 5000] [--batch 500]`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from llmos.kernel.store import SqliteTaskStore, TaskRecord, TaskStore
from llmos.kernel.store.redis import RedisTaskStore
from llmos.services.keyring import KeyRing
from llmos.v1 import common_pb2, kernel_pb2

REDIS_URL = os.environ.get("LLMOS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


async def fill(store: TaskStore, n: int, tenant: str, offset: int) -> list[str]:
    request = kernel_pb2.GenerateRequest(prompt="Please email someone@example.com today")
    ids = []
    for i in range(n):
        task_id = f"{tenant}-{offset + i:08d}"
        record = TaskRecord.queued(
            task_id,
            tenant=tenant,
            model="echo",
            priority=common_pb2.PRIORITY_NORMAL,
            request=request.SerializeToString(),
            now=1000.0 + offset + i,
        )
        await store.create(record, running=True)
        await store.add_subjects(task_id, [i.to_bytes(16, "big"), b"\xff" * 16])
        await store.transition(
            task_id,
            common_pb2.TASK_STATE_SUCCEEDED,
            text="Sure, I will email someone@example.com today",
            trace=[b"x" * 200, b"y" * 200],
        )
        ids.append(task_id)
    return ids


async def measure(store: TaskStore, tasks: int, batch: int, tenant_tasks: int) -> dict[str, float]:
    await fill(store, tasks - tenant_tasks, "bulk", 0)
    await fill(store, tenant_tasks, "leaving", tasks)
    started = time.perf_counter()
    found = await store.find_subject("bulk", [(7).to_bytes(16, "big")])
    find_ms = (time.perf_counter() - started) * 1000
    assert found == ["bulk-00000007"], found
    started = time.perf_counter()
    await store.forget_tenant("leaving")
    forget_ms = (time.perf_counter() - started) * 1000
    adds = []
    for i in range(200):
        started = time.perf_counter()
        await store.add_subjects("bulk-00000001", [(10**6 + i).to_bytes(16, "big")])
        adds.append((time.perf_counter() - started) * 1000)
    sweeps: list[float] = []
    deleted, resume = 0, None
    begun = time.perf_counter()
    while True:
        started = time.perf_counter()
        expiry = await store.expire(10**9, after=resume, limit=batch)
        sweeps.append((time.perf_counter() - started) * 1000)
        deleted += len(expiry.deleted)
        resume = expiry.resume_after
        if resume is None:
            break
    total_s = time.perf_counter() - begun
    assert deleted == tasks - tenant_tasks, deleted
    return {
        "expire_tasks_per_s": round(deleted / total_s, 1),
        "sweep_ms_p50": round(statistics.median(sweeps), 2),
        "sweep_ms_max": round(max(sweeps), 2),
        "find_subject_ms": round(find_ms, 2),
        "forget_tenant_ms": round(forget_ms, 2),
        "add_subjects_ms_p50": round(statistics.median(adds), 3),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--tenant-tasks", type=int, default=500)
    args = parser.parse_args()
    results: dict[str, object] = {
        "tasks": args.tasks,
        "batch": args.batch,
        "tenant_tasks": args.tenant_tasks,
        "load": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        print("sqlite...", file=sys.stderr)
        store: TaskStore = await SqliteTaskStore.open(Path(tmp), keys=KeyRing.generate())
        try:
            results["sqlite"] = await measure(store, args.tasks, args.batch, args.tenant_tasks)
        finally:
            await store.close()
    print("redis...", file=sys.stderr)
    prefix = f"llmos-bench-retention-{os.getpid()}:"
    store = await RedisTaskStore.open(REDIS_URL, prefix=prefix, keys=KeyRing.generate())
    try:
        results["redis"] = await measure(store, args.tasks, args.batch, args.tenant_tasks)
    finally:
        async for key in store.client.scan_iter(match=f"{prefix}*"):
            await store.client.delete(key)
        await store.close()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
