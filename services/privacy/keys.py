"""The privacy service's keys: named master keys from a key file or the environment, and the
per-tenant keys derived from them for each purpose.

A key ring holds master keys by id (`k1`, `k2`, ...) and says which one is active: new data
is sealed with the active key and names its id, so older data still opens after a new key
is added. Keys come from, in this order:

- the setting `privacy_key` (environment `LLMOS_PRIVACY_KEY`): `id:base64[,id:base64...]`,
  the last one active;
- the key file `privacy_key_file` (default `<data_dir>/privacy/keys.json`), JSON
  `{"active": "k1", "keys": {"k1": "<base64 of 32 bytes>"}}`. It must be mode 0600 (no
  group or other access): a readable key file is refused, not used. When the default file
  does not exist it is created with one fresh key, mode 0600, so a first `llmos up` needs
  no set-up. A named file that does not exist is an error, never created.

Keys never come from the store they protect. Each tenant's keys are derived with HKDF-SHA256
from the master key, the purpose and the tenant name, so one tenant's ciphertext does not
open under another's key and an HMAC of the same value differs between tenants.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import json
import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from llmos.services.errors import FailedPrecondition

KEY_BYTES = 32
KEY_FILE = Path("privacy") / "keys.json"


@dataclasses.dataclass(frozen=True)
class KeyRing:
    """Master keys by id, and the id new data is sealed with."""

    keys: dict[str, bytes]
    active: str
    source: str

    def master(self, key_id: str) -> bytes:
        key = self.keys.get(key_id)
        if key is None:
            raise FailedPrecondition(
                f"key {key_id!r} is not in the privacy service's key ring ({self.source}; "
                f"it has {', '.join(sorted(self.keys))}): data sealed with it cannot be "
                "opened until that key is configured again",
                reason="KEY_NOT_FOUND",
                metadata={"key_id": key_id},
            )
        return key

    def derived(self, key_id: str, purpose: str, tenant: str) -> bytes:
        """The tenant's key for `purpose` ("vault", "encrypt", "hash") under master `key_id`."""
        return _derive(self.master(key_id), purpose, tenant)

    @classmethod
    def generate(cls, source: str = "generated") -> KeyRing:
        return cls({"k1": secrets.token_bytes(KEY_BYTES)}, "k1", source)


@functools.lru_cache(maxsize=4096)
def _derive(master: bytes, purpose: str, tenant: str) -> bytes:
    info = f"llmos/privacy/{purpose}/{tenant}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(master)


def _decode(key_id: str, encoded: str, where: str) -> bytes:
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise FailedPrecondition(
            f"{where}: key {key_id!r} is not base64", reason="BAD_KEY"
        ) from error
    if len(key) != KEY_BYTES:
        raise FailedPrecondition(
            f"{where}: key {key_id!r} has {len(key)} bytes; AES-256 keys have {KEY_BYTES}",
            reason="BAD_KEY",
        )
    return key


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
    if active not in keys:
        raise FailedPrecondition(
            f"key file {path}: the active key {active!r} is not among its keys", reason="BAD_KEY"
        )
    return KeyRing(keys, active, str(path))


def write_file(path: Path, ring: KeyRing) -> None:
    """Write `ring` to `path`, mode 0600 from the first byte (never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = {
        "active": ring.active,
        "keys": {k: base64.b64encode(v).decode() for k, v in ring.keys.items()},
    }
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        json.dump(data, handle)


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
        write_file(path, KeyRing.generate(str(path)))
    return from_file(path)
