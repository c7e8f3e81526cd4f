"""The vault across a key rotation: old entries open, keep their placeholders, and move to
the new key in bounded, resumable batches."""

from __future__ import annotations

from pathlib import Path

from llmos.services.keyring import KeyRing, from_file, rotate_file, write_file
from llmos.services.privacy.vault import Vault


def test_vault_entries_move_to_the_new_key_and_keep_their_placeholders(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    write_file(path, KeyRing.generate())
    ring = from_file(path)
    vault = Vault(tmp_path / "vault.sqlite3", ring)
    vault.claim("acme", "c1")
    for number in range(1, 6):
        vault.add("acme", "c1", f"<PERSON_{number}>", "PERSON", f"Person Number{number}")
    before = vault.values("acme", "c1")
    assert rotate_file(ring) == "k2"
    vault.add("acme", "c1", "<PERSON_6>", "PERSON", "Person Number6")
    assert vault.key_usage() == {"k1": 5, "k2": 1}
    # Before re-wrapping, a known value still finds its placeholder (lookup under k1).
    assert vault.placeholder_for("acme", "c1", "PERSON", "Person Number2") == "<PERSON_2>"
    after, moved = 0, 0
    while after >= 0:
        done, failed, after = vault.rewrap(after, 2)
        assert failed == 0
        moved += done
    assert moved == 5 and vault.key_usage() == {"k2": 6}
    assert {k: v for k, v in vault.values("acme", "c1").items() if k in before} == before
    assert vault.placeholder_for("acme", "c1", "PERSON", "Person Number2") == "<PERSON_2>"
    raw = (tmp_path / "vault.sqlite3").read_bytes()
    assert b"Person Number" not in raw
    vault.close()
