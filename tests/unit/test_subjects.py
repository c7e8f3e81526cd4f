"""The blind index of data subjects (services/privacy/subjects.py): normal forms and keyed
tokens, pure logic."""

from __future__ import annotations

from llmos.services.keyring import KeyRing
from llmos.services.privacy.subjects import index_values, lookup_tokens, normal_forms


def test_normal_forms_ignore_case_width_and_runs_of_spaces() -> None:
    assert normal_forms("  Alice   SMITH ") == ("alice smith",)
    fullwidth = "".join(chr(0xFF00 + ord(c) - 0x20) for c in "ALICE")  # full-width letters
    assert normal_forms(f"{fullwidth}@example.com") == ("alice@example.com",)
    assert normal_forms("   ") == ()


def test_a_phone_like_value_also_has_its_digits_alone() -> None:
    assert normal_forms("(415) 555-0100") == ("(415) 555-0100", "4155550100")
    assert normal_forms("4155550100") == ("4155550100",)
    assert normal_forms("12-34") == ("12-34",)  # too few digits to be a phone number


def test_the_same_subject_written_differently_is_found() -> None:
    ring = KeyRing.generate()
    indexed = set(index_values(ring, "acme", ["Alice@Example.com", "(415) 555-0100"]))

    assert set(lookup_tokens(ring, "acme", "alice@example.com")) & indexed
    assert set(lookup_tokens(ring, "acme", "415.555.0100")) & indexed
    assert not set(lookup_tokens(ring, "acme", "bob@example.com")) & indexed


def test_tokens_differ_between_tenants_and_hold_no_value() -> None:
    ring = KeyRing.generate()
    acme = index_values(ring, "acme", ["alice@example.com"])

    assert not set(acme) & set(index_values(ring, "initech", ["alice@example.com"]))
    assert all(b"alice" not in token for token in acme)
    assert index_values(ring, "acme", ["a@b.c", "A@B.C"]) == index_values(ring, "acme", ["a@b.c"])


def test_a_lookup_finds_what_was_indexed_under_an_older_key() -> None:
    old = KeyRing.generate()
    rotated = KeyRing({**old.keys, "k2": b"\x01" * 32}, "k2", "test")
    indexed = index_values(old, "acme", ["alice@example.com"])

    assert set(indexed) <= set(lookup_tokens(rotated, "acme", "alice@example.com"))
    assert not set(indexed) & set(index_values(rotated, "acme", ["alice@example.com"]))
