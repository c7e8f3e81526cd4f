"""The vault's half of retention: conversations older than their tenant's `retention` are
deleted here, as the kernel's sweeper (kernel/retention.py) deletes the tasks.

The privacy service reads the same settings as the kernel (`retention` in `[policy]` and
`[tenants.NAME]`, services/config.py), so both sides expire on the same rule without a
call between them: a tenant with its own retention is swept by name, every other tenant
under `[policy]`'s, and 0 keeps. A conversation's age counts from its first redaction,
which is when its task ran, moments after the task was created. Each sweep deletes at
most `kernel_retention_batch` conversations per scope (bounded work, as in the kernel).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from llmos.services.config import Settings
from llmos.services.privacy.vault import Vault

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VaultScope:
    tenant: str | None
    retention_s: float
    keep: frozenset[str] = frozenset()


def vault_scopes(settings: Settings) -> tuple[VaultScope, ...]:
    """Each tenant table's retention (its own, else `[policy]`'s), then `[policy]`'s for
    every other tenant; scopes that keep forever (0) are left out."""
    default = settings.policy.retention or 0.0
    found = []
    for tenant, table in sorted(settings.tenants.items()):
        retention = default if table.retention is None else table.retention
        if retention > 0:
            found.append(VaultScope(tenant, retention))
    if default > 0:
        found.append(VaultScope(None, default, frozenset(settings.tenants)))
    return tuple(found)


def sweep(vault: Vault, scopes: tuple[VaultScope, ...], batch: int, now: float) -> int:
    """One pass; the number of conversations deleted."""
    deleted = 0
    for scope in scopes:
        deleted += vault.expire(
            now - scope.retention_s, tenant=scope.tenant, keep=scope.keep, limit=batch
        )
    if deleted:
        log.info("retention: deleted %d vault conversations", deleted)
    return deleted


async def sweep_forever(vault: Vault, settings: Settings) -> None:
    """Sweep every `kernel_retention_sweep_s` while the service runs (a no-op loop is not
    started when no scope expires anything)."""
    scopes = vault_scopes(settings)
    while True:
        try:
            sweep(vault, scopes, settings.kernel_retention_batch, time.time())
        except Exception:  # a locked or failing file: log, and try at the next sweep
            log.exception("vault retention sweep failed")
        await asyncio.sleep(settings.kernel_retention_sweep_s)
