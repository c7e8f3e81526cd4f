"""Encryption at rest with real kernels: the raw bytes the task store leaves on disk and in
Redis hold no prompt, output or trace text; keys rotate without a restart; tampering and a
missing key are refused cleanly while the kernel goes on serving.

Each kernel is a real `llmos serve kernel` process with an echo runtime (tests/kerneltools.py),
so what is checked is what the kernel really writes: the SQLite file and its WAL read as
bytes, and every Redis key under the test's prefix read with SCAN and DUMP/GET/HGETALL/
LRANGE/XRANGE/ZRANGE.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from kerneltools import Kernel, start_kernel
from redistools import REDIS_URL, delete_prefix, fresh_prefix, raw_bytes

from llmos.v1 import common_pb2, kernel_pb2, kernel_pb2_grpc


def distinctive_prompt(label: str) -> str:
    """A prompt whose words occur nowhere else: each one is searched for in the raw bytes."""
    return " ".join(
        f"{label}{word}{uuid.uuid4().hex[:10]}" for word in ("zebra", "quartz", "fjord")
    )


def run_task(stub: kernel_pb2_grpc.KernelServiceStub, prompt: str) -> str:
    pieces = list(stub.Generate(kernel_pb2.GenerateRequest(prompt=prompt), timeout=60))
    assert "".join(p.text for p in pieces) == prompt  # the echo runtime
    return pieces[0].task_id


def trace_texts(stub: kernel_pb2_grpc.KernelServiceStub, task_id: str) -> list[str]:
    """The trace's free text (reasons, and evidence that is prose rather than an identifier
    such as the kernel's id, which also names its Redis keys), long enough to be searched for
    unambiguously."""
    steps = stub.GetTrace(kernel_pb2.GetTraceRequest(task_id=task_id), timeout=10).steps
    texts = [step.reason for step in steps] + [
        value for step in steps for value in step.evidence.values() if " " in value
    ]
    return [text for text in texts if len(text) >= 12]


def secrets_of(stub: kernel_pb2_grpc.KernelServiceStub, task_id: str, prompt: str) -> set[str]:
    """Everything of a task that must not be in the clear: its prompt's words (the output is
    the same words, streamed back in pieces) and its trace texts."""
    return set(prompt.split()) | {prompt} | set(trace_texts(stub, task_id))


def assert_absent(raw: bytes, texts: set[str], where: str) -> None:
    found = sorted(text for text in texts if text.encode() in raw)
    assert not found, f"plaintext in {where}: {found}"


def sqlite_bytes(data_dir: Path) -> bytes:
    """The task store's file and its WAL, as bytes (the WAL is where recent commits are)."""
    files = [data_dir / "tasks.sqlite3", data_dir / "tasks.sqlite3-wal"]
    return b"".join(path.read_bytes() for path in files if path.exists())


def redis_bytes(prefix: str) -> bytes:
    """Everything stored under `prefix`, raw (redistools.raw_bytes); something must be."""
    raw = raw_bytes(prefix)
    assert raw, f"nothing stored under {prefix}"
    return raw


def cli(kernel: Kernel, data_dir: Path, *args: str) -> str:
    """`llmos ARGS` against the kernel, as an operator runs it; its stdout."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmos.kernel.cli",
            *args,
            "--port",
            str(kernel.port),
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=kernel.env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def key_counts(kernel: Kernel, data_dir: Path) -> dict[str, int]:
    status = json.loads(cli(kernel, data_dir, "keys", "status", "--json"))
    return {row["key_id"]: row["task_store_values"] for row in status["keys"]}


def wait_for(condition: str, check: object, timeout_s: float = 90) -> None:
    """Poll `check()` until true; fail naming `condition` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"gave up waiting: {condition}"
        time.sleep(0.3)


@pytest.fixture
def prefix() -> Iterator[str]:
    name = fresh_prefix("atrest")
    yield name
    delete_prefix(name)


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_no_plaintext_reaches_the_store(tmp_path: Path, prefix: str, store: str) -> None:
    kernel = start_kernel(tmp_path, "k", prefix, store=store)
    data_dir = tmp_path / "k"
    try:
        with grpc.insecure_channel(kernel.address) as channel:
            stub = kernel_pb2_grpc.KernelServiceStub(channel)
            hidden: set[str] = set()
            trace_checked = 0
            for index in range(4):
                prompt = distinctive_prompt(f"t{index}")
                task_id = run_task(stub, prompt)
                texts = trace_texts(stub, task_id)
                trace_checked += len(texts)
                hidden |= secrets_of(stub, task_id, prompt)
                got = stub.GetTask(kernel_pb2.GetTaskRequest(task_id=task_id), timeout=10)
                assert got.output == prompt  # the API still answers in the clear
            assert trace_checked, "no trace text to look for: the test would prove nothing"
            raw = sqlite_bytes(data_dir) if store == "sqlite" else redis_bytes(prefix)
            assert_absent(raw, hidden, f"the {store} store while the kernel runs")
    finally:
        kernel.stop()
    if store == "sqlite":  # after a clean stop the WAL is checkpointed into the file
        assert_absent(sqlite_bytes(data_dir), hidden, "the SQLite file after the kernel stopped")
    key_file = Path(kernel.env["LLMOS_PRIVACY_KEY_FILE"])
    for encoded in json.loads(key_file.read_text())["keys"].values():  # keys never in the store
        assert base64.b64decode(encoded) not in raw and encoded.encode() not in raw


