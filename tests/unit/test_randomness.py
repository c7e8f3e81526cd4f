"""The pooled random bytes: every byte handed out once, never shared with a forked child."""

from __future__ import annotations

import os

from llmos.services.randomness import POOL_BYTES, random_bytes


def test_requests_across_a_refill_and_larger_than_the_pool_are_served_whole() -> None:
    pieces = [random_bytes(12) for _ in range(2 * POOL_BYTES // 12)]
    assert all(len(piece) == 12 for piece in pieces)
    assert len(set(pieces)) == len(pieces)  # 96 random bits each: a repeat is a bug
    assert len(random_bytes(POOL_BYTES + 1)) == POOL_BYTES + 1


def test_a_forked_child_does_not_hand_out_its_parents_next_bytes() -> None:
    random_bytes(1)  # the pool is filled: the child inherits a copy of it
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.write(write, random_bytes(16))
        os._exit(0)
    os.close(write)
    from_child = os.read(read, 16)
    os.close(read)
    os.waitpid(child, 0)
    assert len(from_child) == 16 and from_child != random_bytes(16)
