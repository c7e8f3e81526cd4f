"""The project's exceptions and the one table that maps them to gRPC status codes.

    LlmosError                  (INTERNAL)
    ├── InvalidArgument         (INVALID_ARGUMENT)   bad input: say what to fix
    ├── NotFound                (NOT_FOUND)          unknown model, task, service
    ├── AlreadyExists           (ALREADY_EXISTS)
    ├── PermissionDenied        (PERMISSION_DENIED)  a capability or role the caller lacks
    ├── ResourceExhausted       (RESOURCE_EXHAUSTED) full queues, quotas, memory
    ├── FailedPrecondition      (FAILED_PRECONDITION)
    ├── Unavailable             (UNAVAILABLE)        a service is down or not ready
    ├── DeadlineExceeded        (DEADLINE_EXCEEDED)
    └── Unimplemented           (UNIMPLEMENTED)      part of the contract not built yet

Servers raise these; `to_rpc_status` turns one into a `google.rpc.Status` with a
`google.rpc.ErrorInfo` detail (reason, domain "llmos.dev", metadata), which the error
interceptor sends. Clients read the reason back with `error_info`.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "llmos.dev"


class LlmosError(Exception):
    """Base of every error the project raises on purpose.

    `reason` is a stable UPPER_SNAKE identifier clients may switch on; the message is
    for people and says what to fix.
    """

    default_reason = "INTERNAL"

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})


class InvalidArgument(LlmosError):
    default_reason = "INVALID_ARGUMENT"


class NotFound(LlmosError):
    default_reason = "NOT_FOUND"


class AlreadyExists(LlmosError):
    default_reason = "ALREADY_EXISTS"


class PermissionDenied(LlmosError):
    default_reason = "PERMISSION_DENIED"


class ResourceExhausted(LlmosError):
    default_reason = "RESOURCE_EXHAUSTED"


class FailedPrecondition(LlmosError):
    default_reason = "FAILED_PRECONDITION"


class Unavailable(LlmosError):
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(LlmosError):
    default_reason = "DEADLINE_EXCEEDED"


class DataLoss(LlmosError):
    """Stored data that cannot be trusted: a sealed value that does not authenticate."""

    default_reason = "DATA_LOSS"


class Unimplemented(LlmosError):
    default_reason = "UNIMPLEMENTED"


STATUS_BY_ERROR: dict[type[LlmosError], grpc.StatusCode] = {
    LlmosError: grpc.StatusCode.INTERNAL,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    DataLoss: grpc.StatusCode.DATA_LOSS,
}

ERROR_BY_STATUS: dict[grpc.StatusCode, type[LlmosError]] = {
    code: cls for cls, code in STATUS_BY_ERROR.items()
}


def status_code_for(error: LlmosError) -> grpc.StatusCode:
    """The table lookup, walking up the class tree for subclasses defined elsewhere."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return grpc.StatusCode.INTERNAL


def to_rpc_status(error: LlmosError) -> grpc.Status:
    """A `grpc.Status` carrying the message and an ErrorInfo detail, ready for abort_with_status."""
    code = status_code_for(error)
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    )
    status = status_pb2.Status(code=code.value[0], message=error.message, details=[detail])
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


def error_info(error: grpc.aio.AioRpcError | grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo a failed call carries, if the server attached one."""
    status = rpc_status.from_call(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def from_rpc_error(error: grpc.aio.AioRpcError, what: str) -> LlmosError:
    """Re-raise a downstream failure as ours, keeping its code, reason and message.

    `what` names the downstream call (e.g. "runtime Generate") so the client learns
    which hop failed.
    """
    cls = ERROR_BY_STATUS.get(error.code(), LlmosError)
    info = error_info(error)
    reason = info.reason if info is not None else error.code().name
    metadata = dict(info.metadata) if info is not None else {}
    return cls(f"{what}: {error.details()}", reason=reason, metadata=metadata)
