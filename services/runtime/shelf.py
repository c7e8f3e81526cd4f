"""The models a runtime holds: loading and unloading them while it serves, and the memory
an unload gives back.

Each loaded model has its own `Engine` (its own batch). Loading runs on a worker thread
(conversion first, if the catalogue model was never converted); unloading stops the
engine (sequences still running end as CANCELLED), drops every reference, collects and
asks the C allocator to return freed pages (`malloc_trim`), then measures the resident
memory actually returned. A generative model's host memory is reserved through the
hardware service before it loads and released when it unloads, and its KV cache's in
steps as its batch grows and shrinks (`reservations.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
from pathlib import Path

from llmos.services.config import Settings
from llmos.services.errors import AlreadyExists, NotFound, Unavailable
from llmos.services.runtime.embeddings import MINILM, Embedder
from llmos.services.runtime.engine import Engine, EngineLimits, load_model
from llmos.services.runtime.models import resolve_model_dir
from llmos.services.runtime.reservations import (
    HostMemory,
    KvReservations,
    kv_step_bytes,
    weight_bytes,
)
from llmos.v1 import common_pb2

log = logging.getLogger(__name__)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """This process's resident set size, from /proc (Linux)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def _trim_heap() -> None:
    # Not glibc: nothing to ask; freed memory returns when the OS reclaims it.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _is_other_directory(name: str, known: str) -> bool:
    """Whether `name` is a directory other than the one a same-named model came from."""
    return Path(name).is_dir() and Path(name).resolve() != Path(known).resolve()


def model_key(name: str) -> str:
    """The name a model is known by: a catalogue name, or a directory's last component."""
    return Path(name).name


class Shelf:
    """Loaded generative models by name, each with its engine, and the embedding model
    (loaded on first use: most deployments never embed, and it costs ~1.5 s and 90 MB)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engines: dict[str, Engine] = {}
        self.embedder: Embedder | None = None
        self.host_memory = HostMemory(settings)
        # Each generative model's KV-cache reservations, beside its engine.
        self.kv: dict[str, KvReservations] = {}
        self.kv_step_bytes = kv_step_bytes(settings)
        self._loading = asyncio.Lock()

    def infos(self) -> list[common_pb2.ModelInfo]:
        infos = []
        for engine in self.engines.values():
            info, stats = engine.loaded.info(), engine.stats()
            info.running_sequences, info.queued_sequences = stats.running, stats.waiting
            infos.append(info)
        if self.embedder is not None:
            infos.append(self.embedder.info())
        return infos

    async def embedding_model(self, name: str) -> Embedder:
        """The embedding model ("" = the default, all-MiniLM-L6-v2), loading it if needed."""
        if name and name != MINILM.name:
            raise NotFound(
                f"embedding model {name!r} is unknown; this runtime embeds with {MINILM.name}",
                reason="MODEL_NOT_FOUND",
            )
        async with self._loading:
            if self.embedder is None:
                self.embedder = await asyncio.to_thread(Embedder.load)
            return self.embedder

    @property
    def default(self) -> str:
        return model_key(self.settings.model)

    def limits(self) -> EngineLimits:
        return EngineLimits(
            max_batch_size=self.settings.runtime_max_batch,
            max_queued=self.settings.runtime_max_queued,
            kv_budget_bytes=self.settings.runtime_kv_budget_mb * 1024 * 1024,
            aging_s=self.settings.runtime_aging_s,
            stream_buffer=self.settings.runtime_stream_buffer,
        )

    def engine(self, name: str) -> Engine:
        """The engine of `name` ("" = the default model), or NOT_FOUND naming what is loaded."""
        if not self.engines:
            raise Unavailable(
                "the runtime has no model loaded (starting, or all were unloaded: LoadModel "
                "loads one)",
                reason="NOT_READY",
            )
        key = model_key(name) if name else self.default
        if key not in self.engines:
            raise NotFound(
                f"model {name!r} is not loaded; loaded: {sorted(self.engines)} "
                "(LoadModel loads another)",
                reason="MODEL_NOT_FOUND",
            )
        return self.engines[key]

    async def load(self, name: str) -> common_pb2.ModelInfo:
        """Load `name` (a catalogue name or a model directory); loading twice is a no-op."""
        key = model_key(name)
        if key == MINILM.name:
            return (await self.embedding_model("")).info()
        async with self._loading:
            if key in self.engines:
                known = self.engines[key].loaded.source
                if await asyncio.to_thread(_is_other_directory, name, known):
                    raise AlreadyExists(
                        f"a model named {key!r} is already loaded from {known}; unload it first",
                        reason="MODEL_NAME_TAKEN",
                    )
                return self.engines[key].loaded.info()
            model_dir = await asyncio.to_thread(resolve_model_dir, name, self.settings.data_dir)
            log.info("loading %s from %s", key, model_dir)
            weights, batched = self.settings.runtime_weights, self.settings.runtime_max_batch > 1
            size = await asyncio.to_thread(weight_bytes, model_dir, weights, batched=batched)
            await self.host_memory.reserve(key, size)
            try:
                loaded = await asyncio.to_thread(
                    load_model,
                    key,
                    str(model_dir),
                    self.settings.torch_threads,
                    weights,
                    batched=batched,
                )
            except BaseException:
                await self.host_memory.release(key)
                raise
            self.engines[key] = Engine(loaded, self.limits())
            self.kv[key] = KvReservations(
                self.engines[key].memory, self.host_memory, self.kv_step_bytes
            )
            await self.kv[key].start()
            log.info("%s loaded: %d parameters", key, loaded.parameters)
            return loaded.info()

    async def unload(self, name: str) -> int:
        """Stop and drop `name`'s engine; returns the resident bytes given back."""
        key = model_key(name)
        before = resident_bytes()
        if key == MINILM.name and self.embedder is not None:
            self.embedder = None
        elif key in self.engines:
            engine = self.engines.pop(key)
            await asyncio.to_thread(engine.close)
            await self.kv.pop(key).close()
            engine.loaded.release()
            engine.cache.release()
            del engine
            await self.host_memory.release(key)
        else:
            loaded = sorted(self.engines) + ([MINILM.name] if self.embedder else [])
            raise NotFound(
                f"model {name!r} is not loaded; loaded: {loaded}", reason="MODEL_NOT_FOUND"
            )
        gc.unfreeze()  # the model's objects were frozen after start-up (`serve`): collect them
        await asyncio.to_thread(gc.collect)
        _trim_heap()
        freed = max(0, before - resident_bytes())
        log.info("%s unloaded: %d MiB returned", key, freed // 2**20)
        return freed

    async def close(self) -> None:
        for key in list(self.engines):
            await asyncio.to_thread(self.engines.pop(key).close)
            await self.kv.pop(key).close()
        await self.host_memory.close()
