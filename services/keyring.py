"""The project's one key ring: named key-encryption keys, where they come from, how they
rotate, and the envelope that seals data at rest with them.

Used by the kernel (the task store's prompts, outputs, traces) and the privacy service (the
pseudonym vault, the `encrypt` and `hash` operators). There is one ring per deployment.

**Where keys come from** (never from the stores they protect), in this order:

- the setting `privacy_key` (environment `LLMOS_PRIVACY_KEY`): `id:base64[,id:base64...]`,
  the last one active. Keys from the environment cannot be rotated by `llmos keys rotate`:
  add one to the setting and restart.
- the key file `privacy_key_file` (default `<data_dir>/privacy/keys.json`), JSON
  `{"active": "k1", "keys": {"k1": "<base64 of 32 bytes>"}}`. It must be mode 0600 (no
  group or other access): a readable key file is refused with FAILED_PRECONDITION
  (KEY_FILE_MODE), never used. When the default file does not exist it is created with
  one fresh key, mode 0600, so a first `llmos up` needs no set-up. A named file that does
  not exist is an error, never created.

**Rotation without a restart.** `rotate_file` adds a fresh key to the file and makes it
active (written to a temporary file, mode 0600, then renamed over the old one, under a
lock). Every process re-reads the file when it changes: a ring checks the file's identity
(inode, size, mtime) at most every `RELOAD_CHECK_S` when it is used, and again at once when
asked for a key id it does not have (another process rotated first).

**The envelope** (`seal`/`open`). Each value gets its own random 256-bit data key (DEK). The
value is sealed with AES-256-GCM under the DEK; the DEK is sealed ("wrapped") with
AES-256-GCM under the active key-encryption key (KEK), and the KEK's id is written in the
clear at the front::

    0x01 | key id (ASCII) | 0x00 | wrap nonce (12) | wrapped DEK (32 + 16 tag)
         | data nonce (12) | ciphertext + 16-byte tag

Both seals take the caller's `context` (e.g. `task/<id>/request`) as associated data, so a
ciphertext copied to another record or field does not open, and a flipped byte anywhere
fails the tag: DataLoss(SEALED_DATA_CORRUPT). Why a DEK per value rather than the KEK
directly: a KEK then seals only 32-byte DEKs, never data, so rotating it rewrites those 60
bytes per value (`rewrap`) and never re-encrypts the data itself; and AES-GCM's limit of
about 2^32 random nonces per key applies to each DEK (used once), not to the KEK's whole
lifetime of records.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from llmos.services.errors import DataLoss, FailedPrecondition
from llmos.services.randomness import random_bytes

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_FILE = Path("privacy") / "keys.json"
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,32}")
# How often a ring in use looks at its key file for a rotation made by another process.
RELOAD_CHECK_S = 0.25
VERSION = b"\x01"
_WRAPPED = NONCE_BYTES + KEY_BYTES + TAG_BYTES


@dataclasses.dataclass(frozen=True)
class KeySet:
    """One reading of the keys: KEKs by id and the id new data is sealed with."""

    keys: dict[str, bytes]
    active: str

    @functools.cached_property
    def aeads(self) -> dict[str, AESGCM]:
        return {key_id: AESGCM(key) for key_id, key in self.keys.items()}


class KeyRing:
    """Key-encryption keys by id, the active one, and the envelope that uses them.

    Safe to use from several threads (the SQLite store seals on its own thread): a reload
    replaces the whole `KeySet` at once.
    """

    def __init__(
        self, keys: dict[str, bytes], active: str, source: str, path: Path | None = None
    ) -> None:
        _check_set(keys, active, source)
        self._set = KeySet(dict(keys), active)
        self.source = source
        self.path = path
        self._identity = _identity(path) if path is not None else None
        self._checked = time.monotonic()
        self._reload_lock = threading.Lock()

    # -- what is configured -----------------------------------------------------------

    @property
    def active(self) -> str:
        """The id new data is sealed with (re-read from the key file when it changed)."""
        return self.current().active

    @property
    def keys(self) -> dict[str, bytes]:
        return dict(self.current().keys)

    def current(self) -> KeySet:
        if self.path is not None and time.monotonic() - self._checked >= RELOAD_CHECK_S:
            self.reload()
        return self._set

    def reload(self, *, force: bool = False) -> bool:
        """Re-read the key file if it changed (or `force`); whether the keys changed.

        A file that became unreadable or invalid keeps the keys already loaded (a
        half-edited file must not take a serving process down); the error is raised to a
        caller that forced the reload.
        """
        if self.path is None:
            return False
        with self._reload_lock:
            self._checked = time.monotonic()
            try:
                identity = _identity(self.path)
                if identity == self._identity and not force:
                    return False
                fresh = from_file(self.path)
            except (OSError, FailedPrecondition):
                if force:
                    raise
                return False
            changed = fresh._set != self._set
            self._set, self._identity = fresh._set, identity
            return changed

    def master(self, key_id: str) -> bytes:
        """The KEK `key_id`; FailedPrecondition(KEY_NOT_FOUND) naming it when it is not
        configured (after one look at the key file, in case another process rotated)."""
        key = self.current().keys.get(key_id)
        if key is None and self.path is not None:
            self.reload()
            key = self._set.keys.get(key_id)
        if key is None:
            raise FailedPrecondition(
                f"key {key_id!r} is not in the key ring ({self.source}; it has "
                f"{', '.join(sorted(self._set.keys))}): data sealed with it cannot be opened "
                "until that key is configured again",
                reason="KEY_NOT_FOUND",
                metadata={"key_id": key_id},
            )
        return key

    def _aead(self, key_id: str) -> AESGCM:
        aead = self.current().aeads.get(key_id)
        if aead is None:
            self.master(key_id)  # reloads, or raises KEY_NOT_FOUND
            aead = self._set.aeads[key_id]
        return aead

    def derived(self, key_id: str, purpose: str, tenant: str) -> bytes:
        """The tenant's key for `purpose` ("lookup", "encrypt", "hash") under KEK `key_id`:
        HKDF-SHA256, so one tenant's HMACs and tokens differ from another's."""
        return _derive(self.master(key_id), purpose, tenant)

    # -- the envelope -------------------------------------------------------------------

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        """`plaintext` in a fresh envelope under the active key (see the module doc)."""
        keyset = self.current()
        key_id = keyset.active
        fresh = random_bytes(KEY_BYTES + 2 * NONCE_BYTES)  # DEK, wrap nonce, data nonce
        dek = fresh[:KEY_BYTES]
        wrap_nonce = fresh[KEY_BYTES : KEY_BYTES + NONCE_BYTES]
        data_nonce = fresh[KEY_BYTES + NONCE_BYTES :]
        header = VERSION + key_id.encode() + b"\x00"
        wrapped = keyset.aeads[key_id].encrypt(wrap_nonce, dek, _wrap_aad(key_id, context))
        return (
            header
            + wrap_nonce
            + wrapped
            + data_nonce
            + AESGCM(dek).encrypt(data_nonce, plaintext, context)
        )

    def open(self, sealed: bytes, context: bytes, what: str) -> bytes:
        """The plaintext of `sealed`. `what` names the value for errors ("task t1's
        request"): DataLoss(SEALED_DATA_CORRUPT) when it was altered or belongs to another
        record, FailedPrecondition(KEY_NOT_FOUND) when its key is not configured."""
        key_id, body = _split(sealed, what)
        dek = self.unwrap(key_id, body, context, what)
        return _open_data(AESGCM(dek), key_id, body, context, what)

    def unwrap(self, key_id: str, body: bytes, context: bytes, what: str) -> bytes:
        """The DEK wrapped at the start of an envelope's `body` (what follows its key id)."""
        try:
            return self._aead(key_id).decrypt(
                body[:NONCE_BYTES], body[NONCE_BYTES:_WRAPPED], _wrap_aad(key_id, context)
            )
        except InvalidTag as error:
            raise _corrupt(what, key_id) from error

    def rewrap(self, sealed: bytes, context: bytes, what: str) -> bytes | None:
        """`sealed` with its DEK wrapped under the active key instead; None when it already
        is. The data ciphertext is kept as it is (its DEK does not change)."""
        keyset = self.current()
        key_id, body = _split(sealed, what)
        if key_id == keyset.active:
            return None
        dek = self.unwrap(key_id, body, context, what)
        wrap_nonce = secrets.token_bytes(NONCE_BYTES)
        active = keyset.active
        wrapped = keyset.aeads[active].encrypt(wrap_nonce, dek, _wrap_aad(active, context))
        return VERSION + active.encode() + b"\x00" + wrap_nonce + wrapped + body[_WRAPPED:]

    @classmethod
    def generate(cls, source: str = "generated") -> KeyRing:
        """A ring with one fresh key, held in memory only (tests, benchmarks)."""
        return cls({"k1": secrets.token_bytes(KEY_BYTES)}, "k1", source)


class DekCache:
    """The envelope with one data key per context, for a writer that seals many values of
    one record field (a task's streamed text, its trace steps) in a row.

    A context's first value gets a fresh DEK, wrapped as `KeyRing.seal` does; later ones
    reuse that DEK and its wrapped form, each with a fresh data nonce. The format is the
    same (every value still carries its wrapped DEK, bound to the context), so `KeyRing.open`
    and `rewrap` read these values and this class reads any envelope. What it saves is the
    wrap, the unwrap and building a cipher, about half the cost of a small value. A DEK is
    still used for one context only, far below AES-GCM's 2^32 random nonces per key, and a
    rotation starts fresh DEKs under the new active key.

    Opening keeps the DEK of each wrapped form it (or this cache's sealing) has seen, keyed
    by the exact wrapped bytes and the context, so a hit yields what the unwrap would
    have; the value's own tag is checked on every open. The key it names must still be in
    the ring. Both maps are bounded (`size` contexts; full, they start over). Safe to use
    from several threads: a race costs at most one extra DEK.
    """

    def __init__(self, ring: KeyRing, size: int = 1024) -> None:
        self.ring = ring
        self.size = size
        # context -> (key id, that KEK's bytes, header + wrap nonce + wrapped DEK, the DEK's
        # cipher); the KEK's bytes too, so a key file reloaded with another key under the
        # same id starts a fresh DEK rather than sealing under a wrap nothing can open
        self._sealing: dict[bytes, tuple[str, bytes, bytes, AESGCM]] = {}
        # (context, header + wrap nonce + wrapped DEK) -> the DEK's cipher
        self._opening: dict[tuple[bytes, bytes], AESGCM] = {}

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        _, _, prefix, aead = self._entry(context)
        data_nonce = random_bytes(NONCE_BYTES)
        return prefix + data_nonce + aead.encrypt(data_nonce, plaintext, context)

    def prepare(self, context: bytes) -> None:
        """Make `context`'s DEK now, for a writer that knows it will seal there soon and has
        time to spare now: wrapping a fresh DEK and building its cipher is most of the cost
        of a context's first value."""
        self._entry(context)

    def _entry(self, context: bytes) -> tuple[str, bytes, bytes, AESGCM]:
        """The context's DEK under the active key: the cached one, or a fresh one."""
        keyset = self.ring.current()
        key_id = keyset.active
        kek = keyset.keys[key_id]
        entry = self._sealing.get(context)
        if entry is not None and entry[0] == key_id and entry[1] == kek:
            return entry
        fresh = random_bytes(KEY_BYTES + NONCE_BYTES)
        dek, wrap_nonce = fresh[:KEY_BYTES], fresh[KEY_BYTES:]
        wrapped = keyset.aeads[key_id].encrypt(wrap_nonce, dek, _wrap_aad(key_id, context))
        entry = (
            key_id,
            kek,
            VERSION + key_id.encode() + b"\x00" + wrap_nonce + wrapped,
            AESGCM(dek),
        )
        if len(self._sealing) >= self.size:
            self._sealing.clear()
        self._sealing[context] = entry
        self._remember(context, entry[2], entry[3])
        return entry

    def open(self, sealed: bytes, context: bytes, what: str) -> bytes:
        """As `KeyRing.open`, the same errors."""
        key_id, body = _split(sealed, what)
        prefix = sealed[: len(sealed) - len(body) + _WRAPPED]
        aead = self._opening.get((context, prefix))
        if aead is None or key_id not in self.ring.current().keys:
            aead = AESGCM(self.ring.unwrap(key_id, body, context, what))  # or KEY_NOT_FOUND
            self._remember(context, prefix, aead)
        return _open_data(aead, key_id, body, context, what)

    def _remember(self, context: bytes, prefix: bytes, aead: AESGCM) -> None:
        if len(self._opening) >= self.size:
            self._opening.clear()
        self._opening[(context, prefix)] = aead


def key_id_of(sealed: bytes) -> str:
    """The id of the KEK an envelope names (no key needed): for counting and re-wrapping."""
    return _split(sealed, "a sealed value")[0]


def _split(sealed: bytes, what: str) -> tuple[str, bytes]:
    end = sealed.find(b"\x00", 1, 40)
    if (
        not sealed.startswith(VERSION)
        or end < 2
        or len(sealed) < end + 1 + _WRAPPED + NONCE_BYTES + TAG_BYTES
    ):
        raise DataLoss(
            f"{what} is not a sealed value this llmos wrote: the store was altered or "
            "written by something else",
            reason="SEALED_DATA_CORRUPT",
        )
    return sealed[1:end].decode("ascii", "replace"), sealed[end + 1 :]


def _open_data(aead: AESGCM, key_id: str, body: bytes, context: bytes, what: str) -> bytes:
    """Decrypt the data part of an envelope's `body` with its DEK's cipher."""
    data = body[_WRAPPED:]
    try:
        return aead.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], context)
    except InvalidTag as error:
        raise _corrupt(what, key_id) from error


