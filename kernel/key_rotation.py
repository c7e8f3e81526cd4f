"""Key rotation in the kernel: `llmos keys rotate` and `llmos keys status`, and the
background re-wrapping that moves the task store's older values onto the new key.

Why it works this way:

- **Rotation is a key-file change.** `RotateKeys` adds a fresh key to the key file and makes
  it active (services/keyring.py `rotate_file`); this kernel reloads its ring at once, so
  the next value it seals uses the new key. Other processes on the same key file (the
  privacy service, other kernels) see the file change within `RELOAD_CHECK_S`. Nothing
  restarts, and older values still open: their key stays in the ring.
- **Re-wrapping is bounded and resumable.** `Rewrapper` walks the store in passes, one
  small `TaskStore.rewrap` step at a time, at most `key_rewrap_rate` values a second, so it
  never crowds out the kernel's own writes. Each step only rewrites a value's wrapped data
  key. A pass that finds nothing left under an old key settles until the active key
  changes; a kernel restarted mid-pass starts a new pass, which skips what was done (those
  values already name the active key). Values it cannot open (a key missing from the ring,
  an altered value) are counted and left as they are, for `llmos keys status` to show.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from llmos.kernel.store import TaskStore
from llmos.services.errors import LlmosError
from llmos.services.keyring import KeyRing, rotate_file
from llmos.v1 import kernel_pb2

log = logging.getLogger(__name__)

# Values one step looks at, at most; steps are spaced to keep to the rate.
STEP = 200
# How often a settled re-wrapper checks whether the active key changed.
IDLE_S = 1.0


class Rewrapper:
    """The background task that moves stored values onto the active key."""

    def __init__(self, store: TaskStore, keys: KeyRing, rate: float) -> None:
        self.store = store
        self.keys = keys
        self.rate = rate
        self.rewrapped = 0
        self.failed = 0
        self.settled_on: str | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        return self._task is not None and self.settled_on != self.keys.active

    def start(self) -> None:
        """Begin re-wrapping in the background; a rate of 0 or less leaves it off (values
        stay under their keys until a kernel starts with a rate again)."""
        if self.rate > 0:
            self._task = asyncio.create_task(self._run(), name="key-rewrap")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        step = max(1, min(STEP, int(self.rate)))
        while True:
            active = self.keys.active
            if self.settled_on == active:
                await asyncio.sleep(IDLE_S)
                continue
            try:
                moved, failed = await self._pass(active, step)
            except LlmosError as error:  # the store is unreachable: try again later
                log.warning("re-wrapping to key %s paused: %s", active, error.message)
                await asyncio.sleep(IDLE_S)
                continue
            if self.keys.active != active:
                continue  # rotated again mid-pass: go round once more
            self.settled_on = active
            if moved or failed:
                log.info(
                    "re-wrapping to key %s done: %d values moved, %d could not be opened",
                    active,
                    moved,
                    failed,
                )

    async def _pass(self, active: str, step: int) -> tuple[int, int]:
        """One pass over the whole store; (moved, failed) in it."""
        cursor, moved, failed = "", 0, 0
        while True:
            report = await self.store.rewrap(cursor, step)
            moved += report.rewrapped
            failed += report.failed
            self.rewrapped += report.rewrapped
            self.failed += report.failed
            cursor = report.cursor
            if not cursor or self.keys.active != active:
                return moved, failed
            await asyncio.sleep(max(report.scanned, 1) / self.rate)


async def rotate(keys: KeyRing) -> kernel_pb2.RotateKeysResponse:
    """Add a key and make it active (FailedPrecondition(KEYS_FROM_SETTING) when the keys
    come from the environment)."""
    key_id = await asyncio.to_thread(rotate_file, keys)
    log.info("rotated the at-rest key: %s is active (%s)", key_id, keys.source)
    return kernel_pb2.RotateKeysResponse(key_id=key_id, source=keys.source)


async def status(
    keys: KeyRing, store: TaskStore, rewrapper: Rewrapper | None
) -> kernel_pb2.GetKeyStatusResponse:
    """Every key the ring has or the store names, and how many values each seals."""
    usage = await store.key_usage()
    configured = keys.keys
    active = keys.active
    names = sorted(set(configured) | set(usage))
    return kernel_pb2.GetKeyStatusResponse(
        active_key_id=active,
        source=keys.source,
        keys=[
            kernel_pb2.KeyUsage(
                key_id=name,
                active=name == active,
                configured=name in configured,
                task_store_values=usage.get(name, 0),
            )
            for name in names
        ],
        rewrapped=rewrapper.rewrapped if rewrapper else 0,
        rewrap_failed=rewrapper.failed if rewrapper else 0,
        rewrapping=rewrapper.busy if rewrapper else False,
    )
