"""The kernel's service registry, with health watched over real gRPC channels."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmos.kernel.registry import Registry
from llmos.services.errors import InvalidArgument, Unavailable
from llmos.v1 import common_pb2, kernel_pb2

RUNTIME = common_pb2.SERVICE_KIND_RUNTIME
SAFETY = common_pb2.SERVICE_KIND_SAFETY
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def free_address() -> str:
    """127.0.0.1:PORT where nothing listens."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def request(
    name: str = "runtime", address: str = "", kind: int = RUNTIME, pid: int = 100
) -> kernel_pb2.RegisterServiceRequest:
    return kernel_pb2.RegisterServiceRequest(
        kind=kind, name=name, address=address or free_address(), pid=pid, version="1.0"
    )


def health_of(registry: Registry, name: str) -> int:
    return {info.name: info.health for info in registry.services()}[name]


async def wait_for(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.05)


def health_watchers() -> list[asyncio.Task[object]]:
    return [task for task in asyncio.all_tasks() if task.get_name().startswith("health-")]


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    registry = Registry(lease_s=15, max_message_bytes=4 * 1024 * 1024)
    try:
        yield registry
    finally:
        await registry.close()


class HealthServer:
    """A grpc.aio server with only the standard health service."""

    def __init__(self) -> None:
        self.server = grpc.aio.server()
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"


@pytest.fixture
async def health_server() -> AsyncIterator[HealthServer]:
    served = HealthServer()
    await served.server.start()
    try:
        yield served
    finally:
        await served.server.stop(None)


@pytest.mark.parametrize(
    "bad",
    [
        kernel_pb2.RegisterServiceRequest(kind=RUNTIME, address="127.0.0.1:1"),
        kernel_pb2.RegisterServiceRequest(kind=RUNTIME, name="runtime"),
        kernel_pb2.RegisterServiceRequest(name="runtime", address="127.0.0.1:1"),
    ],
    ids=["no-name", "no-address", "no-kind"],
)
async def test_register_refuses_incomplete_requests(
    registry: Registry, bad: kernel_pb2.RegisterServiceRequest
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await registry.register(bad)

    assert caught.value.reason == "BAD_SERVICE"
    assert registry.services() == []
    assert health_watchers() == []


async def test_register_returns_the_lease_and_lists_the_service(registry: Registry) -> None:
    address = free_address()

    lease = await registry.register(request(address=address))

    assert lease == 15
    [info] = registry.services()
    assert (info.name, info.kind, info.address, info.pid, info.version) == (
        "runtime",
        RUNTIME,
        address,
        100,
        "1.0",
    )
    assert info.registered_at.seconds > 0


async def test_pick_with_nothing_registered_says_so(registry: Registry) -> None:
    with pytest.raises(Unavailable) as caught:
        registry.pick(RUNTIME)

    assert "no runtime service is serving (none registered)" in caught.value.message
    assert caught.value.reason == "SERVICE_UNAVAILABLE"
    assert caught.value.metadata == {"kind": "runtime"}


async def test_unreachable_service_is_marked_and_listed_by_pick(registry: Registry) -> None:
    address = free_address()
    await registry.register(request(address=address))

    await wait_for(lambda: health_of(registry, "runtime") == common_pb2.SERVICE_HEALTH_UNREACHABLE)

    with pytest.raises(Unavailable) as caught:
        registry.pick(RUNTIME)
    assert f"runtime@{address} is UNREACHABLE" in caught.value.message


async def test_pick_ignores_services_of_other_kinds(
    registry: Registry, health_server: HealthServer
) -> None:
    await registry.register(request(name="safety", kind=SAFETY, address=health_server.address))
    await wait_for(lambda: health_of(registry, "safety") == common_pb2.SERVICE_HEALTH_SERVING)

    with pytest.raises(Unavailable) as caught:
        registry.pick(RUNTIME)

    assert "(none registered)" in caught.value.message
    assert registry.pick(SAFETY).info.name == "safety"


async def test_health_follows_the_watch_stream(
    registry: Registry, health_server: HealthServer
) -> None:
    await registry.register(request(address=health_server.address))
    await wait_for(lambda: health_of(registry, "runtime") == common_pb2.SERVICE_HEALTH_SERVING)
    assert registry.pick(RUNTIME).info.address == health_server.address

    await health_server.health.set("", NOT_SERVING)
    await wait_for(lambda: health_of(registry, "runtime") == common_pb2.SERVICE_HEALTH_NOT_SERVING)
    with pytest.raises(Unavailable) as caught:
        registry.pick(RUNTIME)
    assert f"runtime@{health_server.address} is NOT_SERVING" in caught.value.message

    await health_server.server.stop(None)
    await wait_for(lambda: health_of(registry, "runtime") == common_pb2.SERVICE_HEALTH_UNREACHABLE)


async def test_pick_round_robins_over_serving_instances(
    registry: Registry, health_server: HealthServer
) -> None:
    dead = free_address()
    for name, address in (("runtime-1", health_server.address), ("runtime-2", dead)):
        await registry.register(request(name=name, address=address))
    await registry.register(request(name="runtime-3", address=health_server.address, pid=101))
    await wait_for(
        lambda: (
            [info.health for info in registry.services()]
            == [
                common_pb2.SERVICE_HEALTH_SERVING,
                common_pb2.SERVICE_HEALTH_UNREACHABLE,
                common_pb2.SERVICE_HEALTH_SERVING,
            ]
        )
    )

    picked = [registry.pick(RUNTIME).info.name for _ in range(4)]

    assert sorted(picked) == ["runtime-1", "runtime-1", "runtime-3", "runtime-3"]
    assert picked[0] != picked[1]


async def test_reregistering_the_same_instance_renews_it(registry: Registry) -> None:
    first = request(address=free_address())
    await registry.register(first)
    [before] = registry.services()

    assert await registry.register(first) == 15

    [after] = registry.services()
    assert after.registered_at == before.registered_at
    assert len(health_watchers()) == 1


async def test_reregistering_with_a_new_pid_replaces_the_instance(registry: Registry) -> None:
    address = free_address()
    await registry.register(request(address=address, pid=100))
    [old_watcher] = health_watchers()

    await registry.register(request(address=address, pid=200))

    [info] = registry.services()
    assert info.pid == 200
    assert old_watcher.cancelled()
    assert len(health_watchers()) == 1


async def test_deregister_removes_the_service(registry: Registry) -> None:
    await registry.register(request(name="runtime"))
    await registry.register(request(name="safety", kind=SAFETY))

    await registry.deregister("runtime")
    await registry.deregister("never-registered")

    assert [info.name for info in registry.services()] == ["safety"]
    assert [task.get_name() for task in health_watchers()] == ["health-safety"]


async def test_close_cancels_every_watcher(registry: Registry) -> None:
    await registry.register(request(name="runtime"))
    await registry.register(request(name="safety", kind=SAFETY))
    watchers = health_watchers()
    assert len(watchers) == 2

    await registry.close()

    assert all(task.cancelled() for task in watchers)
    assert health_watchers() == []
    assert registry.services() == []


async def test_an_expired_lease_is_dropped() -> None:
    registry = Registry(lease_s=1, max_message_bytes=4 * 1024 * 1024)
    registry.start()
    try:
        await registry.register(request())
        await wait_for(lambda: registry.services() == [], timeout_s=3.5)
        assert health_watchers() == []
    finally:
        await registry.close()
