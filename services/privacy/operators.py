"""Replacing what was found, and putting it back: the five operators, restore, and restore
on a stream whose chunks may split a token.

    mask          every character of the value becomes "*"       irreversible
    replace       <PERSON>                                        irreversible
    hash          <PERSON:9f86d081884c7d65...> keyed HMAC-SHA256,  irreversible; equal values
                  per tenant, 128 bits shown                       give equal tokens (joins)
    encrypt       <ENC:PERSON:k1:base64url(nonce|ciphertext)>     reversible by the tenant;
                  AES-256-GCM, tenant's key, the type bound in     tampering is detected
    pseudonymize  <PERSON_1>, the same value the same placeholder  reversible through the
                  within a conversation                            vault (vault.py)

Every operator works on the non-overlapping spans `recognizers.resolve` leaves, replacing
them in one pass from the original text, so restore gives back the original exactly.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Mapping, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from llmos.services.errors import InvalidArgument, PermissionDenied
from llmos.services.keyring import NONCE_BYTES, KeyRing
from llmos.services.privacy.recognizers import Finding
from llmos.services.privacy.vault import Vault

MASK, REPLACE, HASH, ENCRYPT, PSEUDONYMIZE = "mask", "replace", "hash", "encrypt", "pseudonymize"
OPERATORS = (MASK, REPLACE, HASH, ENCRYPT, PSEUDONYMIZE)

_PLACEHOLDER = r"<(?P<ptype>[A-Z][A-Z_]*?)_(?P<number>[1-9]\d{0,5})>"
_ENCRYPTED = (
    r"<ENC:(?P<etype>[A-Z][A-Z_]*):(?P<key>[A-Za-z0-9_.-]{1,32}):(?P<payload>[A-Za-z0-9_=-]+)>"
)
TOKEN = re.compile(f"{_PLACEHOLDER}|{_ENCRYPTED}")
# What a token can start with, for holding back a stream's tail: "<" then these characters.
_TOKEN_PREFIX = re.compile(r"<[A-Za-z0-9_:.=-]*\Z")
# A tail longer than this is not a token in the making: let it through.
MAX_TOKEN_CHARS = 4096


def placeholder(kind: str, number: int) -> str:
    return f"<{kind}_{number}>"


# -------------------------------------------------------------------- sealing values


def _encrypt_aad(tenant: str, kind: str) -> bytes:
    return f"encrypt\0{tenant}\0{kind}".encode()


def seal(keys: KeyRing, tenant: str, kind: str, value: str) -> str:
    """The encrypt operator's token for one value."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    aead = AESGCM(keys.derived(keys.active, "encrypt", tenant))
    payload = nonce + aead.encrypt(nonce, value.encode(), _encrypt_aad(tenant, kind))
    encoded = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    return f"<ENC:{kind}:{keys.active}:{encoded}>"


def unseal(keys: KeyRing, tenant: str, kind: str, key_id: str, encoded: str) -> str:
    """Open an encrypt token; refuse one that was altered or sealed for another tenant."""
    aead = AESGCM(keys.derived(key_id, "encrypt", tenant))  # unknown key: FAILED_PRECONDITION
    try:
        payload = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        value = aead.decrypt(
            payload[:NONCE_BYTES], payload[NONCE_BYTES:], _encrypt_aad(tenant, kind)
        )
    except (InvalidTag, binascii.Error, ValueError) as error:
        raise PermissionDenied(
            f"an encrypted {kind} token does not authenticate for tenant {tenant!r}: it was "
            "altered, or sealed for another tenant; nothing was decrypted",
            reason="CIPHERTEXT_REJECTED",
            metadata={"type": kind, "key_id": key_id},
        ) from error
    return value.decode()


