"""The Redis server the Redis code paths are tested against, and per-test key prefixes.

Tests use a real server (127.0.0.1:6379 by default; `LLMOS_TEST_REDIS_PORT` or
`LLMOS_TEST_REDIS_URL` override it),
database 15, each test under its own key prefix, deleted afterwards, so runs never see
each other's keys. `.ci/run` starts a server when none is running.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import redis
from stacktools import REPO, free_port_block

PORT = os.environ.get("LLMOS_TEST_REDIS_PORT", "6379")
REDIS_URL = os.environ.get("LLMOS_TEST_REDIS_URL", f"redis://127.0.0.1:{PORT}/15")


def fresh_prefix(label: str = "test") -> str:
    return f"llmos-{label}-{uuid.uuid4().hex[:10]}:"


def delete_prefix(prefix: str, url: str = REDIS_URL) -> None:
    """Delete every key under `prefix` (a finished test's)."""
    client = redis.Redis.from_url(url)
    try:
        batch = list(client.scan_iter(match=f"{prefix}*", count=1000))
        while batch:
            client.delete(*batch[:1000])
            batch = batch[1000:]
    finally:
        client.close()


def raw_bytes(prefix: str, *, dump: bool = True, url: str = REDIS_URL) -> bytes:
    """Every key under `prefix` with everything it holds, raw: the key, its value read by
    type (streams included) and, with `dump`, its DUMP (what an RDB snapshot or a replica
    carries). For tests that look for plaintext, or for what a forget left behind.

    A forget test reads without `dump`: a stream's DUMP keeps XDEL'd entries until their
    whole node is empty, which docs/privacy.md names as a limit, not something a forget
    can reach."""
    client = redis.Redis.from_url(url)
    parts: list[bytes] = []
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            parts += [key, client.dump(key) or b""] if dump else [key]
            kind = client.type(key).decode()
            if kind == "string":
                parts.append(client.get(key) or b"")
            elif kind == "hash":
                parts += [b for pair in client.hgetall(key).items() for b in pair]
            elif kind == "list":
                parts += client.lrange(key, 0, -1)
            elif kind == "set":
                parts += list(client.smembers(key))
            elif kind == "zset":
                parts += client.zrange(key, 0, -1)
            elif kind == "stream":
                for entry_id, fields in client.xrange(key):
                    parts.append(entry_id)
                    parts += [b for pair in fields.items() for b in pair]
            else:
                raise AssertionError(f"key {key!r} has a type this check does not read: {kind}")
    finally:
        client.close()
    return b"\n".join(parts)


class RedisServer:
    """A redis-server of a test's own with the project's configuration
    (deploy/redis/redis.conf: AOF on, RDB preamble), its files in `directory`, on a free port:
    for tests that restart the server or read its files, which the shared one cannot allow."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port_block(1)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (scripts/test.sh installs it)"
        config = REPO / "deploy" / "redis" / "redis.conf"
        argv = [binary, str(config), "--port", str(self.port), "--dir", str(self.directory)]
        with (self.directory / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        """A clean shutdown (SIGTERM): Redis writes the AOF out and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
