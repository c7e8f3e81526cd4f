"""`Context`: the servicer context every handler receives, typed for mypy.

types-grpcio makes grpc.aio.ServicerContext generic in its request and response types;
at run time it is a plain class, so the subscripted alias exists only for the checker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

if TYPE_CHECKING:
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
else:
    Context = grpc.aio.ServicerContext