def _corrupt(what: str, key_id: str) -> DataLoss:
    return DataLoss(
        f"{what} does not authenticate under key {key_id!r}: it was altered or copied from "
        "another record, or this process's key {key_id!r} is not the one it was sealed with "
        "(every process sharing a store needs the same key file); it is not returned",
        reason="SEALED_DATA_CORRUPT",
        metadata={"key_id": key_id},
    )


def _wrap_aad(key_id: str, context: bytes) -> bytes:
    return b"llmos/dek\x00" + key_id.encode() + b"\x00" + context


@functools.lru_cache(maxsize=4096)
def _derive(master: bytes, purpose: str, tenant: str) -> bytes:
    info = f"llmos/privacy/{purpose}/{tenant}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(master)


def _identity(path: Path) -> tuple[int, int, int, int]:
    info = path.stat()
    return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _check_set(keys: dict[str, bytes], active: str, where: str) -> None:
    for key_id, key in keys.items():
        if not KEY_ID.fullmatch(key_id):
            raise FailedPrecondition(
                f"{where}: key id {key_id!r} must be 1-32 of A-Z a-z 0-9 . _ -",
                reason="BAD_KEY",
            )
        if len(key) != KEY_BYTES:
            raise FailedPrecondition(
                f"{where}: key {key_id!r} has {len(key)} bytes; AES-256 keys have {KEY_BYTES}",
                reason="BAD_KEY",
            )
    if active not in keys:
        raise FailedPrecondition(
            f"{where}: the active key {active!r} is not among its keys", reason="BAD_KEY"
        )


