"""Reservation accounting (services/hardware/ledger.py) and the request checks
(services/hardware/checks.py): pure logic, the time passed in."""

from __future__ import annotations

import itertools
import random

import pytest

from llmos.services.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from llmos.services.hardware.checks import (
    CPU,
    MAX_TTL_S,
    Device,
    check_bytes,
    check_holder,
    check_reservation_id,
    check_ttl,
    holder_pid,
    human_bytes,
    parse_device,
    watch_interval,
)
from llmos.services.hardware.ledger import Capacity, Holder, Ledger

GIB = 2**30
GPU0 = Device("gpu", 0)
ROOMY = Capacity(total_bytes=16 * GIB, available_bytes=10 * GIB)


def ledger() -> Ledger:
    counter = itertools.count(1)
    return Ledger(new_id=lambda: f"r{next(counter)}")


# ---------------------------------------------------------------- fitting


def test_reservations_fit_until_available_minus_reserved_is_used_up() -> None:
    book = ledger()
    first = book.reserve(CPU, 6 * GIB, Holder("a"), ttl_s=60, capacity=ROOMY, now=0)
    assert first.id == "r1" and first.expires_at == 60
    book.reserve(CPU, 4 * GIB, Holder("b"), ttl_s=60, capacity=ROOMY, now=1)  # exactly what is left
    assert book.reserved(CPU, now=2) == 10 * GIB
    with pytest.raises(ResourceExhausted) as caught:
        book.reserve(CPU, 1, Holder("c"), ttl_s=60, capacity=ROOMY, now=2)
    error = caught.value
    assert error.reason == "INSUFFICIENT_MEMORY"
    assert "0 B is free" in error.message
    assert "10.0 GiB available minus 10.0 GiB reserved" in error.message
    assert error.metadata["free_bytes"] == "0"
    assert error.metadata["requested_bytes"] == "1"
    assert len(book) == 2, "a refused reservation leaves no trace"


def test_the_refusal_names_what_is_free() -> None:
    book = ledger()
    book.reserve(CPU, 7 * GIB, Holder("a"), ttl_s=60, capacity=ROOMY, now=0)
    with pytest.raises(ResourceExhausted) as caught:
        book.reserve(CPU, 4 * GIB, Holder("b"), ttl_s=60, capacity=ROOMY, now=0)
    assert "cannot reserve 4.0 GiB of cpu for 'b': 3.0 GiB is free" in caught.value.message
    assert caught.value.metadata["free_bytes"] == str(3 * GIB)


def test_devices_are_counted_apart() -> None:
    book = ledger()
    book.reserve(CPU, 10 * GIB, Holder("a"), ttl_s=60, capacity=ROOMY, now=0)
    book.reserve(GPU0, 10 * GIB, Holder("a"), ttl_s=60, capacity=ROOMY, now=0)
    assert book.reserved(CPU, 0) == book.reserved(GPU0, 0) == 10 * GIB
    assert book.reserved(Device("gpu", 1), 0) == 0


def test_less_available_than_reserved_leaves_nothing_free_not_a_negative_figure() -> None:
    book = ledger()
    book.reserve(CPU, 8 * GIB, Holder("a"), ttl_s=60, capacity=ROOMY, now=0)
    shrunk = Capacity(total_bytes=16 * GIB, available_bytes=5 * GIB)
    with pytest.raises(ResourceExhausted) as caught:
        book.reserve(CPU, 1, Holder("b"), ttl_s=60, capacity=shrunk, now=0)
    assert caught.value.metadata["free_bytes"] == "0"


# ---------------------------------------------------------------- expiry and renewal


def test_a_reservation_ends_when_its_ttl_passes_and_frees_its_bytes() -> None:
    book = ledger()
    book.reserve(CPU, 10 * GIB, Holder("a"), ttl_s=30, capacity=ROOMY, now=100)
    assert book.reserved(CPU, now=129.9) == 10 * GIB
    assert book.reserved(CPU, now=130) == 0, "expired at expires_at, even before a sweep"
    ended = book.end_expired(now=130)
    assert [e.reservation.id for e in ended] == ["r1"] and "ttl" in ended[0].why
    assert len(book) == 0
    book.reserve(CPU, 10 * GIB, Holder("b"), ttl_s=30, capacity=ROOMY, now=130)


def test_an_expired_reservation_frees_room_for_a_new_one_without_a_sweep() -> None:
    book = ledger()
    book.reserve(CPU, 10 * GIB, Holder("a"), ttl_s=30, capacity=ROOMY, now=0)
    book.reserve(CPU, 10 * GIB, Holder("b"), ttl_s=30, capacity=ROOMY, now=31)
    assert [r.holder.name for r in book.reservations()] == ["b"]


