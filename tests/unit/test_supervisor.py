"""RestartIntensity: at most N restarts within a sliding window, with the clock passed in."""

from __future__ import annotations

from llmos.kernel.supervisor import RestartIntensity


def test_allows_max_restarts_within_the_window_then_refuses() -> None:
    intensity = RestartIntensity(max_restarts=3, window_s=10.0)

    assert [intensity.allow(now) for now in (100.0, 101.0, 102.0)] == [True, True, True]
    assert not intensity.allow(103.0)
    assert not intensity.allow(109.9)


def test_allows_again_once_the_oldest_restart_leaves_the_window() -> None:
    intensity = RestartIntensity(max_restarts=3, window_s=10.0)
    for now in (100.0, 101.0, 102.0):
        assert intensity.allow(now)

    # 100.0 has slid out; 101.0 and 102.0 have not, so exactly one more fits.
    assert intensity.allow(110.5)
    assert not intensity.allow(110.6)
    # 101.0 and 102.0 slide out together.
    assert intensity.allow(112.5)
    assert intensity.allow(112.6)
    assert not intensity.allow(112.7)


def test_refused_restarts_do_not_count() -> None:
    intensity = RestartIntensity(max_restarts=1, window_s=5.0)

    assert intensity.allow(0.0)
    for now in (1.0, 2.0, 3.0, 4.0):
        assert not intensity.allow(now)
    # Only the restart at 0.0 was recorded, so 5.5 is free although 4.0 was refused.
    assert intensity.allow(5.5)


def test_restarts_far_apart_are_always_allowed() -> None:
    intensity = RestartIntensity(max_restarts=2, window_s=60.0)

    assert all(intensity.allow(now) for now in (0.0, 100.0, 200.0, 300.0, 400.0))


def test_zero_max_restarts_never_allows() -> None:
    intensity = RestartIntensity(max_restarts=0, window_s=60.0)

    assert not intensity.allow(0.0)
    assert not intensity.allow(1000.0)
