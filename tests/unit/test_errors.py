"""The error classes, their gRPC status codes, and the rich status they travel as."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from llmos.services import errors
from llmos.services.errors import (
    DOMAIN,
    ERROR_BY_STATUS,
    STATUS_BY_ERROR,
    AlreadyExists,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LlmosError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
    status_code_for,
    to_rpc_status,
)

EXPECTED = {
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


def test_table_maps_every_error_class_to_its_code() -> None:
    assert STATUS_BY_ERROR == EXPECTED


def test_table_covers_every_error_class_in_the_module() -> None:
    defined = {
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, LlmosError)
    }

    assert defined == set(STATUS_BY_ERROR)


def test_reverse_table_is_one_to_one() -> None:
    assert {cls: code for code, cls in ERROR_BY_STATUS.items()} == EXPECTED


@pytest.mark.parametrize(("cls", "code"), EXPECTED.items())
def test_status_code_and_default_reason(cls: type[LlmosError], code: grpc.StatusCode) -> None:
    error = cls("message")

    assert status_code_for(error) == code
    assert error.reason == code.name
    assert error.message == "message"
    assert error.metadata == {}


def test_status_code_for_walks_up_to_the_nearest_known_class() -> None:
    class ModelNotFound(NotFound):
        pass

    class DeeperStill(ModelNotFound):
        pass

    class Custom(LlmosError):
        pass

    assert status_code_for(ModelNotFound("m")) == grpc.StatusCode.NOT_FOUND
    assert status_code_for(DeeperStill("m")) == grpc.StatusCode.NOT_FOUND
    assert status_code_for(Custom("m")) == grpc.StatusCode.INTERNAL


def test_explicit_reason_and_metadata_are_kept() -> None:
    metadata = {"limit": "10"}
    error = ResourceExhausted("full", reason="QUEUE_FULL", metadata=metadata)
    metadata["limit"] = "changed"

    assert error.reason == "QUEUE_FULL"
    assert error.metadata == {"limit": "10"}
    assert str(error) == "full"


def test_to_rpc_status_carries_code_message_and_error_info() -> None:
    error = NotFound("no model 'x'", reason="MODEL_NOT_FOUND", metadata={"model": "x"})

    status = to_rpc_status(error)

    assert status.code == grpc.StatusCode.NOT_FOUND
    assert status.details == "no model 'x'"
    trailing = dict(status.trailing_metadata)
    rich = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])
    assert rich.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert rich.message == "no model 'x'"
    assert len(rich.details) == 1
    info = error_details_pb2.ErrorInfo()
    assert rich.details[0].Unpack(info)
    assert info.reason == "MODEL_NOT_FOUND"
    assert info.domain == DOMAIN == "llmos.dev"
    assert dict(info.metadata) == {"model": "x"}


def test_to_rpc_status_of_a_subclass_uses_the_parent_code() -> None:
    class QuotaExceeded(ResourceExhausted):
        default_reason = "QUOTA_EXCEEDED"

    status = to_rpc_status(QuotaExceeded("too many"))

    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    rich = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    rich.details[0].Unpack(info)
    assert info.reason == "QUOTA_EXCEEDED"
