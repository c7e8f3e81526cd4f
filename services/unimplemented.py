"""Processes for services whose contract is sketched but not built yet.

A `PlannedService` is a real process (health, reflection, registration with the kernel)
serving the generated base servicer, whose every RPC raises NotImplementedError; the error
interceptor answers those with UNIMPLEMENTED naming the method and the work item that will
build it. It never invents data.
"""

from __future__ import annotations

from types import ModuleType

import grpc

from llmos.v1 import common_pb2


class PlannedService:
    """Serves `service_name`'s contract from `grpc_module` with nothing implemented."""

    def __init__(
        self,
        kind: common_pb2.ServiceKind.ValueType,
        pb2_module: ModuleType,
        grpc_module: ModuleType,
        service_name: str,
    ) -> None:
        self.kind = kind
        self.full_name = pb2_module.DESCRIPTOR.services_by_name[service_name].full_name
        self._add = getattr(grpc_module, f"add_{service_name}Servicer_to_server")
        self._servicer = getattr(grpc_module, f"{service_name}Servicer")()

    def add_to_server(self, server: grpc.aio.Server) -> list[str]:
        self._add(self._servicer, server)
        return [self.full_name]

    async def start(self) -> None:
        """Nothing to load."""

    async def stop(self) -> None:
        """Nothing to release."""
