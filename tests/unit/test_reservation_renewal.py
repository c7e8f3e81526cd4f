"""When the runtime renews its host-memory reservations (services/runtime/reservations.py)."""

from __future__ import annotations

from llmos.services.runtime.reservations import RENEW_RETRY_S, TTL_S, renewal_wait_s


def test_renewals_come_every_third_of_the_ttl_while_they_succeed() -> None:
    assert renewal_wait_s(0) == TTL_S / 3


def test_after_failed_rounds_the_next_comes_sooner_doubling_up_to_the_usual_wait() -> None:
    waits = [renewal_wait_s(failed) for failed in range(1, 8)]
    assert waits[:3] == [RENEW_RETRY_S, 2 * RENEW_RETRY_S, 4 * RENEW_RETRY_S]
    assert waits == sorted(waits)
    assert max(waits) == TTL_S / 3
    # A blip gets several tries before the reservation's TTL runs out.
    assert sum(waits[:4]) < TTL_S / 3
