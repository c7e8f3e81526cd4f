"""The processes of the stack, as data: name, port offset from the kernel's, how to build it.

`llmos serve NAME` builds one of these in the current process; `llmos up` starts each as a
child process in this order and stops them in the reverse one. Builders import their
service lazily, so the kernel process never imports torch.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

from llmos.services.config import Settings
from llmos.services.serve import Service
from llmos.services.unimplemented import PlannedService
from llmos.v1 import common_pb2


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    name: str
    port_offset: int
    build: Callable[[Settings], Service]

    def port(self, settings: Settings) -> int:
        return settings.port + self.port_offset


def _kernel(settings: Settings) -> Service:
    from llmos.kernel.server import KernelService

    return KernelService(settings)  # refuses a bad pipeline policy before serving


def _runtime(settings: Settings) -> Service:
    from llmos.services.runtime.echo import EchoRuntimeService, uses_echo

    if uses_echo(settings):  # runtime_engine = "echo": no model, no torch
        return EchoRuntimeService(settings)
    from llmos.services.runtime.server import RuntimeService

    return RuntimeService(settings)


def _hardware(settings: Settings) -> Service:
    from llmos.services.hardware.server import HardwareService

    return HardwareService(settings)


def _privacy(settings: Settings) -> Service:
    from llmos.services.privacy.server import PrivacyService

    return PrivacyService(settings)


def _safety(settings: Settings) -> Service:
    from llmos.services.safety.server import SafetyService

    return SafetyService(settings)


def _planned(
    kind: common_pb2.ServiceKind.ValueType, proto: str, service_name: str
) -> Callable[[Settings], Service]:
    def build(settings: Settings) -> Service:
        return PlannedService(
            kind=kind,
            pb2_module=importlib.import_module(f"llmos.v1.{proto}_pb2"),
            grpc_module=importlib.import_module(f"llmos.v1.{proto}_pb2_grpc"),
            service_name=service_name,
        )

    return build


# The hardware service starts before the runtime, so the runtime's default model can
# reserve its host memory through it (its port offset stays 5).
STACK: tuple[ProcessSpec, ...] = (
    ProcessSpec("kernel", 0, _kernel),
    ProcessSpec("hardware", 5, _hardware),
    ProcessSpec("runtime", 1, _runtime),
    ProcessSpec("safety", 2, _safety),
    ProcessSpec("privacy", 3, _privacy),
    ProcessSpec(
        "explain", 4, _planned(common_pb2.SERVICE_KIND_EXPLAIN, "explain", "ExplainService")
    ),
)

BY_NAME = {spec.name: spec for spec in STACK}
