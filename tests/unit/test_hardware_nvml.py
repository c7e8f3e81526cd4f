"""The NVML reader (services/hardware/nvml.py) against a stand-in for the pynvml module.

The reader's code path is the one that runs on a GPU host; only the module differs. The
stand-in mirrors pynvml's surface as the reader uses it (functions, NVMLError and its
subclasses, NVML_TEMPERATURE_GPU, bytes or str names), including its failures: no
library, no GPU, a figure the board does not support, a GPU that cannot be read.
"""

from __future__ import annotations

import types
from typing import Any

from llmos.services.hardware.ledger import Capacity
from llmos.services.hardware.nvml import NOT_INSTALLED, GpuReader

GIB = 2**30


class NVMLError(Exception):
    pass


class NVMLErrorLibraryNotFound(NVMLError):
    def __str__(self) -> str:
        return "NVML Shared Library Not Found"


class NVMLErrorNotSupported(NVMLError):
    def __str__(self) -> str:
        return "Not Supported"


class NVMLErrorGpuIsLost(NVMLError):
    def __str__(self) -> str:
        return "GPU is lost"


def fake_nvml(
    gpus: list[dict[str, Any]], *, init_error: NVMLError | None = None
) -> types.SimpleNamespace:
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_error is not None:
            raise init_error

    def handle(index: int) -> dict[str, Any]:
        gpu = gpus[index]
        if gpu.get("lost"):
            raise NVMLErrorGpuIsLost()
        return gpu

    def optional(gpu: dict[str, Any], key: str) -> Any:
        if key not in gpu:
            raise NVMLErrorNotSupported()
        return gpu[key]

    return types.SimpleNamespace(
        calls=calls,
        NVMLError=NVMLError,
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetName=lambda h: h["name"],
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(
            total=h["total"], used=h["used"], free=h["total"] - h["used"]
        ),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(
            gpu=optional(h, "util"), memory=0
        ),
        nvmlDeviceGetTemperature=lambda h, sensor: optional(h, "temp"),
        nvmlDeviceGetPowerUsage=lambda h: optional(h, "milliwatts"),
    )


H200 = {
    "name": "NVIDIA H200",
    "total": 141 * GIB,
    "used": 1 * GIB,
    "util": 37,
    "temp": 41,
    "milliwatts": 123_456,
}


def test_every_figure_of_every_gpu_is_read() -> None:
    second = {**H200, "name": b"NVIDIA H200", "used": 100 * GIB, "util": 99}
    nvml = fake_nvml([H200, second])
    reader = GpuReader(lambda: nvml)
    reader.open()
    assert reader.count == 2 and reader.reason == ""
    gpus, reason = reader.read()
    assert reason == ""
    assert [g.index for g in gpus] == [0, 1]
    first = gpus[0]
    assert first.name == "NVIDIA H200"
    assert first.memory_total_bytes == 141 * GIB
    assert first.memory_used_bytes == GIB
    assert first.memory_free_bytes == 140 * GIB
    assert first.utilization_percent == 37
    assert first.temperature_celsius == 41
    assert abs(first.power_watts - 123.456) < 1e-3
    assert gpus[1].name == "NVIDIA H200", "bytes names (older pynvml) are decoded"
    assert gpus[1].utilization_percent == 99
    assert reader.capacity(1) == Capacity(141 * GIB, 41 * GIB)
    assert reader.capacity(2) is None
    reader.close()
    assert nvml.calls == ["init", "shutdown"]
    assert reader.read() == ([], reader.reason), "a closed reader lists nothing"


def test_a_figure_the_board_does_not_support_reads_zero_and_keeps_the_gpu() -> None:
    bare = {"name": "Tesla T4", "total": 16 * GIB, "used": 0}
    reader = GpuReader(lambda: fake_nvml([bare]))
    reader.open()
    (gpu,), reason = reader.read()
    assert reason == ""
    assert gpu.name == "Tesla T4"
    assert (gpu.utilization_percent, gpu.temperature_celsius, gpu.power_watts) == (0, 0, 0)


def test_a_gpu_that_cannot_be_read_is_left_out_and_an_empty_list_says_why() -> None:
    reader = GpuReader(lambda: fake_nvml([{**H200, "lost": True}, H200]))
    reader.open()
    gpus, reason = reader.read()
    assert [g.index for g in gpus] == [1] and reason == ""

    reader = GpuReader(lambda: fake_nvml([{**H200, "lost": True}]))
    reader.open()
    assert reader.read() == ([], "NVML could not read any of 1 GPU(s): gpu:0: GPU is lost")


def test_without_the_package_there_is_no_gpu_and_the_reason_says_how_to_get_it() -> None:
    def missing() -> Any:
        raise ImportError("No module named 'pynvml'")

    reader = GpuReader(missing)
    reader.open()
    assert reader.count == 0
    assert reader.read() == ([], NOT_INSTALLED)
    assert "llmos[hardware]" in NOT_INSTALLED
    reader.close()  # nothing to shut down


def test_without_a_driver_there_is_no_gpu_and_the_reason_quotes_nvml() -> None:
    nvml = fake_nvml([H200], init_error=NVMLErrorLibraryNotFound())
    reader = GpuReader(lambda: nvml)
    reader.open()
    gpus, reason = reader.read()
    assert gpus == []
    assert reason.startswith("NVML is not available: NVML Shared Library Not Found")
    assert "shutdown" not in nvml.calls


def test_nvml_without_gpus_is_shut_down_and_says_so() -> None:
    nvml = fake_nvml([])
    reader = GpuReader(lambda: nvml)
    reader.open()
    assert reader.read() == ([], "NVML is available but found no GPU")
    assert nvml.calls == ["init", "shutdown"]


def test_the_real_module_on_this_host_gives_gpus_or_a_reason_never_both() -> None:
    """The default loader imports the installed pynvml: on a GPU host this lists the GPUs,
    elsewhere (as on CPU-only CI) it lists none and says why."""
    reader = GpuReader()
    reader.open()
    try:
        gpus, reason = reader.read()
        assert bool(gpus) != bool(reason)
        for gpu in gpus:
            assert gpu.name and gpu.memory_total_bytes > 0
            assert gpu.memory_used_bytes + gpu.memory_free_bytes <= gpu.memory_total_bytes
    finally:
        reader.close()