def test_renewal_restarts_the_ttl_from_now() -> None:
    book = ledger()
    book.reserve(CPU, GIB, Holder("a"), ttl_s=30, capacity=ROOMY, now=0)
    renewed = book.renew("r1", "a", 30, now=25)
    assert renewed.expires_at == 55
    assert book.reserved(CPU, now=50) == GIB
    assert book.reserved(CPU, now=55) == 0


def test_renewal_may_repeat_the_device_and_size_but_not_change_them() -> None:
    book = ledger()
    book.reserve(CPU, GIB, Holder("a"), ttl_s=30, capacity=ROOMY, now=0)
    book.renew("r1", "a", 30, now=1, device=CPU, size=GIB)
    for device, size in ((GPU0, None), (None, 2 * GIB), (CPU, 1)):
        with pytest.raises(InvalidArgument) as caught:
            book.renew("r1", "a", 30, now=2, device=device, size=size)
        assert caught.value.reason == "RENEWAL_MISMATCH"
        assert "Release and Reserve again" in caught.value.message


def test_renewal_is_never_refused_for_lack_of_memory() -> None:
    book = ledger()
    book.reserve(CPU, 10 * GIB, Holder("a"), ttl_s=30, capacity=ROOMY, now=0)
    # The host's available memory dropped to nothing meanwhile: the claim stands.
    assert book.renew("r1", "a", 30, now=10).expires_at == 40


def test_an_expired_reservation_cannot_be_renewed() -> None:
    book = ledger()
    book.reserve(CPU, GIB, Holder("a"), ttl_s=30, capacity=ROOMY, now=0)
    with pytest.raises(NotFound) as caught:
        book.renew("r1", "a", 30, now=30)
    assert caught.value.reason == "RESERVATION_NOT_FOUND"
    assert "Reserve makes a new one" in caught.value.message


# ---------------------------------------------------------------- release and holders


def test_release_frees_the_bytes_and_only_once() -> None:
    book = ledger()
    book.reserve(CPU, 10 * GIB, Holder("a"), ttl_s=30, capacity=ROOMY, now=0)
    released = book.release("r1", "a", now=1)
    assert released.bytes == 10 * GIB and book.reserved(CPU, 1) == 0
    with pytest.raises(NotFound):
        book.release("r1", "a", now=2)


def test_only_the_holder_may_release_or_renew() -> None:
    book = ledger()
    book.reserve(CPU, GIB, Holder("a"), ttl_s=30, capacity=ROOMY, now=0)
    for call in (lambda: book.release("r1", "b", now=1), lambda: book.renew("r1", "b", 30, 1)):
        with pytest.raises(PermissionDenied) as caught:
            call()
        assert caught.value.reason == "NOT_HOLDER"
        assert "held by 'a', not 'b'" in caught.value.message
    assert book.reserved(CPU, 1) == GIB, "a refused release leaves the reservation alone"


def test_unknown_reservations_are_not_found() -> None:
    with pytest.raises(NotFound) as caught:
        ledger().release("nope", "a", now=0)
    assert caught.value.metadata == {"reservation_id": "nope"}


def test_reservations_of_a_holder_whose_process_ended_are_dropped() -> None:
    book = ledger()
    dead = Holder("pid:41", pid=41, started_at=5.0)
    live = Holder("pid:42", pid=42, started_at=6.0)
    book.reserve(CPU, GIB, dead, ttl_s=300, capacity=ROOMY, now=0)
    book.reserve(GPU0, GIB, dead, ttl_s=300, capacity=ROOMY, now=0)
    book.reserve(CPU, GIB, live, ttl_s=300, capacity=ROOMY, now=0)
    book.reserve(
        CPU, GIB, Holder("batch-job"), ttl_s=300, capacity=ROOMY, now=0
    )  # no process to watch
    asked: list[Holder] = []

    def alive(holder: Holder) -> bool:
        asked.append(holder)
        return holder.pid == 42

    ended = book.end_orphaned(alive)
    assert sorted(e.reservation.id for e in ended) == ["r1", "r2"]
    assert all("process 41 ended" in e.why for e in ended)
    assert {h.name for h in asked} == {"pid:41", "pid:42"}, "only process holders are checked"
    assert [r.holder.name for r in book.reservations()] == ["pid:42", "batch-job"]


