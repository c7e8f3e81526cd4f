"""The privacy service's pure logic: checksums, overlap resolution, operators, restore on a
stream, key files, scoring. No model, no server (the real ones are in
tests/integration/test_privacy_service.py)."""

from __future__ import annotations

import random
import stat
from pathlib import Path

import pytest

from llmos.services.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from llmos.services.keyring import KeyRing, from_file, load_keys, write_file
from llmos.services.privacy import evaluation
from llmos.services.privacy.operators import (
    ENCRYPT,
    PSEUDONYMIZE,
    Redactor,
    StreamRestorer,
    restore,
    seal,
    unseal,
)
from llmos.services.privacy.recognizers import (
    Detector,
    Finding,
    find_patterns,
    iban_ok,
    luhn_ok,
    resolve,
    ssn_ok,
)
from llmos.services.privacy.vault import Vault


def test_checksums() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89370400440532013000") and not iban_ok("DE89370400440532013001")
    assert ssn_ok("219", "09", "9999")
    refused = [("000", "12", "3456"), ("666", "12", "3456"), ("912", "12", "3456"),
               ("123", "00", "4567"), ("123", "45", "0000")]  # fmt: skip
    assert not any(ssn_ok(*parts) for parts in refused)


def test_patterns_need_their_checksums() -> None:
    text = "cards 4111 1111 1111 1111 and 4111 1111 1111 1112, ssn 000-12-3456, ip 999.1.1.1"
    found = {(f.type, text[f.start : f.end]) for f in find_patterns(text)}
    assert found == {("CREDIT_CARD", "4111 1111 1111 1111")}


def finding(kind: str, start: int, end: int, score: float) -> Finding:
    return Finding(kind, start, end, score, "test", "")


def test_resolve_keeps_the_surest_of_overlapping_findings_in_text_order() -> None:
    kept = resolve([
        finding("ORG", 0, 20, 0.5), finding("EMAIL_ADDRESS", 0, 20, 1.0),
        finding("PERSON", 25, 35, 0.85), finding("PERSON", 30, 40, 0.6),
        finding("LOCATION", 2, 4, 0.9),
    ])  # fmt: skip
    assert [(f.type, f.start, f.end) for f in kept] == [
        ("EMAIL_ADDRESS", 0, 20),
        ("PERSON", 25, 35),
    ]


def test_random_overlaps_always_round_trip(tmp_path: Path) -> None:
    """Whatever overlaps the recognizers produce, pseudonymize then restore is exact."""
    rng = random.Random(3)
    keys = KeyRing.generate()
    vault = Vault(tmp_path / "vault.sqlite3", keys)
    redactor = Redactor(keys, vault)
    for trial in range(200):
        text = "".join(rng.choice("ab <>_PERSON1 ") for _ in range(40))
        raw = []
        for _ in range(rng.randint(0, 6)):
            start = rng.randrange(0, 39)
            raw.append(finding(rng.choice(["PERSON", "LOCATION"]), start,
                               rng.randint(start + 1, 40), rng.random()))  # fmt: skip
        spans = resolve(raw)
        conversation = f"c{trial}"
        redacted = redactor.redact(text, spans, PSEUDONYMIZE, "t", conversation)
        back, _ = restore(redacted, vault.values("t", conversation), lambda *a: "")
        assert back == text, (text, spans, redacted)


def test_stream_restorer_holds_back_only_what_may_be_a_token() -> None:
    values = {"<PERSON_1>": "Zoë"}
    stream = StreamRestorer(lambda text: restore(text, values, lambda *a: "")[0])
    out = [stream.feed(chunk) for chunk in ["a <", "PER", "SON_", "1> b < c", " <x"]]
    out.append(stream.close())
    assert out == ["a ", "", "", "Zoë b < c", " ", "<x"]
    assert "".join(out) == "a Zoë b < c <x"


