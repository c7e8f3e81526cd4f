"""How many retries `redis_retry_s` buys: the backoff waits (0.1 s doubling to 1 s) summed."""

from __future__ import annotations

import pytest

from llmos.kernel.store.redis import retries_within
from llmos.services.errors import InvalidArgument


@pytest.mark.parametrize(
    ("budget_s", "retries"),
    [(0.0, 0), (0.09, 0), (0.1, 1), (0.31, 2), (1.5, 4), (2.49, 4), (2.5, 5), (10.0, 12)],
)
def test_retries_fit_the_budget(budget_s: float, retries: int) -> None:
    assert retries_within(budget_s) == retries


def test_a_negative_budget_is_a_bad_setting() -> None:
    with pytest.raises(InvalidArgument) as caught:
        retries_within(-1.0)
    assert caught.value.reason == "BAD_SETTING"
    assert "redis_retry_s" in caught.value.message
