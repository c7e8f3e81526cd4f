"""`llmos keys rotate` and `llmos keys status`: the at-rest keys of a running stack.

Both go to the kernel over gRPC (KernelService.RotateKeys, GetKeyStatus): the kernel writes
the key file and reloads at once, and counts what its task store seals under each key. The
privacy service follows the key file by itself; its vault's counts are read here from the
vault file, read-only (key ids are stored in the clear beside each sealed entry, so no key
is needed to count them).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import grpc

from llmos.services.config import Settings
from llmos.services.errors import from_rpc_error
from llmos.services.privacy.vault import VAULT_FILE
from llmos.v1 import kernel_pb2, kernel_pb2_grpc

CALL_TIMEOUT_S = 60.0


def _stub(settings: Settings) -> tuple[grpc.Channel, kernel_pb2_grpc.KernelServiceStub]:
    channel = grpc.insecure_channel(settings.kernel_target)
    return channel, kernel_pb2_grpc.KernelServiceStub(channel)


def vault_usage(data_dir: str) -> dict[str, int]:
    """Entries per key id in the vault file under `data_dir` (empty when there is none)."""
    path = Path(data_dir) / VAULT_FILE
    if not path.is_file():
        return {}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        try:
            rows = conn.execute("SELECT key_id, COUNT(*) FROM entries GROUP BY key_id")
            return {str(key_id): int(count) for key_id, count in rows}
        except sqlite3.OperationalError:  # no entries table yet
            return {}


def rotate(settings: Settings) -> int:
    channel, stub = _stub(settings)
    with channel:
        try:
            reply = stub.RotateKeys(kernel_pb2.RotateKeysRequest(), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as error:
            raise from_rpc_error(error, "kernel RotateKeys") from error  # type: ignore[arg-type]
    print(
        f"key {reply.key_id} is active ({reply.source}); older data moves to it in the background"
    )
    return 0


def status(settings: Settings, as_json: bool) -> int:
    channel, stub = _stub(settings)
    with channel:
        try:
            reply = stub.GetKeyStatus(kernel_pb2.GetKeyStatusRequest(), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as error:
            raise from_rpc_error(error, "kernel GetKeyStatus") from error  # type: ignore[arg-type]
    vault = vault_usage(settings.data_dir)
    keys = {key.key_id: key for key in reply.keys}
    rows = [
        {
            "key_id": key_id,
            "active": key_id == reply.active_key_id,
            # The kernel lists every key of the ring: an id only the vault names is not in it.
            "configured": keys[key_id].configured if key_id in keys else False,
            "task_store_values": keys[key_id].task_store_values if key_id in keys else 0,
            "vault_entries": vault.get(key_id, 0),
        }
        for key_id in sorted(set(keys) | set(vault))
    ]
    summary = {
        "active_key_id": reply.active_key_id,
        "source": reply.source,
        "keys": rows,
        "rewrapping": reply.rewrapping,
        "rewrapped": reply.rewrapped,
        "rewrap_failed": reply.rewrap_failed,
    }
    if as_json:
        print(json.dumps(summary))
        return 0
    print(f"keys from {reply.source}; active {reply.active_key_id}")
    print(f"{'KEY':<12} {'ACTIVE':<7} {'CONFIGURED':<11} {'TASK STORE':>11} {'VAULT':>7}")
    for row in rows:
        print(
            f"{row['key_id']:<12} {'yes' if row['active'] else '':<7} "
            f"{'yes' if row['configured'] else 'MISSING':<11} "
            f"{row['task_store_values']:>11} {row['vault_entries']:>7}"
        )
    state = "in progress" if reply.rewrapping else "idle"
    print(
        f"re-wrapping {state}: {reply.rewrapped} values moved since the kernel started, "
        f"{reply.rewrap_failed} could not be opened"
    )
    return 0


def add_commands(commands: Any, common: Any, settings_of: Any) -> None:
    """Add `keys rotate` and `keys status` to the `llmos` parser."""
    keys = commands.add_parser("keys", help="encryption-at-rest keys: rotate, status")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    rotate_parser = actions.add_parser(
        "rotate", help="add a fresh key and make it active, without a restart"
    )
    common(rotate_parser)
    rotate_parser.set_defaults(func=lambda a: rotate(settings_of(a)))
    status_parser = actions.add_parser(
        "status", help="key ids and how many stored values each still seals"
    )
    status_parser.add_argument("--json", action="store_true", help="one JSON object")
    common(status_parser)
    status_parser.set_defaults(func=lambda a: status(settings_of(a), a.json))
