"""Servicers for contracts that are sketched but not built yet: every RPC answers UNIMPLEMENTED.

A process serving one of these is real (health, reflection, registration with the kernel);
it only refuses the calls themselves, naming the method and the work item that will build
it, and never invents data.
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any, TypeVar

import grpc

from llmos.services.errors import Unimplemented
from llmos.v1 import common_pb2

ServicerT = TypeVar("ServicerT")


def unimplemented_servicer(base: type[ServicerT], service_name: str, planned_in: str) -> ServicerT:
    """An instance of a subclass of generated `base` whose every RPC raises Unimplemented."""

    def refuse(method: str) -> Any:
        async def handler(self: Any, request: Any, context: Any) -> Any:
            raise Unimplemented(
                f"{service_name}.{method} is not implemented yet ({planned_in})",
                reason="NOT_BUILT_YET",
                metadata={"method": f"{service_name}.{method}"},
            )

        return handler

    methods = {
        name: refuse(name)
        for name, member in inspect.getmembers(base, inspect.isfunction)
        if name[:1].isupper()
    }
    subclass = type(f"Unimplemented{base.__name__}", (base,), methods)
    return subclass()  # type: ignore[no-any-return]


class PlannedService:
    """A process for a service whose contract is sketched but not built: health,
    reflection and registration are real; every RPC answers UNIMPLEMENTED."""

    def __init__(
        self,
        kind: common_pb2.ServiceKind.ValueType,
        pb2_module: ModuleType,
        grpc_module: ModuleType,
        service_name: str,
        planned_in: str,
    ) -> None:
        self.kind = kind
        self.full_name = pb2_module.DESCRIPTOR.services_by_name[service_name].full_name
        self._add = getattr(grpc_module, f"add_{service_name}Servicer_to_server")
        base = getattr(grpc_module, f"{service_name}Servicer")
        self._servicer = unimplemented_servicer(base, service_name, planned_in)

    def add_to_server(self, server: grpc.aio.Server) -> list[str]:
        self._add(self._servicer, server)
        return [self.full_name]

    async def start(self) -> None:
        """Nothing to load."""

    async def stop(self) -> None:
        """Nothing to release."""
