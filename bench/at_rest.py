"""What encryption at rest costs: per-value seal/open time, and task-store throughput with
the real sealing against the same store with sealing swapped for a pass-through, in the same
run (alternating rounds, so load changes hit both alike).

    .venv/bin/python bench/at_rest.py [--tasks 1500] [--rounds 3] [--backends sqlite,redis]

Each task does what a kernel task does to its store: create (started at once), two text
flushes and a trace step, the final transition with the last text and two trace steps,
then GetTask and WatchTask reads. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import timeit
import uuid
from pathlib import Path
from typing import Any

from llmos.kernel.store import SqliteTaskStore, TaskRecord, TaskStore
from llmos.kernel.store.redis import RedisTaskStore
from llmos.kernel.store.sealing import Sealer
from llmos.services.keyring import KeyRing
from llmos.v1 import common_pb2, kernel_pb2

REDIS_URL = os.environ.get("LLMOS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
CONCURRENCY = 64


class PlainSealer(Sealer):
    """The baseline: the store's sealing calls, doing nothing (bench only)."""

    def seal(self, task_id: str, field: str, plain: bytes) -> bytes:
        return plain

    def open(self, task_id: str, field: str, sealed: bytes) -> bytes:
        return bytes(sealed)


def per_value_us(ring: KeyRing) -> dict[str, dict[str, float]]:
    """Microseconds per seal and per open of one value, by size."""
    figures: dict[str, dict[str, float]] = {}
    for size in (64, 1024, 16384):
        plain = os.urandom(size)
        sealed = ring.seal(plain, b"llmos/task/t/event")
        number = 5000
        seal_s = min(
            timeit.repeat(
                lambda p=plain: ring.seal(p, b"llmos/task/t/event"), number=number, repeat=3
            )
        )
        open_s = min(
            timeit.repeat(
                lambda s=sealed: ring.open(s, b"llmos/task/t/event", "x"), number=number, repeat=3
            )
        )
        figures[f"{size}B"] = {
            "seal_us": round(seal_s / number * 1e6, 2),
            "open_us": round(open_s / number * 1e6, 2),
            "overhead_bytes": len(sealed) - size,
        }
    return figures


async def one_task(store: TaskStore, task_id: str) -> None:
    request = kernel_pb2.GenerateRequest(prompt="word " * 60).SerializeToString()
    record = TaskRecord.queued(
        task_id,
        tenant="bench",
        model="echo",
        priority=common_pb2.PRIORITY_NORMAL,
        request=request,
        now=time.time(),
    )
    await store.create(record, running=True)
    await store.append_text(task_id, "generated words " * 8)
    await store.append_text(task_id, "more generated words " * 8)
    await store.add_trace_step(task_id, b"x" * 120)
    await store.transition(
        task_id,
        common_pb2.TASK_STATE_SUCCEEDED,
        text="the last words " * 4,
        trace=[b"y" * 150, b"z" * 150],
    )
    await store.get(task_id)
    await store.events(task_id)


async def workload(store: TaskStore, tasks: int) -> float:
    """Tasks per second through `store`, CONCURRENCY at a time."""
    ids = [uuid.uuid4().hex for _ in range(tasks)]
    started = time.perf_counter()
    for start in range(0, tasks, CONCURRENCY):
        await asyncio.gather(*(one_task(store, t) for t in ids[start : start + CONCURRENCY]))
    return tasks / (time.perf_counter() - started)


async def open_store(backend: str, workdir: Path, ring: KeyRing) -> TaskStore:
    if backend == "sqlite":
        return await SqliteTaskStore.open(workdir / uuid.uuid4().hex, keys=ring)
    return await RedisTaskStore.open(
        REDIS_URL, prefix=f"llmos-bench-atrest-{uuid.uuid4().hex[:8]}:", keys=ring
    )


async def drop(store: TaskStore) -> None:
    if isinstance(store, RedisTaskStore):
        prefix = store.keys.prefix
        async for key in store.client.scan_iter(match=f"{prefix}*", count=1000):
            await store.client.delete(key)
    await store.close()


async def compare(backend: str, tasks: int, rounds: int, ring: KeyRing) -> dict[str, Any]:
    rates: dict[str, list[float]] = {"sealed": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for mode in ("sealed", "plain"):
                store = await open_store(backend, Path(tmp), ring)
                if mode == "plain":
                    store.sealer = PlainSealer(ring)  # type: ignore[attr-defined]
                try:
                    await workload(store, 100)  # warm up
                    rates[mode].append(await workload(store, tasks))
                finally:
                    await drop(store)
    sealed, plain = statistics.median(rates["sealed"]), statistics.median(rates["plain"])
    return {
        "tasks_per_s_sealed": round(sealed, 1),
        "tasks_per_s_plain": round(plain, 1),
        "cost_pct": round((plain / sealed - 1) * 100, 1),
        "added_us_per_task": round((1 / sealed - 1 / plain) * 1e6, 1),
        "rounds": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", default="sqlite,redis")
    args = parser.parse_args()
    ring = KeyRing.generate()
    result: dict[str, Any] = {
        "load_avg_1m": os.getloadavg()[0],
        "per_value": per_value_us(ring),
        "tasks": args.tasks,
    }
    for backend in args.backends.split(","):
        result[backend] = asyncio.run(compare(backend, args.tasks, args.rounds, ring))
    result["load_avg_1m_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
