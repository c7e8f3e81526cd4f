"""Where a serving service of some kind is, as the kernel's registry lists it.

CLI commands that talk to a service directly (`llmos safety`, `llmos privacy`) ask the
kernel rather than assume a port, so they work with `llmos up`, Compose or any layout.
"""

from __future__ import annotations

import grpc

from llmos.kernel.registry import KIND_NAMES
from llmos.services.config import Settings
from llmos.services.errors import NotFound, from_rpc_error
from llmos.v1 import common_pb2, kernel_pb2, kernel_pb2_grpc


def serving_address(settings: Settings, kind: common_pb2.ServiceKind.ValueType) -> str:
    """The address of a registered, SERVING service of `kind`; NotFound when none is."""
    channel = grpc.insecure_channel(settings.kernel_target)
    try:
        reply = kernel_pb2_grpc.KernelServiceStub(channel).ListServices(
            kernel_pb2.ListServicesRequest(), timeout=10
        )
    except grpc.RpcError as error:
        where = f"ListServices on the kernel at {settings.kernel_target}"
        raise from_rpc_error(error, where) from error  # type: ignore[arg-type]
    finally:
        channel.close()
    serving = [
        s
        for s in reply.services
        if s.kind == kind and s.health == common_pb2.SERVICE_HEALTH_SERVING
    ]
    if not serving:
        raise NotFound(
            f"no {KIND_NAMES.get(kind, 'such')} service is registered and serving at the "
            f"kernel {settings.kernel_target}",
            reason="SERVICE_UNAVAILABLE",
        )
    return serving[0].address