def test_rotation_missing_key_and_resumed_rewrap_on_sqlite(tmp_path: Path, prefix: str) -> None:
    # No key configured: the kernel makes its key file under the data directory.
    kernel = start_kernel(
        tmp_path,
        "k",
        prefix,
        store="sqlite",
        env={"LLMOS_KEY_REWRAP_RATE": "0", "LLMOS_PRIVACY_KEY_FILE": ""},
    )
    data_dir = tmp_path / "k"
    key_file = data_dir / "privacy" / "keys.json"
    db = data_dir / "tasks.sqlite3"
    try:
        with grpc.insecure_channel(kernel.address) as channel:
            stub = kernel_pb2_grpc.KernelServiceStub(channel)
            old = {run_task(stub, p): p for p in (distinctive_prompt(f"old{i}") for i in range(3))}
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, "the generated key is private"

            assert "key k2 is active" in cli(kernel, data_dir, "keys", "rotate")
            # New data uses k2 at once, without a restart; re-wrapping is off (rate 0), so
            # what is under k2 was sealed with it.
            new_prompt = distinctive_prompt("new")
            new_id = run_task(stub, new_prompt)
            assert stored_key(db, new_id) == "k2"
            assert {stored_key(db, task_id) for task_id in old} == {"k1"}
            counts = key_counts(kernel, data_dir)
            assert counts["k1"] > 0 and counts["k2"] > 0
            for task_id, prompt in old.items():  # old data still opens
                assert stub.GetTask(kernel_pb2.GetTaskRequest(task_id=task_id)).output == prompt

            # Take k1 out of the key file: its data is refused by name, the rest is served.
            ring = json.loads(key_file.read_text())
            without_k1 = {"active": "k2", "keys": {"k2": ring["keys"]["k2"]}}
            replace_key_file(key_file, without_k1)
            some_old = next(iter(old))

            def refused() -> bool:
                try:
                    stub.GetTask(kernel_pb2.GetTaskRequest(task_id=some_old), timeout=10)
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
                    assert "'k1'" in (error.details() or "")
                    return True
                return False

            wait_for("the kernel to notice k1 is gone", refused)
            got = stub.GetTask(kernel_pb2.GetTaskRequest(task_id=new_id), timeout=10)
            assert got.output == new_prompt
            run_task(stub, distinctive_prompt("while-k1-missing"))
            replace_key_file(key_file, ring)
        # A restart with re-wrapping on goes on where nothing was done, and finishes.
        kernel.kernel.terminate()
        kernel.kernel.wait(timeout=30)
        kernel.env["LLMOS_KEY_REWRAP_RATE"] = "500"
        kernel.restart_kernel()
        wait_for("no value left under k1", lambda: key_counts(kernel, data_dir).get("k1", 0) == 0)
        with grpc.insecure_channel(kernel.address) as channel:
            stub = kernel_pb2_grpc.KernelServiceStub(channel)
            for task_id, prompt in old.items():
                assert stub.GetTask(kernel_pb2.GetTaskRequest(task_id=task_id)).output == prompt
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            for table, column in (("tasks", "request"), ("tasks", "error"), ("events", "text"),
                                  ("traces", "step")):  # fmt: skip
                rows = conn.execute(f"SELECT {column} FROM {table}").fetchall()
                assert not [r for (r,) in rows if bytes(r).startswith(b"\x01k1\x00")], table
    finally:
        kernel.stop()