def _decode(key_id: str, encoded: str, where: str) -> bytes:
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise FailedPrecondition(
            f"{where}: key {key_id!r} is not base64", reason="BAD_KEY"
        ) from error


def from_setting(value: str) -> KeyRing:
    """`id:base64,id:base64`: the last key is the active one."""
    keys: dict[str, bytes] = {}
    for item in value.split(","):
        key_id, sep, encoded = item.strip().partition(":")
        if not sep or not key_id:
            raise FailedPrecondition(
                "setting 'privacy_key' must be id:base64[,id:base64...]", reason="BAD_KEY"
            )
        keys[key_id] = _decode(key_id, encoded, "setting 'privacy_key'")
    return KeyRing(keys, list(keys)[-1], "the privacy_key setting")


def from_file(path: Path) -> KeyRing:
    """The ring in `path`, refused unless only its owner may read it."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise FailedPrecondition(
            f"key file {path} has mode {mode:04o}: group or others may read it; "
            f"run `chmod 600 {path}`",
            reason="KEY_FILE_MODE",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        keys = {str(k): _decode(str(k), str(v), str(path)) for k, v in data["keys"].items()}
        active = str(data["active"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise FailedPrecondition(
            f"key file {path} is not {{'active': ID, 'keys': {{ID: BASE64}}}}: {error}",
            reason="BAD_KEY",
        ) from error
    return KeyRing(keys, active, str(path), path)


def _serialize(keys: dict[str, bytes], active: str) -> bytes:
    data = {"active": active, "keys": {k: base64.b64encode(v).decode() for k, v in keys.items()}}
    return json.dumps(data, indent=1).encode()


def write_file(path: Path, ring: KeyRing) -> None:
    """Create `path` holding `ring`, mode 0600 from the first byte; FileExistsError if it
    exists. Written whole to a temporary file and then linked into place, so a process
    starting at the same moment (the kernel and the privacy service do) reads either no
    file or a complete one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(_serialize(ring.keys, ring.active))
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temporary, path)
    finally:
        temporary.unlink()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    descriptor = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def rotate_file(ring: KeyRing) -> str:
    """Add a fresh key to the ring's key file and make it active; its id.

    The file is replaced atomically (a 0600 temporary file renamed over it), so a process
    reading it sees the old ring or the new one, never half of one. Keys from the
    environment cannot be rotated here: FailedPrecondition(KEYS_FROM_SETTING).
    """
    path = ring.path
    if path is None:
        raise FailedPrecondition(
            f"the keys come from {ring.source}, not a key file, so they cannot be rotated "
            "here: add a key to the setting ('...,k2:BASE64'; the last one is active) and "
            "restart the stack",
            reason="KEYS_FROM_SETTING",
        )
    with _file_lock(path):
        current = from_file(path)
        keys = current.keys
        number = 1 + max(
            (int(k[1:]) for k in keys if k.startswith("k") and k[1:].isdigit()), default=0
        )
        key_id = f"k{number}"
        keys[key_id] = secrets.token_bytes(KEY_BYTES)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(_serialize(keys, key_id))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
    ring.reload(force=True)
    return key_id


def load_keys(setting: str, key_file: str, data_dir: str) -> KeyRing:
    """The key ring from the setting, the named key file, or the default file (made once)."""
    if setting:
        return from_setting(setting)
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise FailedPrecondition(
                f"privacy_key_file {path} does not exist; create it (mode 0600) or unset it "
                "to use the default under the data directory",
                reason="KEY_FILE_MISSING",
            )
        return from_file(path)
    path = Path(data_dir) / KEY_FILE
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # the kernel and privacy start together
            write_file(path, KeyRing.generate(str(path)))
    return from_file(path)
