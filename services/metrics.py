"""Prometheus metrics for every process: the one `/metrics` HTTP endpoint that `serve()` starts.

Where: each process serves `/metrics` on its own port, `Settings.metrics_port_for(grpc_port)`
(by default its gRPC port + 1000; `metrics_port = -1` turns it off), bound on `host`, and
registers `host:port` with the kernel as its `metrics_address`, so `llmos status` lists it.
The endpoint starts right after the gRPC port, before the service's `start()`, so a model
that takes a minute to load can already be watched (its memory growing, for instance).

Which registry: prometheus_client's default `REGISTRY`. Every process of the stack is its
own OS process, so the default registry already is a per-process one; using it keeps the
collectors prometheus_client puts there with nothing to wire: `process_*` (CPU seconds,
resident and virtual memory, open file descriptors, start time; Linux only) and
`python_gc_*`, `python_info`. Modules define their instruments at import time, like loggers.

What a process serves: `llmos_process_info{name, kind, version}` (always 1, for joining
series to a process in queries), the collectors above, and the families of its kind
(`KIND_COLLECTORS`), imported only in that process: the kernel's never imports torch, and
the host gauges come from the one hardware process instead of six times over.

The HTTP server is prometheus_client's own (a daemon thread): a scrape is answered even
while the event loop or the runtime's batch thread is busy.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import threading
from collections.abc import Mapping
from types import MappingProxyType
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, Gauge, disable_created_metrics, start_http_server

from llmos import __version__
from llmos.services.config import Settings
from llmos.services.errors import Unavailable
from llmos.v1 import common_pb2

log = logging.getLogger(__name__)

# No `*_created` series beside every counter and histogram: in the text format they only
# double the series count, and Prometheus reads a reset from the counter itself.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated

# The modules that define a kind of process's own metrics; importing one registers them.
KIND_COLLECTORS: Mapping[common_pb2.ServiceKind.ValueType, str] = MappingProxyType(
    {
        common_pb2.SERVICE_KIND_KERNEL: "llmos.kernel.metrics",
        common_pb2.SERVICE_KIND_RUNTIME: "llmos.services.runtime.metrics",
        common_pb2.SERVICE_KIND_HARDWARE: "llmos.services.hardware.metrics",
    }
)

PROCESS_INFO = Gauge(
    "llmos_process_info",
    "Always 1: which process of the stack this is (name, kind) and its llmos version.",
    ["name", "kind", "version"],
)


def kind_name(kind: common_pb2.ServiceKind.ValueType) -> str:
    """The label value of a kind of process: "runtime" for SERVICE_KIND_RUNTIME."""
    return common_pb2.ServiceKind.Name(kind).removeprefix("SERVICE_KIND_").lower()


@dataclasses.dataclass
class MetricsEndpoint:
    """A running /metrics HTTP server and the address other processes reach it at."""

    port: int
    address: str
    _server: WSGIServer
    _thread: threading.Thread

    def close(self) -> None:
        """Stop answering scrapes and free the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics(
    settings: Settings,
    *,
    name: str,
    kind: common_pb2.ServiceKind.ValueType,
    grpc_port: int,
) -> MetricsEndpoint | None:
    """Register this process's metric families and serve them; None when metrics are off.

    A port already in use ends the process (Unavailable), as a taken gRPC port does: a
    process that silently runs without the metrics it was configured for is worse.
    """
    port = settings.metrics_port_for(grpc_port)
    if port is None:
        return None
    module = KIND_COLLECTORS.get(kind)
    if module is not None:
        importlib.import_module(module)
    PROCESS_INFO.labels(name=name, kind=kind_name(kind), version=__version__).set(1)
    try:
        server, thread = start_http_server(port, addr=settings.host, registry=REGISTRY)
    except OSError as error:
        raise Unavailable(
            f"cannot serve /metrics on {settings.host}:{port}: {error.strerror}; set "
            "metrics_port (LLMOS_METRICS_PORT) to free ports, or -1 to turn metrics off",
            reason="METRICS_PORT_UNAVAILABLE",
            metadata={"port": str(port)},
        ) from error
    endpoint = MetricsEndpoint(port, settings.advertised(port), server, thread)
    log.info("%s serves Prometheus metrics on http://%s:%d/metrics", name, settings.host, port)
    return endpoint
