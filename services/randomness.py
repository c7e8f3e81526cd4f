"""Random bytes from the operating system, fetched a few kilobytes at a time.

`os.urandom` is a system call that releases the interpreter lock, and a thread that
releases it waits to get it back. The kernel called it on every request (the task id)
and for every value the task store seals (a nonce), from the event loop and from the
store's thread at once; on a loaded machine each call cost tens of microseconds of
waiting. Here one call fills a pool that serves a few hundred such requests.

The bytes are the OS's cryptographic generator's either way, and each byte is handed out
once. Each thread has its own pool (no lock), and a forked child drops the pool it
inherited, so parent and child never hand out the same bytes: a nonce used twice under
one AES-GCM key would give the key away.
"""

from __future__ import annotations

import os
import threading

POOL_BYTES = 4096


class _Pool(threading.local):
    buffer: bytes = b""
    offset: int = 0


_POOL = _Pool()


def random_bytes(count: int) -> bytes:
    """`count` bytes from the OS's cryptographic random generator."""
    pool = _POOL
    start, end = pool.offset, pool.offset + count
    if end > len(pool.buffer):
        pool.buffer, start, end = os.urandom(max(POOL_BYTES, count)), 0, count
    pool.offset = end
    return pool.buffer[start:end]


def _drop_pool() -> None:
    _POOL.buffer, _POOL.offset = b"", 0


os.register_at_fork(after_in_child=_drop_pool)
