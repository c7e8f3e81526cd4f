"""The hardware service as a real process over real gRPC, beside a real kernel.

A kernel, the hardware service and the explain service (a light process that registers
like any other) run as `llmos serve` child processes on free ports; the tests read
snapshots and reserve memory as any client would, and check the figures against what
psutil sees of the same processes. No model is needed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stacktools import STACK_SIZE, free_port_block, stack_data_dir

from llmos.services.errors import error_info
from llmos.v1 import hardware_pb2, hardware_pb2_grpc, kernel_pb2, kernel_pb2_grpc

GIB = 2**30
HARDWARE_OFFSET = 5


class Processes:
    """`llmos serve NAME` children sharing one kernel port and data directory (which links
    the session's models folder, so the safety process loads the encoder exported there)."""

    def __init__(self, tmp: Path, shared_data_dir: Path) -> None:
        self.port = free_port_block(STACK_SIZE)
        self.tmp = tmp
        self.data_dir = stack_data_dir(shared_data_dir, tmp)
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> subprocess.Popen[bytes]:
        with (self.tmp / f"{name}.log").open("wb") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "llmos.kernel.cli", "serve", name,
                 "--port", str(self.port), "--data-dir", str(self.data_dir)],
                stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "LLMOS_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        self.children[name] = child
        return child

    def services(self) -> dict[str, kernel_pb2.ServiceInfo]:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            reply = kernel_pb2_grpc.KernelServiceStub(channel).ListServices(
                kernel_pb2.ListServicesRequest(), timeout=5
            )
        return {service.name: service for service in reply.services}

    def wait_registered(self, *names: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name in names:
                if self.children[name].poll() is not None:
                    pytest.fail(f"{name} exited; see {self.tmp / (name + '.log')}")
            with contextlib.suppress(grpc.RpcError):
                if set(names) <= set(self.services()):
                    return
            time.sleep(0.2)
        pytest.fail(f"{names} did not register within {timeout_s}s; logs in {self.tmp}")

    def stop(self) -> None:
        for child in reversed(self.children.values()):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children.values():
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


@pytest.fixture(scope="module")
def processes(
    shared_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Processes]:
    running = Processes(tmp_path_factory.mktemp("hardware"), shared_data_dir)
    try:
        running.start("kernel")
        deadline = time.monotonic() + 60
        while True:
            with (
                grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
                contextlib.suppress(grpc.RpcError),
            ):
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"the kernel did not start; see {running.tmp / 'kernel.log'}")
            time.sleep(0.2)
        running.start("hardware")
        running.start("explain")
        running.wait_registered("hardware", "explain")
        yield running
    finally:
        running.stop()


