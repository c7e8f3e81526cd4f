"""The pseudonym vault: which placeholder stands for which value, per tenant and
conversation, encrypted at rest.

One SQLite file, `<data_dir>/privacy/vault.sqlite3`. A conversation belongs to the tenant
that first redacted in it; its entries hold the placeholder (`<PERSON_1>`), the type, the
value sealed in the key ring's envelope (services/keyring.py: AES-GCM under a data key
wrapped by the active key, whose id is also stored beside it for counting; the tenant,
conversation and placeholder bound in as associated data, so a row copied to another
conversation or tenant does not open), and a keyed HMAC of the value, so the same value
gets the same placeholder again without the vault storing it in the clear. The `subjects`
table is the blind index of each conversation's data subjects (subjects.py), so
`forget_subject` finds every conversation that held a value without opening any entry.
The file never holds a value or a key in plain text; the keys come from the key ring.

After `llmos keys rotate`, `rewrap` moves entries to the new key a batch at a time (the
service calls it in the background): it re-wraps each entry's data key and recomputes its
lookup HMAC under the new key; the sealed value itself is not re-encrypted.

Calls are synchronous and short (one indexed statement each); the service runs them from
its event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import sqlite3
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from llmos.services.errors import LlmosError, NotFound, PermissionDenied
from llmos.services.keyring import KeyRing
from llmos.services.privacy.subjects import index_values, normal_forms

log = logging.getLogger(__name__)

VAULT_FILE = Path("privacy") / "vault.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    conversation TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    conversation TEXT NOT NULL,
    placeholder TEXT NOT NULL,
    type TEXT NOT NULL,
    lookup BLOB NOT NULL,
    key_id TEXT NOT NULL,
    sealed BLOB NOT NULL,
    PRIMARY KEY (conversation, placeholder)
);
CREATE INDEX IF NOT EXISTS entries_lookup ON entries (conversation, lookup);
CREATE TABLE IF NOT EXISTS subjects (
    token BLOB NOT NULL,
    conversation TEXT NOT NULL,
    PRIMARY KEY (token, conversation)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS subjects_by_conversation ON subjects (conversation);
"""


