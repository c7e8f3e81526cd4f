"""What the task store seals, and how: one place both backends call, so SQLite and Redis
protect exactly the same fields the same way.

Sealed (with the key ring's envelope, services/keyring.py): a task's `request` (the
prompt), its `error`, every event's text (the generated output, and the reasons carried by
state events), its output as Redis keeps it, and its trace steps (the stages' reasons and
evidence). Left in the clear, because the store must sort, filter and count by them and they
hold no content: ids, tenant, model, states, priorities, times, finish reasons, attempts
and `usage` (token counts).

Each value's associated data is `llmos/task/<task id>/<field>`, so a ciphertext moved to
another task or another field fails to open. An empty value is stored empty, unsealed: its
emptiness is all it says.
"""

from __future__ import annotations

from llmos.services.keyring import DekCache, KeyRing, key_id_of

REQUEST, ERROR, EVENT, OUTPUT, TRACE = "request", "error", "event", "output", "trace"
FIELDS = (REQUEST, ERROR, EVENT, OUTPUT, TRACE)
SEALED_ONCE = frozenset({REQUEST, ERROR})


def context(task_id: str, field: str) -> bytes:
    return f"llmos/task/{task_id}/{field}".encode()


def _what(task_id: str, field: str) -> str:
    return f"task {task_id}'s {field}"


class Sealer:
    """Seals and opens one task field at a time with the ring's active key.

    One data key per task field (`DekCache`): a task's text pieces and trace steps share
    their field's DEK, each value with its own nonce, in the ring's usual envelope. The
    fields a task seals once (its request and error) get a fresh DEK of their own outside
    the cache: caching them would only fill the cache with keys never used again and push
    out those of running tasks' events and steps."""

    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys
        self._deks = DekCache(keys)

    def seal(self, task_id: str, field: str, plain: bytes) -> bytes:
        if not plain:
            return b""
        if field in SEALED_ONCE:
            return self.keys.seal(plain, context(task_id, field))
        return self._deks.seal(plain, context(task_id, field))

    def prepare(self, task_id: str, *fields: str) -> None:
        """Make the data keys of the task's `fields` (streamed ones: EVENT, TRACE) ahead of
        their first value, when the caller has time now and will be in a hurry then."""
        for field in fields:
            self._deks.prepare(context(task_id, field))

    def seal_text(self, task_id: str, field: str, text: str) -> bytes:
        return self.seal(task_id, field, text.encode())

    def open(self, task_id: str, field: str, sealed: bytes) -> bytes:
        """The plaintext; DataLoss(SEALED_DATA_CORRUPT) or FailedPrecondition(KEY_NOT_FOUND)
        naming the task and field when it cannot be opened."""
        if not sealed:
            return b""
        return self._deks.open(bytes(sealed), context(task_id, field), _what(task_id, field))

    def open_text(self, task_id: str, field: str, sealed: bytes) -> str:
        return self.open(task_id, field, sealed).decode()

    def rewrap(self, task_id: str, field: str, sealed: bytes) -> bytes | None:
        """`sealed` under the active key, or None when it already is (or is empty)."""
        if not sealed:
            return None
        return self.keys.rewrap(bytes(sealed), context(task_id, field), _what(task_id, field))


def usage_key(sealed: bytes) -> str | None:
    """The key id `sealed` names, None for an empty value, "?" for one that is no envelope."""
    if not sealed:
        return None
    try:
        return key_id_of(bytes(sealed))
    except Exception:  # a corrupt value still counts, under "?"
        return "?"