def test_random_operations_keep_the_books_balanced() -> None:
    """Whatever the order of reserves, renewals, releases and expiries, the bytes reserved
    never exceed what was available, and equal the sum of the live reservations."""
    rng = random.Random(7)
    book = ledger()
    capacity = Capacity(total_bytes=100, available_bytes=100)
    live: dict[str, tuple[str, int, float]] = {}  # id -> holder, bytes, expires_at
    now = 0.0
    for _ in range(2000):
        now += rng.random()
        live = {k: v for k, v in live.items() if v[2] > now}
        action = rng.random()
        if action < 0.5:
            holder, size, ttl = rng.choice("abc"), rng.randint(1, 60), rng.uniform(0.5, 10)
            free = 100 - sum(v[1] for v in live.values())
            try:
                reservation = book.reserve(
                    CPU, size, Holder(holder), ttl_s=ttl, capacity=capacity, now=now
                )
            except ResourceExhausted:
                assert size > free
            else:
                assert size <= free
                live[reservation.id] = (holder, size, now + ttl)
        elif live and action < 0.75:
            key = rng.choice(sorted(live))
            holder, size, _ = live[key]
            book.renew(key, holder, 5, now)
            live[key] = (holder, size, now + 5)
        elif live:
            key = rng.choice(sorted(live))
            book.release(key, live.pop(key)[0], now)
        assert book.reserved(CPU, now) == sum(v[1] for v in live.values()) <= 100


# ---------------------------------------------------------------- request checks


@pytest.mark.parametrize(
    ("text", "device"), [("cpu", CPU), ("gpu:0", GPU0), ("gpu:12", Device("gpu", 12))]
)
def test_devices_parse(text: str, device: Device) -> None:
    assert parse_device(text) == device
    assert str(device) == text


@pytest.mark.parametrize("text", ["", "CPU", "gpu", "gpu:", "gpu:-1", "gpu:x", "tpu:0", " cpu"])
def test_unknown_devices_are_refused_with_the_valid_forms(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_device(text)
    assert caught.value.reason == "UNKNOWN_DEVICE"
    assert "'cpu'" in caught.value.message and "'gpu:N'" in caught.value.message


@pytest.mark.parametrize("count", [0, -1, -(2**63)])
def test_byte_counts_must_be_positive(count: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_bytes(count, CPU, 16 * GIB)
    assert caught.value.reason == "BAD_BYTES"
    assert "more than 0" in caught.value.message


def test_byte_counts_beyond_the_device_total_are_a_mistake_not_a_shortage() -> None:
    assert check_bytes(16 * GIB, CPU, 16 * GIB) == 16 * GIB
    with pytest.raises(InvalidArgument) as caught:
        check_bytes(2**62, GPU0, 16 * GIB)
    assert caught.value.reason == "BAD_BYTES"
    assert "more than gpu:0's total memory" in caught.value.message
    assert "16.0 GiB" in caught.value.message


def test_ttl_is_required_positive_and_bounded() -> None:
    assert check_ttl(True, 0.5) == 0.5
    assert check_ttl(True, MAX_TTL_S) == MAX_TTL_S
    for present, seconds, words in (
        (False, 0.0, "ttl is required"),
        (True, 0.0, "ttl is required"),
        (True, -1.0, "more than 0 s"),
        (True, MAX_TTL_S + 1, "24 hours"),
    ):
        with pytest.raises(InvalidArgument) as caught:
            check_ttl(present, seconds)
        assert caught.value.reason == "BAD_TTL" and words in caught.value.message


def test_holders() -> None:
    assert check_holder("runtime") == "runtime"
    assert holder_pid("pid:1234") == 1234
    assert holder_pid("runtime") is None
    bad_holders = (("", "HOLDER_MISSING"), ("  ", "HOLDER_MISSING"), ("x" * 300, "BAD_HOLDER"))
    for bad, reason in bad_holders:
        with pytest.raises(InvalidArgument) as caught:
            check_holder(bad)
        assert caught.value.reason == reason
    for bad in ("pid:", "pid:abc", "pid:0", "pid:-4", "pid:99999999999"):
        with pytest.raises(InvalidArgument) as caught:
            holder_pid(bad)
        assert caught.value.reason == "BAD_HOLDER"
    with pytest.raises(InvalidArgument) as caught:
        check_reservation_id("")
    assert caught.value.reason == "RESERVATION_ID_MISSING"


def test_watch_intervals() -> None:
    assert watch_interval(False, 0.0) == 1.0, "unset means one second"
    assert watch_interval(True, 0.1) == 0.1
    assert watch_interval(True, 60.0) == 60.0
    for seconds in (0.0, 0.099, -1.0, 61.0):
        with pytest.raises(InvalidArgument) as caught:
            watch_interval(True, seconds)
        assert caught.value.reason == "BAD_INTERVAL"
        assert "between 100 ms and 60 s" in caught.value.message


def test_human_bytes() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 * GIB) == "3.0 GiB"
    assert human_bytes(2**50) == "1024.0 TiB"
