"""Request checks for the privacy service (pure): texts, tenants, conversation ids, operators.

A bad request is refused with INVALID_ARGUMENT before any detection or vault access, so a
malformed call costs nothing and changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from llmos.services.errors import InvalidArgument
from llmos.services.privacy.operators import (
    ENCRYPT,
    HASH,
    MASK,
    PSEUDONYMIZE,
    REPLACE,
)
from llmos.services.privacy.recognizers import ENTITY_TYPES
from llmos.v1 import privacy_pb2

# Far above any chat message (the kernel refuses prompts over 32,000 characters by
# default); NER on more would hold the service for seconds.
MAX_TEXT_CHARS = 100_000
DEFAULT_TENANT = "default"
_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

OPERATOR_NAMES = {
    privacy_pb2.REDACTION_OPERATOR_MASK: MASK,
    privacy_pb2.REDACTION_OPERATOR_REPLACE: REPLACE,
    privacy_pb2.REDACTION_OPERATOR_HASH: HASH,
    privacy_pb2.REDACTION_OPERATOR_ENCRYPT: ENCRYPT,
    privacy_pb2.REDACTION_OPERATOR_PSEUDONYMIZE: PSEUDONYMIZE,
}


def check_text(text: str, *, allow_empty: bool = False) -> str:
    if not text and not allow_empty:
        raise InvalidArgument("text is empty: there is nothing to scan", reason="EMPTY_TEXT")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidArgument(
            f"text has {len(text):,} characters; the privacy service takes at most "
            f"{MAX_TEXT_CHARS:,} per call: split it",
            reason="TEXT_TOO_LONG",
            metadata={"max_chars": str(MAX_TEXT_CHARS)},
        )
    return text


def check_tenant(tenant: str) -> str:
    """The tenant's name; requests without one belong to "default", as in the kernel."""
    if not tenant:
        return DEFAULT_TENANT
    if not _ID.fullmatch(tenant):
        raise InvalidArgument(
            f"tenant {tenant[:40]!r} is not 1-128 characters of letters, digits and ._:-",
            reason="BAD_TENANT",
        )
    return tenant


def check_conversation(conversation: str, *, required: bool) -> str:
    if not conversation:
        if required:
            raise InvalidArgument(
                "conversation_id is required: it names the vault entries to restore from",
                reason="CONVERSATION_REQUIRED",
            )
        return ""
    if not _ID.fullmatch(conversation):
        raise InvalidArgument(
            f"conversation_id {conversation[:40]!r} is not 1-128 characters of letters, "
            "digits and ._:-",
            reason="BAD_CONVERSATION_ID",
        )
    return conversation


MAX_SUBJECT_CHARS = 1_000


def check_subject(subject: str) -> str:
    """A ForgetSubject value: not blank (it would match nothing, or, worse, everything a
    careless normal form made blank), and no longer than any PII value is."""
    if not subject.strip():
        raise InvalidArgument(
            "subject is empty: give the PII value the data subject is known by (an email "
            "address, a phone number, a name...)",
            reason="EMPTY_SUBJECT",
        )
    if len(subject) > MAX_SUBJECT_CHARS:
        raise InvalidArgument(
            f"subject has {len(subject):,} characters; a PII value has at most "
            f"{MAX_SUBJECT_CHARS:,}",
            reason="SUBJECT_TOO_LONG",
        )
    return subject


def operator_name(value: int) -> str:
    """The operator; UNSPECIFIED means pseudonymize, the reversible default."""
    if value == privacy_pb2.REDACTION_OPERATOR_UNSPECIFIED:
        return PSEUDONYMIZE
    name: str | None = OPERATOR_NAMES.get(value)  # type: ignore[call-overload]
    if name is None:
        raise InvalidArgument(f"unknown redaction operator {value}", reason="BAD_OPERATOR")
    return name


def entity_types(requested: Sequence[str]) -> frozenset[str]:
    """The types a Redact request asks for; empty means every type. An unknown one is
    refused rather than ignored: a misspelt "EMAIL" would otherwise let addresses through."""
    unknown = sorted({kind for kind in requested if kind not in ENTITY_TYPES})
    if unknown:
        raise InvalidArgument(
            f"unknown entity type {', '.join(map(repr, unknown))}; known: "
            f"{', '.join(ENTITY_TYPES)}",
            reason="UNKNOWN_ENTITY_TYPE",
            metadata={"entity_type": unknown[0]},
        )
    return frozenset(requested or ENTITY_TYPES)
