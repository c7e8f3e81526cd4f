"""The Redis server the Redis code paths are tested against, and per-test key prefixes.

Tests use a real server (127.0.0.1:6379 by default; `LLMOS_TEST_REDIS_PORT` or
`LLMOS_TEST_REDIS_URL` override it),
database 15, each test under its own key prefix, deleted afterwards, so runs never see
each other's keys. `.ci/run` starts a server when none is running.
"""

from __future__ import annotations

import os
import uuid

import redis

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