@pytest.fixture
def hardware(processes: Processes) -> Iterator[hardware_pb2_grpc.HardwareServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{processes.port + HARDWARE_OFFSET}") as channel:
        yield hardware_pb2_grpc.HardwareServiceStub(channel)


def snapshot(stub: hardware_pb2_grpc.HardwareServiceStub) -> hardware_pb2.HardwareSnapshot:
    return stub.Snapshot(hardware_pb2.HardwareServiceSnapshotRequest(), timeout=10).snapshot


def reserve(
    stub: hardware_pb2_grpc.HardwareServiceStub,
    size: int,
    holder: str,
    *,
    ttl_s: float | None = 60,
    device: str = "cpu",
    renew: str = "",
) -> hardware_pb2.HardwareServiceReserveResponse:
    request = hardware_pb2.HardwareServiceReserveRequest(
        device=device, bytes=size, holder=holder, reservation_id=renew
    )
    if ttl_s is not None:
        request.ttl.FromNanoseconds(int(ttl_s * 1e9))
    return stub.Reserve(request, timeout=10)


def release(stub: hardware_pb2_grpc.HardwareServiceStub, reservation_id: str, holder: str) -> None:
    stub.Release(
        hardware_pb2.HardwareServiceReleaseRequest(reservation_id=reservation_id, holder=holder),
        timeout=10,
    )


def refused(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, str, dict[str, str]]:
    """Run `call`, which must fail; its code, reason, message and ErrorInfo metadata."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    info = error_info(error)
    assert info is not None and info.domain == "llmos.dev", error
    return error.code(), info.reason, error.details(), dict(info.metadata)


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"{what} did not happen within {timeout_s}s")
        time.sleep(0.1)
    return time.monotonic() - started


# ---------------------------------------------------------------- snapshots


def test_snapshot_reports_this_hosts_cpu_and_memory(hardware) -> None:
    before = time.time()
    taken = snapshot(hardware)
    assert before - 1 <= taken.taken_at.ToNanoseconds() / 1e9 <= time.time() + 1
    cpu = taken.cpu
    assert cpu.cores == psutil.cpu_count()
    assert len(cpu.per_core_percent) == psutil.cpu_count()
    assert all(0 <= p <= 100 for p in cpu.per_core_percent) and 0 <= cpu.percent <= 100
    assert len(cpu.load_average) == 3
    assert abs(cpu.load_average[0] - os.getloadavg()[0]) < 2.0
    memory = psutil.virtual_memory()
    assert taken.memory.total_bytes == memory.total
    assert abs(taken.memory.available_bytes - memory.available) < 0.1 * memory.total
    assert taken.memory.reserved_bytes == 0


def test_cpu_figures_follow_real_load(hardware) -> None:
    """A process spinning on one core shows as busy CPU on the host."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(2.5)  # two readings of the service's one-second CPU sampling
        busiest = max(snapshot(hardware).cpu.per_core_percent)
    finally:
        spinner.kill()
        spinner.wait()
    assert busiest > 50, "one core runs a busy loop"


def test_snapshot_lists_each_registered_service_process(processes, hardware) -> None:
    services = processes.services()
    taken = snapshot(hardware)
    by_name = {p.service: p for p in taken.processes}
    assert set(by_name) == set(services) == {"hardware", "explain"}
    for name, service in services.items():
        process = by_name[name]
        assert process.pid == service.pid == processes.children[name].pid
        rss = psutil.Process(process.pid).memory_info().rss
        assert 10 * 2**20 < process.rss_bytes < 2 * GIB
        assert abs(process.rss_bytes - rss) < 0.5 * rss, (name, process.rss_bytes, rss)
        assert process.cpu_percent >= 0


def test_gpus_are_listed_by_nvml_or_their_absence_explained(hardware) -> None:
    """On this CPU-only host the list is empty and the reason names NVML; on a GPU host
    the same call lists each GPU NVML counts."""
    import pynvml  # the hardware extra installs it

    taken = snapshot(hardware)
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        count = 0
    if count:
        assert len(taken.gpus) == count and taken.gpu_unavailable_reason == ""
        assert all(gpu.memory_total_bytes > 0 and gpu.name for gpu in taken.gpus)
    else:
        assert list(taken.gpus) == []
        assert "NVML" in taken.gpu_unavailable_reason


def test_watch_streams_snapshots_at_the_requested_interval(hardware) -> None:
    request = hardware_pb2.HardwareServiceWatchRequest(interval=Duration(nanos=200_000_000))
    started = time.monotonic()
    stream = hardware.Watch(request, timeout=30)
    taken = [next(stream).snapshot for _ in range(6)]
    elapsed = time.monotonic() - started
    stream.cancel()
    stamps = [s.taken_at.ToNanoseconds() / 1e9 for s in taken]
    assert stamps == sorted(stamps) and len(set(stamps)) == 6
    assert elapsed >= 5 * 0.2 * 0.9, "six snapshots 200 ms apart take at least a second"
    assert all(s.memory.total_bytes > 0 and s.cpu.cores > 0 for s in taken)


@pytest.mark.parametrize(
    "interval",
    [Duration(), Duration(nanos=50_000_000), Duration(seconds=-1), Duration(seconds=61)],
    ids=["zero", "50ms", "negative", "61s"],
)
def test_watch_refuses_intervals_out_of_bounds(hardware, interval: Duration) -> None:
    request = hardware_pb2.HardwareServiceWatchRequest(interval=interval)
    code, reason, message, _ = refused(lambda: next(hardware.Watch(request, timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and reason == "BAD_INTERVAL"
    assert "between 100 ms and 60 s" in message
    assert snapshot(hardware).cpu.cores > 0, "the service keeps serving"


# ---------------------------------------------------------------- reservations


def test_reserve_shows_in_the_snapshot_and_release_frees_it(hardware) -> None:
    made = reserve(hardware, GIB, "test-a", ttl_s=60)
    assert made.reservation_id
    assert abs(made.expires_at.ToNanoseconds() / 1e9 - (time.time() + 60)) < 5
    assert snapshot(hardware).memory.reserved_bytes == GIB
    code, reason, message, _ = refused(lambda: release(hardware, made.reservation_id, "test-b"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and reason == "NOT_HOLDER"
    assert "held by 'test-a'" in message
    release(hardware, made.reservation_id, "test-a")
    assert snapshot(hardware).memory.reserved_bytes == 0
    code, reason, _, _ = refused(lambda: release(hardware, made.reservation_id, "test-a"))
    assert code == grpc.StatusCode.NOT_FOUND and reason == "RESERVATION_NOT_FOUND"


def test_a_reservation_that_does_not_fit_is_refused_naming_what_is_free(hardware) -> None:
    available = snapshot(hardware).memory.available_bytes
    size = int(available * 0.6)
    held = reserve(hardware, size, "test-big")
    try:
        code, reason, message, metadata = refused(lambda: reserve(hardware, size, "test-other"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason == "INSUFFICIENT_MEMORY"
        assert "is free" in message and "reserved" in message
        free = int(metadata["free_bytes"])
        assert int(metadata["reserved_bytes"]) == size
        assert 0 <= free < size
        assert metadata["device"] == "cpu" and int(metadata["requested_bytes"]) == size
    finally:
        release(hardware, held.reservation_id, "test-big")
    reserve_again = reserve(hardware, size, "test-other")  # fits once the first is gone
    release(hardware, reserve_again.reservation_id, "test-other")


def test_a_reservation_expires_after_its_ttl_unless_renewed(hardware) -> None:
    lapsing = reserve(hardware, GIB, "test-ttl", ttl_s=1.0)
    renewed = reserve(hardware, GIB, "test-renew", ttl_s=1.0)
    assert snapshot(hardware).memory.reserved_bytes == 2 * GIB
    time.sleep(0.6)
    again = reserve(hardware, 0, "test-renew", ttl_s=3.0, device="", renew=renewed.reservation_id)
    assert again.reservation_id == renewed.reservation_id
    assert again.expires_at.ToNanoseconds() > renewed.expires_at.ToNanoseconds()
    time.sleep(0.8)  # 1.4 s after both were made
    assert snapshot(hardware).memory.reserved_bytes == GIB, "only the renewed one is left"
    code, reason, _, _ = refused(lambda: release(hardware, lapsing.reservation_id, "test-ttl"))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND")
    code, reason, _, _ = refused(
        lambda: reserve(hardware, 0, "test-ttl", ttl_s=1, renew=lapsing.reservation_id)
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND")
    release(hardware, renewed.reservation_id, "test-renew")


def test_renewal_by_another_holder_or_with_another_size_is_refused(hardware) -> None:
    held = reserve(hardware, GIB, "test-owner")
    try:
        code, reason, _, _ = refused(
            lambda: reserve(hardware, 0, "test-thief", renew=held.reservation_id)
        )
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "NOT_HOLDER")
        code, reason, message, _ = refused(
            lambda: reserve(hardware, 2 * GIB, "test-owner", renew=held.reservation_id)
        )
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "RENEWAL_MISMATCH")
        assert "Release and Reserve again" in message
    finally:
        release(hardware, held.reservation_id, "test-owner")


def test_a_reservation_ends_when_its_holder_process_dies(hardware) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        held = reserve(hardware, GIB, f"pid:{child.pid}", ttl_s=600)
        time.sleep(1.0)
        assert snapshot(hardware).memory.reserved_bytes == GIB, "a live holder keeps it"
        child.kill()  # not reaped yet: a zombie, which counts as ended
        waited = wait_for(
            lambda: snapshot(hardware).memory.reserved_bytes == 0, 5, "the reservation ending"
        )
        assert waited < 5
        code, reason, _, _ = refused(
            lambda: release(hardware, held.reservation_id, f"pid:{child.pid}")
        )
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND")
    finally:
        child.kill()
        child.wait()


def test_a_registered_service_holding_a_reservation_frees_it_when_killed(
    processes, hardware
) -> None:
    safety = processes.start("safety")
    processes.wait_registered("safety")
    held = reserve(hardware, GIB, "safety", ttl_s=600)
    assert snapshot(hardware).memory.reserved_bytes == GIB
    safety.send_signal(signal.SIGKILL)
    safety.wait()
    wait_for(lambda: snapshot(hardware).memory.reserved_bytes == 0, 5, "the reservation ending")
    code, _, _, _ = refused(lambda: release(hardware, held.reservation_id, "safety"))
    assert code == grpc.StatusCode.NOT_FOUND


BAD_RESERVES = [
    ("negative bytes", dict(size=-1), "BAD_BYTES", "more than 0"),
    ("zero bytes", dict(size=0), "BAD_BYTES", "more than 0"),
    ("more than the host has", dict(size=2**62), "BAD_BYTES", "total memory"),
    ("unknown device", dict(device="tpu:0"), "UNKNOWN_DEVICE", "'gpu:N'"),
    ("no device", dict(device=""), "UNKNOWN_DEVICE", "'cpu'"),
    ("a GPU this host lacks", dict(device="gpu:9999"), "UNKNOWN_DEVICE", "gpu:9999"),
    ("no ttl", dict(ttl_s=None), "BAD_TTL", "ttl is required"),
    ("zero ttl", dict(ttl_s=0), "BAD_TTL", "ttl is required"),
    ("negative ttl", dict(ttl_s=-5), "BAD_TTL", "more than 0"),
    ("a ttl over a day", dict(ttl_s=90_000), "BAD_TTL", "24 hours"),
    ("no holder", dict(holder=""), "HOLDER_MISSING", "holder is required"),
    ("a bad pid holder", dict(holder="pid:abc"), "BAD_HOLDER", "pid:N"),
    ("a pid that does not run", dict(holder="pid:2147483646"), "HOLDER_NOT_RUNNING", "no process"),
]


@pytest.mark.parametrize(
    ("change", "reason", "words"), [c[1:] for c in BAD_RESERVES], ids=[c[0] for c in BAD_RESERVES]
)
def test_bad_reserve_requests_are_invalid_arguments_and_the_service_keeps_serving(
    hardware, change: dict[str, object], reason: str, words: str
) -> None:
    arguments: dict[str, object] = {"size": GIB, "holder": "test-bad", "ttl_s": 60.0}
    arguments.update(change)
    code, got, message, _ = refused(lambda: reserve(hardware, **arguments))  # type: ignore[arg-type]
    assert (code, got) == (grpc.StatusCode.INVALID_ARGUMENT, reason), message
    assert words in message
    assert snapshot(hardware).memory.reserved_bytes == 0, "nothing was reserved"


def test_bad_release_requests(hardware) -> None:
    code, reason, _, _ = refused(lambda: release(hardware, "", "test-x"))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "RESERVATION_ID_MISSING")
    code, reason, _, _ = refused(lambda: release(hardware, "rsv-unknown", "test-x"))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND")
    held = reserve(hardware, GIB, "test-x")
    code, reason, _, _ = refused(lambda: release(hardware, held.reservation_id, ""))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "HOLDER_MISSING")
    release(hardware, held.reservation_id, "test-x")
