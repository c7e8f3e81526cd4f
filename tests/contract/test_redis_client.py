"""The Redis client the task store and work queue use (`kernel.store.redis.connect`), on a
real server: more commands in flight than its pool holds wait for a connection instead of
failing. redis-py's default pool fails the 101st at once ("Too many connections"), which
two kernels given 200 tasks together reached."""

from __future__ import annotations

import asyncio

from redistools import REDIS_URL, fresh_prefix

from llmos.kernel.store.redis import POOL_CONNECTIONS, connect


def test_more_commands_in_flight_than_the_pool_holds_all_complete() -> None:
    async def run() -> tuple[list[object], int]:
        client = connect(REDIS_URL)
        key = fresh_prefix("pool") + ":empty"
        try:
            # Each BLPOP holds its connection for 0.3 s: 3x the pool's size at once.
            results = await asyncio.gather(
                *(client.blpop([key], timeout=0.3) for _ in range(3 * POOL_CONNECTIONS)),
                return_exceptions=True,
            )
            pool = client.connection_pool
            opened = len(pool._available_connections) + len(pool._in_use_connections)
        finally:
            await client.aclose()
        return results, opened

    results, opened = asyncio.run(run())

    assert [r for r in results if isinstance(r, BaseException)] == []
    assert results == [None] * (3 * POOL_CONNECTIONS)  # each timed out on the empty list
    assert 0 < opened <= POOL_CONNECTIONS
