"""The server interceptor every process installs: request ids in, errors out as statuses.

For each call it takes `x-request-id` from the metadata (or makes one), puts it in the
logging context, and turns a raised `LlmosError` into the status from the one table in
`llmos.services.errors`, with ErrorInfo details. Anything else becomes INTERNAL with the
request id in the message, and is logged with its traceback; the process keeps serving.

An RPC a servicer does not override reaches the generated base class, which raises
NotImplementedError: that becomes UNIMPLEMENTED naming the method and the work item that
will build it (`PLANNED_IN`), so unbuilt parts of a contract never need stub methods.
"""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from llmos.services.channels import REQUEST_ID_KEY
from llmos.services.errors import LlmosError, Unimplemented, to_rpc_status
from llmos.services.logs import request_id_var
from llmos.services.rpc_types import Context

log = logging.getLogger(__name__)

Handler = Any  # grpc.RpcMethodHandler: a namedtuple at run time, typed loosely by types-grpcio


def _request_id(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return str(value)
    # 16 hex digits. Not a secret, only unique enough to find a call's log lines: no
    # system call (os.urandom) on every request.
    return f"{random.getrandbits(64):016x}"


# Methods whose wrapped handlers are kept; a server has a few dozen.
MAX_WRAPPED = 1024

# Which work item builds each service's missing RPCs (see the issues).
PLANNED_IN = {
    "llmos.v1.SafetyService": "the safety work item",
    "llmos.v1.PrivacyService": "the privacy work item",
    "llmos.v1.ExplainService": "the explain work item",
    "llmos.v1.PluginHostService": "the plugins work item",
}


def _not_built(method: str) -> Unimplemented:
    """`method` is the full gRPC path, e.g. /llmos.v1.SafetyService/Check."""
    service, _, name = method.strip("/").partition("/")
    planned = PLANNED_IN.get(service, "a later work item")
    return Unimplemented(
        f"{service}.{name} is not implemented yet (planned in {planned})",
        reason="NOT_BUILT_YET",
        metadata={"method": f"{service}.{name}"},
    )


async def _abort(context: Context, error: Exception, method: str) -> None:
    if isinstance(error, NotImplementedError):
        error = _not_built(method)
    if isinstance(error, LlmosError):
        log.info("%s refused: %s", method, error.message, extra={"reason": error.reason})
        _forget_frames(error)
        await context.abort_with_status(to_rpc_status(error))
    log.error("%s failed unexpectedly", method, exc_info=error)
    _forget_frames(error)
    internal = LlmosError(
        f"internal error in {method} (request id {request_id_var.get()}); see the service log"
    )
    await context.abort_with_status(to_rpc_status(internal))


def _forget_frames(error: BaseException) -> None:
    """Drop the traceback once the error is reported: the AbortError raised next keeps this
    one as its context, and its frames would pin their locals (a whole model, say) for as
    long as gRPC holds the finished call."""
    while error is not None:
        error.__traceback__ = None
        error = error.__cause__ or error.__context__  # type: ignore[assignment]


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Any:
    async def unary(request_or_iterator: Any, context: Context) -> Any:
        request_id_var.set(_request_id(context))
        try:
            return await behavior(request_or_iterator, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(context, error, method)

    return unary


def _wrap_streaming(behavior: Callable[..., Any], method: str) -> Any:
    async def streaming(request_or_iterator: Any, context: Context) -> AsyncIterator[Any]:
        request_id_var.set(_request_id(context))
        try:
            result = behavior(request_or_iterator, context)
            if inspect.isasyncgen(result):
                async for response in result:
                    yield response
            else:  # a coroutine that writes with context.write
                await result
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(context, error, method)

    return streaming


def _wrap(handler: Handler, method: str) -> Handler:
    if handler.unary_unary:
        return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, method))
    if handler.stream_unary:
        return handler._replace(stream_unary=_wrap_unary(handler.stream_unary, method))
    if handler.unary_stream:
        return handler._replace(unary_stream=_wrap_streaming(handler.unary_stream, method))
    return handler._replace(stream_stream=_wrap_streaming(handler.stream_stream, method))


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Request-id context and the exception-to-status table, for every handler.

    A method's wrapped handler is built once and reused while the server hands out the
    same handler for it (the request id is read per call, inside the wrapper): wrapping
    anew for every call was a measurable share of a short call's cost."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap(handler, method)
        if len(self._wrapped) < MAX_WRAPPED:  # generic handlers may answer any name
            self._wrapped[method] = (handler, wrapped)
        return wrapped