def keyed_hash(keys: KeyRing, tenant: str, kind: str, value: str) -> str:
    key = keys.derived(keys.active, "hash", tenant)
    digest = hmac.new(key, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()
    return f"<{kind}:{digest[:32]}>"


# -------------------------------------------------------------------- redaction


class Redactor:
    """Applies an operator to a text's findings; pseudonyms go through the vault."""

    def __init__(self, keys: KeyRing, vault: Vault) -> None:
        self.keys = keys
        self.vault = vault

    def redact(
        self,
        text: str,
        findings: Sequence[Finding],
        operator: str,
        tenant: str,
        conversation: str,
    ) -> str:
        if operator == PSEUDONYMIZE:
            if not conversation:
                raise InvalidArgument(
                    "pseudonymize needs a conversation_id: placeholders are consistent within "
                    "one conversation and restored from it",
                    reason="CONVERSATION_REQUIRED",
                )
            self.vault.claim(tenant, conversation)
        pieces: list[str] = []
        at = 0
        for finding in findings:
            value = text[finding.start : finding.end]
            pieces.append(text[at : finding.start])
            pieces.append(self._token(operator, finding.type, value, (tenant, conversation), text))
            at = finding.end
        pieces.append(text[at:])
        return "".join(pieces)

    def _token(
        self, operator: str, kind: str, value: str, where: tuple[str, str], text: str
    ) -> str:
        """The replacement of `value`; `where` is (tenant, conversation)."""
        tenant, conversation = where
        if operator == MASK:
            return "*" * len(value)
        if operator == REPLACE:
            return f"<{kind}>"
        if operator == HASH:
            return keyed_hash(self.keys, tenant, kind, value)
        if operator == ENCRYPT:
            return seal(self.keys, tenant, kind, value)
        known = self.vault.placeholder_for(tenant, conversation, kind, value)
        if known is not None:
            return known
        number = self.vault.numbers_used(conversation, kind) + 1
        while placeholder(kind, number) in text:  # never collide with the text's own words
            number += 1
        token = placeholder(kind, number)
        self.vault.add(tenant, conversation, token, kind, value)
        return token


# -------------------------------------------------------------------- restoring


Opener = Callable[[str, str, str], str]


def restore(text: str, pseudonyms: Mapping[str, str], open_sealed: Opener) -> tuple[str, int]:
    """Put values back: placeholders from `pseudonyms`, encrypt tokens through
    `open_sealed(type, key_id, payload)`. Placeholders the conversation never issued (a
    model may invent `<PERSON_9>`) stay as they are. Returns the text and the tokens
    restored."""
    restored = 0

    def put_back(match: re.Match[str]) -> str:
        nonlocal restored
        if match.group("etype") is not None:
            restored += 1
            return open_sealed(match.group("etype"), match.group("key"), match.group("payload"))
        value = pseudonyms.get(match.group())
        if value is None:
            return match.group()
        restored += 1
        return value

    return TOKEN.sub(put_back, text), restored


class StreamRestorer:
    """Restore for a stream of chunks: a tail that may be the start of a token is held back
    until the next chunk completes it (or shows it is not one), so `<PER` + `SON_1>` is
    restored like `<PERSON_1>`. Pure: no I/O; `restore_text` does the lookups."""

    def __init__(self, restore_text: Callable[[str], str]) -> None:
        self._restore = restore_text
        self._held = ""

    def feed(self, chunk: str) -> str:
        """The restored text that can be released after `chunk` (maybe empty)."""
        text = self._held + chunk
        cut = _hold_from(text)
        self._held = text[cut:]
        return self._restore(text[:cut]) if cut else ""

    def close(self) -> str:
        """The stream ended: release what was held, restored."""
        text, self._held = self._held, ""
        return self._restore(text) if text else ""


def _hold_from(text: str) -> int:
    """Where the releasable part of `text` ends: before a trailing "<..." that could still
    become a token, else at the end."""
    start = text.rfind("<")
    if start == -1 or len(text) - start > MAX_TOKEN_CHARS:
        return len(text)
    return start if _TOKEN_PREFIX.match(text, start) else len(text)
