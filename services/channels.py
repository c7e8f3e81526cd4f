"""Client channels and server options: keepalive, message sizes and retries set in one place.

Retries are declared in the gRPC service config (retryPolicy), never as loops in code:
a call that fails with UNAVAILABLE before any response arrived is retried with backoff.
A stream that has already delivered a message is never retried, so a runtime that dies
mid-stream surfaces at once as UNAVAILABLE.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from llmos.services.logs import request_id_var

REQUEST_ID_KEY = "x-request-id"
TENANT_KEY = "x-llmos-tenant"

RETRY_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.2s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}

KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000


def _size_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Options for every grpc.aio server of the stack."""
    return [
        *_size_options(max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # Clients ping every KEEPALIVE_TIME_MS; accept that without calling it abuse.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]


def client_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Options for every channel the stack opens, retry policy included."""
    return [
        *_size_options(max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG)),
    ]


def open_channel(target: str, max_message_bytes: int = 16 * 1024 * 1024) -> grpc.aio.Channel:
    """An insecure grpc.aio channel to another process of the stack."""
    return grpc.aio.insecure_channel(target, options=client_options(max_message_bytes))


def outgoing_metadata(**extra: str) -> tuple[tuple[str, str], ...]:
    """Metadata for a downstream call: the current request id travels with it."""
    pairs = [(REQUEST_ID_KEY, request_id_var.get())] if request_id_var.get() else []
    pairs.extend((key.replace("_", "-"), value) for key, value in extra.items() if value)
    return tuple(pairs)
