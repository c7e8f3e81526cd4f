"""GPUs through NVML (nvidia-ml-py's `pynvml`), or the reason there are none.

The reader is handed the pynvml module through a loader function rather than importing
it itself, so the code that reads a GPU runs unchanged against a stand-in module in unit
tests and against the real NVML where a GPU exists. Where NVML cannot be used (the
package is not installed, no driver, no GPU) the reader lists no GPU and says why; it
never invents one.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from llmos.services.hardware.ledger import Capacity
from llmos.v1 import hardware_pb2

log = logging.getLogger(__name__)

NOT_INSTALLED = "nvidia-ml-py is not installed (pip install 'llmos[hardware]')"


def import_pynvml() -> Any:
    return importlib.import_module("pynvml")


def _text(value: Any) -> str:
    """Older pynvml releases return bytes for strings, newer ones str."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class GpuReader:
    """Opens NVML once; reads each GPU's name, memory, utilisation, temperature and power."""

    def __init__(self, load: Callable[[], Any] = import_pynvml) -> None:
        self._load = load
        self._nvml: Any = None
        self._lock = threading.Lock()
        self.count = 0
        # Why no GPU is listed; empty while NVML works.
        self.reason = "NVML not opened yet"

    def open(self) -> None:
        try:
            nvml = self._load()
        except ImportError:
            self.reason = NOT_INSTALLED
            log.info("no GPUs: %s", self.reason)
            return
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as error:
            self.reason = f"NVML is not available: {_text(error)} (no NVIDIA driver or GPU)"
            log.info("no GPUs: %s", self.reason)
            return
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as error:
            nvml.nvmlShutdown()
            self.reason = f"NVML could not count the GPUs: {_text(error)}"
            log.warning("no GPUs: %s", self.reason)
            return
        if count == 0:
            nvml.nvmlShutdown()
            self.reason = "NVML is available but found no GPU"
            log.info("no GPUs: %s", self.reason)
            return
        self._nvml, self.count, self.reason = nvml, count, ""
        log.info("NVML opened: %d GPU(s)", count)

    def close(self) -> None:
        with self._lock:
            if self._nvml is not None:
                nvml, self._nvml = self._nvml, None
                try:
                    nvml.nvmlShutdown()
                except nvml.NVMLError as error:
                    log.warning("nvmlShutdown failed: %s", _text(error))

    def _optional(self, read: Callable[[], float]) -> float:
        """A figure the GPU may not support (power on some boards): 0 rather than no GPU."""
        try:
            return float(read())
        except self._nvml.NVMLError:
            return 0.0

    def _device(self, index: int) -> hardware_pb2.GpuStats:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return hardware_pb2.GpuStats(
            index=index,
            name=_text(nvml.nvmlDeviceGetName(handle)),
            memory_total_bytes=int(memory.total),
            memory_used_bytes=int(memory.used),
            memory_free_bytes=int(memory.free),
            utilization_percent=self._optional(
                lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu
            ),
            temperature_celsius=self._optional(
                lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
            ),
            power_watts=self._optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),
        )

    def read(self) -> tuple[list[hardware_pb2.GpuStats], str]:
        """Every GPU NVML can read now, and why the list is empty when it is."""
        with self._lock:
            if self._nvml is None:
                return [], self.reason
            gpus, errors = [], []
            for index in range(self.count):
                try:
                    gpus.append(self._device(index))
                except self._nvml.NVMLError as error:
                    errors.append(f"gpu:{index}: {_text(error)}")
            if errors:
                log.warning("NVML could not read %s", "; ".join(errors))
            if not gpus:
                return [], f"NVML could not read any of {self.count} GPU(s): {'; '.join(errors)}"
            return gpus, ""

    def capacity(self, index: int) -> Capacity | None:
        """GPU `index`'s memory (total, free) now; None when there is no such GPU to read."""
        for gpu in self.read()[0]:
            if gpu.index == index:
                return Capacity(gpu.memory_total_bytes, gpu.memory_free_bytes)
        return None
