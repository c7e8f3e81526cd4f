"""The one way an LLM OS process makes a grpc.aio server: `new_server(max_message_bytes)`.

Every server of the project, the services' (`serve()`), the kernel's model gateway for
plugins and each plugin host's, gets the same three things from here: the one
error-to-status table and request id (`ErrorInterceptor`), the explicit message-size and
keepalive options (`server_options`), and methods found through generic handlers only
(`GenericHandlersOnly`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc

from llmos.services.channels import server_options
from llmos.services.interceptors import ErrorInterceptor


def new_server(max_message_bytes: int) -> grpc.aio.Server:
    """A grpc.aio server with the project's interceptor, options and method lookup; the
    caller adds its servicers and ports, then starts it."""
    return GenericHandlersOnly(
        grpc.aio.server(
            interceptors=[ErrorInterceptor()], options=server_options(max_message_bytes)
        )
    )


class GenericHandlersOnly(grpc.aio.Server):
    """A grpc.aio server whose methods are all found through generic handlers.

    The generated `add_*Servicer_to_server` functions add every servicer twice: as a generic
    handler, and as "registered methods". grpc.aio's server then keeps one pending
    request-call task per registered method, and after every call it waits again on all of
    them (`asyncio.wait`: a callback added to and removed from each), 32 on the kernel's
    server. The generic handler alone serves the same methods, looked up by name once per
    call. So registration is dropped here and everything else is passed through: about 3%
    more kernel throughput at saturation (docs/performance-kernel-log.md, twelfth round)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Nothing: the servicer's generic handler, added with these, serves the methods."""

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]
    ) -> None:
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self._server.wait_for_termination(timeout)
