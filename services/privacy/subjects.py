"""The blind index of data subjects: find what holds a person's PII without keeping the PII.

ForgetSubject is given a value a person is known by (an email address, a phone number, a
name) and must find every task and vault conversation that held it. Storing the values to
search them would defeat the point, so each detected value is stored only as a keyed HMAC:
the tenant's "subject" key (derived from a master key, services/keyring.py) over the value
in a normal form. Without the key the index reveals nothing and cannot be tested against
guesses; with it, ForgetSubject computes the same HMAC and looks it up.

Normal forms make the lookup forgiving the way people write values: Unicode NFKC, case
folded, runs of white space as one space; a phone-like value (only digits, spaces and
`+-.()`, at least 7 digits) also indexes its digits alone, so "(415) 555-0100" and
"415.555.0100" are one subject. A value's tokens are 16 bytes (a truncated HMAC-SHA256:
enough that unrelated values never collide in practice, small enough to index cheaply).

Redact indexes under the active key; ForgetSubject looks up under every key of the ring,
so what was indexed before a key rotation is found too.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from collections.abc import Iterable

from llmos.services.keyring import KeyRing

TOKEN_BYTES = 16
PURPOSE = "subject"
_PHONE_LIKE = re.compile(r"[+\d\s().\-]+")
MIN_PHONE_DIGITS = 7


def normal_forms(value: str) -> tuple[str, ...]:
    """The forms `value` is indexed and looked up under (empty for a blank value)."""
    text = " ".join(unicodedata.normalize("NFKC", value).casefold().split())
    if not text:
        return ()
    forms = [text]
    if _PHONE_LIKE.fullmatch(text):
        digits = "".join(ch for ch in text if ch.isdigit())
        if len(digits) >= MIN_PHONE_DIGITS and digits != text:
            forms.append(digits)
    return tuple(forms)


def _token(key: bytes, form: str) -> bytes:
    return hmac.new(key, form.encode(), hashlib.sha256).digest()[:TOKEN_BYTES]


def index_values(keys: KeyRing, tenant: str, values: Iterable[str]) -> list[bytes]:
    """The distinct tokens of `values` under the tenant's active subject key, in order."""
    key = keys.derived(keys.active, PURPOSE, tenant)
    tokens: dict[bytes, None] = {}
    for value in values:
        for form in normal_forms(value):
            tokens.setdefault(_token(key, form), None)
    return list(tokens)


def lookup_tokens(keys: KeyRing, tenant: str, value: str) -> list[bytes]:
    """Every token `value` may have been indexed under: each normal form, each key id."""
    tokens: dict[bytes, None] = {}
    for key_id in sorted(keys.keys):
        key = keys.derived(key_id, PURPOSE, tenant)
        for form in normal_forms(value):
            tokens.setdefault(_token(key, form), None)
    return list(tokens)