class Vault:
    """Placeholders and their sealed values, per tenant and conversation."""

    def __init__(self, path: Path, keys: KeyRing) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self.keys = keys
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA secure_delete=ON")  # a forgotten value leaves no bytes
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # -- conversations ---------------------------------------------------------------

    def claim(self, tenant: str, conversation: str) -> None:
        """Make `conversation` the tenant's (first use), or check that it is."""
        self._db.execute(
            "INSERT OR IGNORE INTO conversations VALUES (?, ?, ?)",
            (conversation, tenant, time.time()),
        )
        self.owner_check(tenant, conversation)

    def owner_check(self, tenant: str, conversation: str) -> None:
        row = self._db.execute(
            "SELECT tenant FROM conversations WHERE conversation = ?", (conversation,)
        ).fetchone()
        if row is None:
            raise NotFound(
                f"conversation {conversation!r} has no pseudonyms: nothing was redacted in it "
                "with the pseudonymize operator (or it was forgotten)",
                reason="CONVERSATION_NOT_FOUND",
            )
        if row[0] != tenant:
            raise PermissionDenied(
                f"conversation {conversation!r} belongs to another tenant",
                reason="FOREIGN_CONVERSATION",
            )

    # -- entries ---------------------------------------------------------------------

    def _lookup(self, tenant: str, kind: str, value: str, key_id: str | None = None) -> bytes:
        key = self.keys.derived(key_id or self.keys.active, "lookup", tenant)
        return hmac.new(key, f"{kind}\0{value}".encode(), hashlib.sha256).digest()

    def placeholder_for(self, tenant: str, conversation: str, kind: str, value: str) -> str | None:
        """The placeholder this value already has in the conversation, if any. Its lookup
        HMAC is under the key its entry was sealed with: after a rotation, under the new
        key or (until `rewrap` reached it) an older one, so every configured key is tried."""
        keys = self.keys.keys
        for key_id in [self.keys.active, *(k for k in keys if k != self.keys.active)]:
            row = self._db.execute(
                "SELECT placeholder FROM entries WHERE conversation = ? AND lookup = ?",
                (conversation, self._lookup(tenant, kind, value, key_id)),
            ).fetchone()
            if row is not None:
                return str(row[0])
        return None

    def numbers_used(self, conversation: str, kind: str) -> int:
        """The highest placeholder number of `kind` in the conversation (0 for none)."""
        rows = self._db.execute(
            "SELECT placeholder FROM entries WHERE conversation = ? AND type = ?",
            (conversation, kind),
        ).fetchall()
        return max((int(str(row[0])[:-1].rsplit("_", 1)[1]) for row in rows), default=0)

    def add(self, tenant: str, conversation: str, placeholder: str, kind: str, value: str) -> None:
        key_id = self.keys.active
        sealed = self.keys.seal(value.encode(), _aad(tenant, conversation, placeholder))
        self._db.execute(
            "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?)",
            (
                conversation,
                placeholder,
                kind,
                self._lookup(tenant, kind, value, key_id),
                key_id,
                sealed,
            ),
        )
        self._db.executemany(
            "INSERT OR IGNORE INTO subjects VALUES (?, ?)",
            [(token, conversation) for token in index_values(self.keys, tenant, [value])],
        )

    def values(self, tenant: str, conversation: str) -> dict[str, str]:
        """Every placeholder of the conversation and its value, opened.

        An entry that does not authenticate is DataLoss(SEALED_DATA_CORRUPT); one sealed
        with a key no longer configured is FailedPrecondition(KEY_NOT_FOUND) naming it.
        """
        self.owner_check(tenant, conversation)
        rows = self._db.execute(
            "SELECT placeholder, sealed FROM entries WHERE conversation = ?",
            (conversation,),
        ).fetchall()
        return {
            placeholder: self.keys.open(
                sealed,
                _aad(tenant, conversation, placeholder),
                f"vault entry {placeholder} of conversation {conversation!r}",
            ).decode()
            for placeholder, sealed in rows
        }

    # -- key rotation ----------------------------------------------------------------

    def key_usage(self) -> dict[str, int]:
        """How many entries each key id still seals."""
        rows = self._db.execute("SELECT key_id, COUNT(*) FROM entries GROUP BY key_id")
        return {str(key_id): int(count) for key_id, count in rows}

    def rewrap(self, after: int, limit: int) -> tuple[int, int, int]:
        """Move up to `limit` entries past row `after` that are not under the active key
        onto it: (moved, failed, the row to continue after, or -1 once the pass is done).

        The caller keeps the position; a restart begins a new pass, which skips the entries
        already moved (they are picked by their stored key id). An entry that cannot be
        opened (its key is missing, the row is corrupt) is counted as failed and left as is.
        """
        active = self.keys.active
        rows = self._db.execute(
            "SELECT e.rowid, e.conversation, e.placeholder, e.type, e.sealed, c.tenant "
            "FROM entries AS e JOIN conversations AS c ON c.conversation = e.conversation "
            "WHERE e.rowid > ? AND e.key_id != ? ORDER BY e.rowid LIMIT ?",
            (after, active, limit),
        ).fetchall()
        moved = failed = 0
        for _, conversation, placeholder, kind, sealed, tenant in rows:
            aad = _aad(tenant, conversation, placeholder)
            what = f"vault entry {placeholder} of conversation {conversation!r}"
            try:
                value = self.keys.open(sealed, aad, what).decode()
                rewrapped = self.keys.rewrap(sealed, aad, what) or sealed
            except LlmosError:
                failed += 1
                continue
            self._db.execute(
                "UPDATE entries SET key_id = ?, sealed = ?, lookup = ? "
                "WHERE conversation = ? AND placeholder = ? AND sealed = ?",
                (
                    active,
                    rewrapped,
                    self._lookup(tenant, kind, value, active),
                    conversation,
                    placeholder,
                    sealed,
                ),
            )
            moved += 1
        return moved, failed, (int(rows[-1][0]) if len(rows) == limit else -1)

    # -- forgetting ------------------------------------------------------------------

    def forget_tenant(self, tenant: str) -> int:
        """Delete every conversation of `tenant` and its entries; the count of entries."""
        with self._db:
            self._db.execute("BEGIN")
            deleted = self._db.execute(
                "DELETE FROM entries WHERE conversation IN "
                "(SELECT conversation FROM conversations WHERE tenant = ?)",
                (tenant,),
            ).rowcount
            self._db.execute(
                "DELETE FROM subjects WHERE conversation IN "
                "(SELECT conversation FROM conversations WHERE tenant = ?)",
                (tenant,),
            )
            self._db.execute("DELETE FROM conversations WHERE tenant = ?", (tenant,))
        self._scrub()
        return int(deleted)

    def forget_subject(
        self, tenant: str, tokens: list[bytes], value: str, also: Sequence[str] = ()
    ) -> tuple[int, list[str]]:
        """Delete every conversation of `tenant` that held the subject (`tokens`: its blind
        index under every key; `value`: for conversations written before the index
        existed), and those of `also` that are the tenant's; the count of entries deleted
        and the conversations, sorted.

        The whole conversation goes, not only the subject's entries: the other values of a
        conversation about a person are as much about them, and a half-emptied vault would
        restore a forgotten task's output with holes in it."""
        marks = ", ".join("?" for _ in tokens)
        found = {
            str(row[0])
            for row in self._db.execute(
                "SELECT DISTINCT s.conversation FROM subjects AS s JOIN conversations AS c "
                f"ON c.conversation = s.conversation WHERE c.tenant = ? AND s.token IN ({marks})",
                (tenant, *tokens),
            )
        }
        found.update(self._unindexed_holding(tenant, value))
        for conversation in also:
            row = self._db.execute(
                "SELECT tenant FROM conversations WHERE conversation = ?", (conversation,)
            ).fetchone()
            if row is not None and row[0] == tenant:
                found.add(conversation)
        conversations = sorted(found)
        return (self._delete(conversations) if conversations else 0), conversations

    def expire(
        self,
        created_before: float,
        *,
        tenant: str | None = None,
        keep: Collection[str] = (),
        limit: int = 500,
    ) -> int:
        """Delete up to `limit` conversations begun before `created_before`, oldest first:
        `tenant`'s, or (None) every tenant's but those in `keep`; the number deleted. The
        vault's half of retention (retention.py)."""
        kept = list(keep)
        if tenant is not None:
            where, params = "tenant = ?", [tenant]
        else:
            where = f"tenant NOT IN ({', '.join('?' for _ in kept)})"
            params = kept
        rows = self._db.execute(
            f"SELECT conversation FROM conversations WHERE {where} AND created_at < ? "
            "ORDER BY created_at LIMIT ?",
            (*params, created_before, limit),
        ).fetchall()
        conversations = [str(row[0]) for row in rows]
        if conversations:
            self._delete(conversations)
        return len(conversations)

    def _delete(self, conversations: Sequence[str]) -> int:
        """Delete the conversations with their entries and index, then scrub; the count of
        entries deleted."""
        deleted = 0
        with self._db:
            self._db.execute("BEGIN")
            for conversation in conversations:
                cursor = self._db.execute(
                    "DELETE FROM entries WHERE conversation = ?", (conversation,)
                )
                deleted += int(cursor.rowcount)
                self._db.execute("DELETE FROM subjects WHERE conversation = ?", (conversation,))
                self._db.execute(
                    "DELETE FROM conversations WHERE conversation = ?", (conversation,)
                )
        self._scrub()
        return deleted

    def _unindexed_holding(self, tenant: str, value: str) -> list[str]:
        """The tenant's conversations with no blind index (written by an older vault) whose
        values, opened, hold `value` in one of its normal forms."""
        wanted = set(normal_forms(value))
        rows = self._db.execute(
            "SELECT conversation FROM conversations AS c WHERE tenant = ? AND NOT EXISTS "
            "(SELECT 1 FROM subjects AS s WHERE s.conversation = c.conversation)",
            (tenant,),
        ).fetchall()
        holding = []
        for (conversation,) in rows:
            values = self.values(tenant, str(conversation)).values()
            if any(wanted.intersection(normal_forms(v)) for v in values):
                holding.append(str(conversation))
        return holding

    def _scrub(self) -> None:
        """Copy the WAL into the main file (whose freed pages secure_delete zeroed) and
        truncate it, so the old frames holding deleted rows are gone too."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _aad(tenant: str, conversation: str, placeholder: str) -> bytes:
    return f"vault\0{tenant}\0{conversation}\0{placeholder}".encode()


async def rewrap_forever(vault: Vault, rate: float, idle_s: float = 1.0) -> None:
    """The vault's background re-wrapping after a key rotation: passes of small `rewrap`
    batches, at most `rate` entries a second, until no entry is left under an older key;
    then it waits for the active key to change again. Runs until cancelled."""
    step = max(1, min(100, int(rate)))
    settled: str | None = None
    while True:
        active = vault.keys.active
        if active == settled:
            await asyncio.sleep(idle_s)
            continue
        after, moved, failed = 0, 0, 0
        while after >= 0 and vault.keys.active == active:
            done, bad, after = vault.rewrap(after, step)
            moved, failed = moved + done, failed + bad
            await asyncio.sleep(max(done + bad, 1) / rate)
        if vault.keys.active == active:
            settled = active
            if moved or failed:
                log.info(
                    "vault re-wrapped to key %s: %d entries moved, %d could not be opened",
                    active,
                    moved,
                    failed,
                )
