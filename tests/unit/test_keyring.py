"""The key ring's envelope and key file handling, as pure logic (no processes)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from llmos.kernel.store.sealing import EVENT, REQUEST, Sealer
from llmos.services.errors import DataLoss, FailedPrecondition
from llmos.services.keyring import (
    KEY_BYTES,
    DekCache,
    KeyRing,
    from_file,
    from_setting,
    key_id_of,
    rotate_file,
    write_file,
)

TASK = "0195-running-task"


def test_a_sealed_value_opens_only_in_its_own_context() -> None:
    ring = KeyRing.generate()
    sealed = ring.seal(b"the prompt", b"task/t1/request")
    assert b"the prompt" not in sealed and key_id_of(sealed) == "k1"
    assert ring.open(sealed, b"task/t1/request", "x") == b"the prompt"
    with pytest.raises(DataLoss):
        ring.open(sealed, b"task/t2/request", "x")  # moved to another record
    for index in range(len(sealed)):  # any flipped byte is caught
        altered = bytearray(sealed)
        altered[index] ^= 0x40
        with pytest.raises((DataLoss, FailedPrecondition)):
            ring.open(bytes(altered), b"task/t1/request", "x")
    assert ring.seal(b"the prompt", b"c") != ring.seal(b"the prompt", b"c")  # fresh DEK, nonces


def test_a_dek_per_context_keeps_the_envelope_and_its_checks() -> None:
    ring = KeyRing.generate()
    deks = DekCache(ring)
    first, second = deks.seal(b"one", b"task/t1/event"), deks.seal(b"two", b"task/t1/event")
    other = deks.seal(b"one", b"task/t2/event")
    wrapped = len(b"\x01k1\x00") + 12 + KEY_BYTES + 16
    assert first[:wrapped] == second[:wrapped] != other[:wrapped]  # a DEK per context
    assert first != deks.seal(b"one", b"task/t1/event")  # a fresh nonce per value
    # The ring's own envelope: either side opens the other's values.
    assert ring.open(second, b"task/t1/event", "x") == b"two"
    assert deks.open(ring.seal(b"three", b"task/t1/event"), b"task/t1/event", "x") == b"three"
    assert deks.open(first, b"task/t1/event", "x") == b"one"
    with pytest.raises(DataLoss):  # a cached DEK does not let a value move
        deks.open(first, b"task/t2/event", "x")
    for index in range(len(first)):  # any flipped byte is caught, cached or not
        altered = bytearray(first)
        altered[index] ^= 0x40
        with pytest.raises((DataLoss, FailedPrecondition)):
            deks.open(bytes(altered), b"task/t1/event", "x")


def test_a_prepared_context_seals_with_the_dek_made_then(monkeypatch: pytest.MonkeyPatch) -> None:
    """`prepare` makes the DEK (random bytes for it and its wrap nonce); the first value
    sealed afterwards takes only its own nonce, and carries that DEK."""
    from llmos.services import keyring

    drawn: list[int] = []
    real = keyring.random_bytes
    monkeypatch.setattr(keyring, "random_bytes", lambda n: drawn.append(n) or real(n))
    deks = DekCache(KeyRing.generate())

    deks.prepare(b"task/t1/trace")
    assert drawn == [KEY_BYTES + 12]
    sealed = deks.seal(b"step", b"task/t1/trace")
    assert drawn == [KEY_BYTES + 12, 12]

    wrapped = len(b"\x01k1\x00") + 12 + KEY_BYTES + 16
    assert sealed[:wrapped] == deks.seal(b"next", b"task/t1/trace")[:wrapped]
    assert deks.open(sealed, b"task/t1/trace", "x") == b"step"


def test_a_dek_per_context_follows_rotation_and_a_removed_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    write_file(path, KeyRing.generate())
    ring = from_file(path)
    deks = DekCache(ring)
    before = deks.seal(b"v", b"c")
    rotate_file(ring)
    after = deks.seal(b"w", b"c")
    assert key_id_of(before) == "k1" and key_id_of(after) == "k2"
    assert deks.open(before, b"c", "x") == b"v"  # its DEK is cached now
    small = DekCache(ring, size=2)
    for context in (b"d", b"e", b"f"):  # more contexts than it keeps: it starts over
        assert small.open(small.seal(b"x", context), context, "x") == b"x"
    # k1 leaves the key file: a value sealed under it no longer opens, cached DEK or not.
    data = json.loads(path.read_text())
    del data["keys"]["k1"]
    path.write_text(json.dumps(data))
    ring.reload(force=True)
    with pytest.raises(FailedPrecondition) as caught:
        deks.open(before, b"c", "x")
    assert caught.value.reason == "KEY_NOT_FOUND"
    assert deks.open(after, b"c", "x") == b"w"


def test_a_dek_per_context_starts_afresh_when_its_key_id_gets_other_bytes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys.json"
    write_file(path, KeyRing.generate())
    ring = from_file(path)
    deks = DekCache(ring)
    deks.seal(b"v", b"c")  # a DEK for context c, wrapped under k1's first bytes
    # The key file is replaced by one with other bytes under the same id "k1".
    path.unlink()
    write_file(path, KeyRing.generate())
    ring.reload(force=True)
    after = deks.seal(b"w", b"c")
    assert from_file(path).open(after, b"c", "x") == b"w"  # a fresh process opens it


def test_an_unknown_key_is_named(tmp_path: Path) -> None:
    sealed = KeyRing({"old": bytes(32)}, "old", "t").seal(b"v", b"c")
    with pytest.raises(FailedPrecondition, match="'old'") as caught:
        KeyRing.generate().open(sealed, b"c", "x")
    assert caught.value.reason == "KEY_NOT_FOUND"


def test_rotation_adds_a_key_and_rewrap_moves_only_the_wrapped_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    write_file(path, KeyRing.generate())
    ring = from_file(path)
    sealed = ring.seal(b"v" * 100, b"c")
    assert rotate_file(ring) == "k2" and ring.active == "k2"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(json.loads(path.read_text())["keys"]) == {"k1", "k2"}
    moved = ring.rewrap(sealed, b"c", "x")
    assert moved is not None and key_id_of(moved) == "k2"
    assert moved[-116:] == sealed[-116:]  # data nonce + ciphertext + tag unchanged
    assert ring.open(moved, b"c", "x") == b"v" * 100
    assert ring.rewrap(moved, b"c", "x") is None


def test_another_process_rotation_is_seen_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    write_file(path, KeyRing.generate())
    reader, writer = from_file(path), from_file(path)
    rotate_file(writer)
    sealed = writer.seal(b"v", b"c")
    assert reader.open(sealed, b"c", "x") == b"v"  # an unknown id makes it look at the file
    assert reader.active == "k2"


def test_keys_from_the_setting_cannot_be_rotated_here() -> None:
    ring = from_setting("a:" + "A" * 43 + "=")
    with pytest.raises(FailedPrecondition) as caught:
        rotate_file(ring)
    assert caught.value.reason == "KEYS_FROM_SETTING"


def test_requests_sealed_once_per_task_do_not_push_out_a_running_tasks_event_key() -> None:
    sealer = Sealer(KeyRing.generate())
    wrapped = len(b"\x01k1\x00") + 12 + KEY_BYTES + 16
    first = sealer.seal(TASK, EVENT, b"a token")
    for index in range(5_000):  # more tasks arrive than the cache holds contexts
        request = sealer.seal(f"t{index}", REQUEST, b"a prompt")
        assert sealer.open(f"t{index}", REQUEST, request) == b"a prompt"

    later = sealer.seal(TASK, EVENT, b"another token")

    assert later[:wrapped] == first[:wrapped]  # the event's DEK survived
    assert sealer.open(TASK, EVENT, later) == b"another token"
    two = sealer.seal(TASK, REQUEST, b"p"), sealer.seal(TASK, REQUEST, b"p")
    assert two[0][:wrapped] != two[1][:wrapped]  # a one-off field: a fresh DEK each time