def test_every_split_of_a_stream_restores_the_same(tmp_path: Path) -> None:
    values = {"<PERSON_1>": "Zoë Martin", "<EMAIL_ADDRESS_1>": "z@example.org"}
    text = "Hi <PERSON_1>, mail <EMAIL_ADDRESS_1> or <PERSON_2>."
    whole = restore(text, values, lambda *a: "")[0]
    for cut in range(len(text) + 1):
        for second in range(cut, len(text) + 1):
            stream = StreamRestorer(lambda t: restore(t, values, lambda *a: "")[0])
            parts = [stream.feed(text[:cut]), stream.feed(text[cut:second]),
                     stream.feed(text[second:]), stream.close()]  # fmt: skip
            assert "".join(parts) == whole


def test_encrypt_tokens_are_bound_to_tenant_and_type() -> None:
    keys = KeyRing.generate()
    token = seal(keys, "acme", "PERSON", "Zoë")
    key_id, payload = token[1:-1].split(":")[2:]
    assert unseal(keys, "acme", "PERSON", key_id, payload) == "Zoë"
    with pytest.raises(PermissionDenied):
        unseal(keys, "globex", "PERSON", key_id, payload)
    with pytest.raises(PermissionDenied):
        unseal(keys, "acme", "LOCATION", key_id, payload)
    with pytest.raises(FailedPrecondition):
        unseal(keys, "acme", "PERSON", "k2", payload)
    other = KeyRing.generate()
    with pytest.raises(PermissionDenied):
        unseal(other, "acme", "PERSON", key_id, payload)


def test_pseudonyms_skip_numbers_the_text_already_uses(tmp_path: Path) -> None:
    keys = KeyRing.generate()
    redactor = Redactor(keys, Vault(tmp_path / "v.sqlite3", keys))
    text = "<PERSON_1> is a literal; Ann is not"
    spans = [finding("PERSON", 25, 28, 0.9)]
    redacted = redactor.redact(text, spans, PSEUDONYMIZE, "t", "c")
    assert redacted == "<PERSON_1> is a literal; <PERSON_2> is not"
    with pytest.raises(InvalidArgument):
        redactor.redact(text, spans, PSEUDONYMIZE, "t", "")
    sealed = redactor.redact(text, spans, ENCRYPT, "t", "")
    assert "Ann" not in sealed


def test_key_files_must_be_private(tmp_path: Path) -> None:
    ring = KeyRing.generate()
    path = tmp_path / "keys.json"
    write_file(path, ring)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert from_file(path).keys == ring.keys
    path.chmod(0o644)
    with pytest.raises(FailedPrecondition, match="chmod 600"):
        from_file(path)
    with pytest.raises(FailedPrecondition):
        load_keys("", str(tmp_path / "missing.json"), str(tmp_path))
    made = load_keys("", "", str(tmp_path / "data"))
    assert made.active == "k1" and (tmp_path / "data/privacy/keys.json").is_file()
    env = load_keys("k1:" + "A" * 43 + "=,k2:" + "B" * 43 + "=", "", str(tmp_path))
    assert env.active == "k2" and len(env.keys["k1"]) == 32


def test_scoring_matches_spans_by_overlap_one_to_one() -> None:
    gold = [evaluation.Labelled("Zoë Martin, Ann", (
        evaluation.Span("PERSON", 0, 10), evaluation.Span("PERSON", 12, 15)))]  # fmt: skip
    predicted = [[evaluation.Span("PERSON", 0, 11), evaluation.Span("PERSON", 0, 3),
                  evaluation.Span("URL", 1, 2)]]  # fmt: skip
    counts = evaluation.score(gold, predicted)
    assert (counts["PERSON"].tp, counts["PERSON"].fp, counts["PERSON"].fn) == (1, 1, 1)
    assert evaluation.leaks(gold, ["<PERSON_1>, Ann"]) == (1, 2)


def test_detector_without_ner_still_finds_patterns_and_capitalised_names() -> None:
    found = Detector(ner=None).detect("Write to Zoë Martin at zoe@example.org")
    assert [(f.type, f.recognizer) for f in found] == [
        ("PERSON", "capitalised"),
        ("EMAIL_ADDRESS", "email"),
    ]