def test_rotation_during_work_on_redis(tmp_path: Path, prefix: str) -> None:
    kernel = start_kernel(tmp_path, "k", prefix, store="redis")
    data_dir = tmp_path / "k"
    try:
        with grpc.insecure_channel(kernel.address) as channel:
            stub = kernel_pb2_grpc.KernelServiceStub(channel)
            prompts: dict[str, str] = {}
            stop = threading.Event()

            def keep_working() -> None:
                index = 0
                while not stop.is_set():
                    prompt = distinctive_prompt(f"w{index}")
                    prompts[run_task(stub, prompt)] = prompt
                    index += 1

            worker = threading.Thread(target=keep_working)
            worker.start()
            try:
                wait_for("some tasks done", lambda: len(prompts) >= 5)
                assert "key k2 is active" in cli(kernel, data_dir, "keys", "rotate")
                wait_for("more tasks done after the rotation", lambda: len(prompts) >= 12)
            finally:
                stop.set()
                worker.join(timeout=60)
            wait_for(
                "no value left under k1", lambda: key_counts(kernel, data_dir).get("k1", 0) == 0
            )
            counts = key_counts(kernel, data_dir)
            assert counts["k2"] > 0 and counts["k1"] == 0, counts
            for task_id, prompt in prompts.items():
                got = stub.GetTask(kernel_pb2.GetTaskRequest(task_id=task_id), timeout=10)
                assert got.task.state == common_pb2.TASK_STATE_SUCCEEDED
                assert got.output == prompt
        assert b"\x01k1\x00" not in redis_bytes(prefix)
    finally:
        kernel.stop()


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_tampered_or_moved_ciphertext_is_refused_and_the_kernel_keeps_serving(
    tmp_path: Path, prefix: str, store: str
) -> None:
    kernel = start_kernel(tmp_path, "k", prefix, store=store)
    try:
        with grpc.insecure_channel(kernel.address) as channel:
            stub = kernel_pb2_grpc.KernelServiceStub(channel)
            victim, other, intact = (run_task(stub, distinctive_prompt(n)) for n in "abc")
            if store == "sqlite":
                tamper_sqlite(tmp_path / "k" / "tasks.sqlite3", victim, other)
            else:
                tamper_redis(prefix, victim, other)
            for task_id in (victim, other):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.GetTask(kernel_pb2.GetTaskRequest(task_id=task_id), timeout=10)
                assert caught.value.code() == grpc.StatusCode.DATA_LOSS
                assert task_id in (caught.value.details() or "")
            with pytest.raises(grpc.RpcError) as caught:  # a flipped byte in an event's text
                list(stub.WatchTask(kernel_pb2.WatchTaskRequest(task_id=victim), timeout=10))
            assert caught.value.code() == grpc.StatusCode.DATA_LOSS
            assert stub.GetTask(kernel_pb2.GetTaskRequest(task_id=intact)).task.task_id == intact
            run_task(stub, distinctive_prompt("after"))  # and new work runs
    finally:
        kernel.stop()


def tamper_sqlite(db: Path, victim: str, other: str) -> None:
    """Flip a byte of the victim's request and of an event's text; give `other` the
    victim's (intact) request."""
    with sqlite3.connect(db, timeout=10) as conn:
        (request,) = conn.execute(
            "SELECT request FROM tasks WHERE task_id = ?", (victim,)
        ).fetchone()
        conn.execute("UPDATE tasks SET request = ? WHERE task_id = ?", (flip(request), victim))
        conn.execute("UPDATE tasks SET request = ? WHERE task_id = ?", (request, other))
        seq, text = conn.execute(
            "SELECT seq, text FROM events WHERE task_id = ? AND kind = 'text' LIMIT 1", (victim,)
        ).fetchone()
        conn.execute(
            "UPDATE events SET text = ? WHERE task_id = ? AND seq = ?", (flip(text), victim, seq)
        )


def tamper_redis(prefix: str, victim: str, other: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        request = client.hget(f"{prefix}task:{victim}", "request")
        assert request
        client.hset(f"{prefix}task:{victim}", "request", flip(request))
        client.hset(f"{prefix}task:{other}", "request", request)
        events = client.lrange(f"{prefix}events:{victim}", 0, -1)
        index = next(i for i, raw in enumerate(events) if raw.startswith(b'["text"'))
        client.lset(f"{prefix}events:{victim}", index, flip(events[index]))
    finally:
        client.close()


def flip(sealed: bytes) -> bytes:
    """`sealed` with one bit of its last byte (inside the ciphertext's tag) flipped."""
    return bytes(sealed[:-1]) + bytes([sealed[-1] ^ 0x01])


def stored_key(db: Path, task_id: str) -> str:
    """The key id the stored request of `task_id` names, read from the file."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        (request,) = conn.execute(
            "SELECT request FROM tasks WHERE task_id = ?", (task_id,)
        ).fetchone()
    return bytes(request)[1 : bytes(request).index(b"\x00")].decode()


def replace_key_file(path: Path, ring: dict[str, object]) -> None:
    """Write a key file as an operator would: a private temporary file renamed into place."""
    temporary = path.with_name(f"edit-{secrets.token_hex(4)}.json")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(ring, handle)
    os.replace(temporary, path)


def test_a_readable_key_file_stops_the_kernel_with_a_clear_error(tmp_path: Path) -> None:
    key_file = tmp_path / "keys.json"
    key_file.write_text(
        json.dumps({"active": "k1", "keys": {"k1": base64.b64encode(bytes(32)).decode()}})
    )
    key_file.chmod(0o640)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmos.kernel.cli",
            "serve",
            "kernel",
            "--port",
            "1",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LLMOS_PRIVACY_KEY_FILE": str(key_file), "LLMOS_LOG_FORMAT": "text"},
        check=False,
    )
    assert done.returncode != 0
    assert f"chmod 600 {key_file}" in done.stdout + done.stderr
