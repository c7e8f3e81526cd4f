"""Test plugin: tries to go past its limits when asked.

- llmos_before_request: a prompt "allocate N" allocates N MiB (and touches them);
- tool `write` {"name", "kib"}: writes that many KiB to one file in its storage;
- tool `connect` {"host", "port"}: tries a TCP connection and says what happened.
"""

import os
import socket

from llmos.plugins.hookspecs import hookimpl

_state = {"storage": None}


@hookimpl
def llmos_startup(config, context):
    _state["storage"] = str(context.storage_dir)


@hookimpl
def llmos_before_request(prompt):
    words = (prompt or "").split()
    if len(words) == 2 and words[0] == "allocate":
        block = bytearray(int(words[1]) * 1024 * 1024)
        block[::4096] = b"x" * len(block[::4096])


def _write(data):
    path = os.path.join(_state["storage"], data["name"])
    with open(path, "wb") as file:
        for _ in range(int(data["kib"])):
            file.write(b"x" * 1024)
            file.flush()
    return {"bytes": os.path.getsize(path)}


def _connect(data):
    try:
        with socket.create_connection((data["host"], int(data["port"])), timeout=3):
            return {"connected": True, "error": ""}
    except OSError as error:
        return {"connected": False, "error": f"{type(error).__name__}: {error}"}


NAME = {"type": "string", "pattern": "^[a-z0-9.]+$"}


@hookimpl
def llmos_register_tools(register):
    register(
        "write",
        "Writes KiB to a file in its storage.",
        {
            "type": "object",
            "properties": {"name": NAME, "kib": {"type": "integer"}},
            "required": ["name", "kib"],
        },
        _write,
    )
    register(
        "connect",
        "Tries a TCP connection.",
        {
            "type": "object",
            "properties": {"host": {"type": "string"}, "port": {"type": "integer"}},
            "required": ["host", "port"],
        },
        _connect,
    )
