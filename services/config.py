"""The one configuration loader: typed `Settings`, from flags > environment > file > defaults.

Every process (kernel, each service, the CLI) builds its settings here and nowhere else:

- defaults are the field defaults below;
- a TOML file (`--config FILE`, `LLMOS_CONFIG`, or `llmos.toml` in the data directory),
  whose top-level keys are the field names, plus two kinds of table: `[policy]` and
  `[tenants.NAME]` (the pipeline policy, `PolicyTable`);
- environment variables `LLMOS_<FIELD>` (e.g. `LLMOS_PORT=6000`), and
  `LLMOS_POLICY_<FIELD>` for a field of the `[policy]` table (e.g. `LLMOS_POLICY_STAGES=`);
- explicit overrides, usually command-line flags.

The loader checks the shape and types of everything, tables included, and names the
offending key (`tenants.acme.fail_open`) in its BAD_SETTING error. What a stage name means
is the kernel's to check (kernel/policy.py): this module cannot import the kernel.

`Settings.describe()` renders the effective values with secrets masked, for the start-up log.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmos.services.errors import InvalidArgument

ENV_PREFIX = "LLMOS_"
SECRET_MARKERS = ("key", "secret", "password", "token")
# With `metrics_port = 0`, a process serves /metrics on its gRPC port plus this: the
# default stack's 50051..50056 gives 51051..51056.
METRICS_PORT_OFFSET = 1000
METRICS_OFF = -1


def default_data_dir(env: Mapping[str, str] | None = None) -> str:
    """Where converted models and llmos.toml live unless told otherwise (XDG layout)."""
    env = os.environ if env is None else env
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "llmos")


@dataclasses.dataclass(frozen=True)
class PolicyTable:
    """One pipeline-policy table as the operator wrote it: `[policy]` (every tenant's
    default) or `[tenants.NAME]` (one tenant). None means "not set here": a tenant table
    inherits the field from `[policy]`, and `[policy]` from the kernel's built-in default.
    The kernel turns these into `TenantPolicy` objects and checks the stage names
    (kernel/policy.py; docs/operator-guide.md "Tenant policy")."""

    # The service stages that run, by name (their order is the pipeline's).
    stages: tuple[str, ...] | None = None
    # Stages whose down service lets the request through, traced "failed_open".
    fail_open: tuple[str, ...] | None = None
    # Seconds each stage's service call may take (less when the task's deadline is nearer).
    timeout_s: float | None = None
    # Stages no tenant table may leave out. `[policy]` only.
    mandatory: tuple[str, ...] | None = None
    # What privacy:redact does to PII before the model: "pseudonymize" (typed placeholders,
    # restored in the output), "mask" (irreversible) or "off" (the model sees it as sent).
    privacy: str | None = None
    # The entity types privacy:redact takes out (PRIVACY_ENTITY_TYPES); the kernel's
    # default is every type but LOCATION (kernel/policy.py says why).
    privacy_entities: tuple[str, ...] | None = None
    # How long the tenant's finished tasks are kept, in seconds after they were created;
    # 0 keeps them forever (the kernel's default). Written "30d", "12h", "90m", "45s", a
    # number of seconds, or "keep" (kernel/retention.py).
    retention: float | None = None


POLICY_FIELDS = tuple(f.name for f in dataclasses.fields(PolicyTable))
PRIVACY_MODES = ("off", "mask", "pseudonymize")
# The types the privacy service detects (services/privacy/recognizers.py ENTITY_TYPES,
# which a unit test keeps equal): repeated here because the loader must not import the
# privacy service and its phone-number and NER dependencies.
PRIVACY_ENTITY_TYPES = (
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "CREDIT_CARD",
    "IBAN_CODE",
    "IP_ADDRESS",
    "US_SSN",
    "PERSON",
    "LOCATION",
)
# The tables among the settings; every other setting is a flat key.
TABLES = ("policy", "tenants")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting a process of the stack reads. Field name = TOML key = LLMOS_<NAME>,
    except the two tables, `policy` and `tenants`, set as TOML tables (and the fields of
    `policy` as LLMOS_POLICY_<FIELD>)."""

    # Where the kernel listens; services bind `host` too, on the port they are given.
    host: str = "127.0.0.1"
    port: int = 50051
    # The kernel address services register with; empty means host:port.
    kernel_address: str = ""
    # The host other processes dial to reach this one; empty means `host`. Needed when
    # binding 0.0.0.0 in a container: set it to the container's service name.
    advertise_host: str = ""
    data_dir: str = dataclasses.field(default_factory=default_data_dir)
    # Model served when a request names none: a name known to the runtime or a local
    # Hugging Face model directory.
    model: str = "SmolLM2-135M-Instruct"
    default_max_tokens: int = 256
    # Requests whose prompt (all messages together) is longer are refused.
    max_prompt_chars: int = 32_000
    max_message_bytes: int = 16 * 1024 * 1024
    # Kernel scheduling: tasks dispatched to runtimes at once (the rest queue by priority
    # class and tenant), and seconds a queued task waits before rising one priority class.
    kernel_runtime_concurrency: int = 64
    kernel_aging_s: float = 5.0
    # Score and Embed calls the kernel has at the runtimes at once (the rest queue by
    # priority class and tenant, bounded like tasks: kernel_max_queued).
    kernel_model_call_concurrency: int = 8
    # Where the kernel keeps tasks: "sqlite" (embedded, one kernel, under data_dir) or
    # "redis" (shared by several kernels; see docs/operator-guide.md "Several kernels").
    task_store: str = "sqlite"
    # The Redis server of the "redis" task store, and the prefix of every key it writes,
    # so several deployments can share one server.
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "llmos:"
    # How long a Redis command is retried across a dropped connection before the kernel
    # gives up on it (UNAVAILABLE / STORE_UNAVAILABLE): longer than a Redis restart takes.
    redis_retry_s: float = 10.0
    # Several kernels: a queued task held by a kernel that has not renewed its claim for
    # this long is taken over by another; one delivered more often than max_deliveries is
    # moved to the dead-letter stream and FAILED.
    kernel_claim_idle_s: float = 15.0
    kernel_max_deliveries: int = 5
    # Tasks the kernel queues per priority class before refusing with RESOURCE_EXHAUSTED;
    # 0 keeps the scheduler's defaults (256 interactive, 1024 normal, 4096 batch). With the
    # Redis task store it bounds each class's shared stream the same way.
    kernel_max_queued: int = 0
    # Host memory (MiB) that must stay free for the kernel to accept new work: below it,
    # Generate and Submit are refused with RESOURCE_EXHAUSTED / HOST_MEMORY_LOW. Free is
    # the hardware service's available minus reserved host memory, watched every second;
    # 0 turns the floor off, and without a hardware service nothing is gated.
    kernel_min_free_mb: int = 0
    # The pipeline policy, read by the kernel only (kernel/policy.py): the `[policy]` table
    # is every tenant's (which service stages run, which fail open, their timeout, which
    # are mandatory); a `[tenants.NAME]` table overrides fields of it for one tenant.
    policy: PolicyTable = dataclasses.field(default_factory=PolicyTable)
    tenants: Mapping[str, PolicyTable] = dataclasses.field(default_factory=dict)
    # What answers Generate in the runtime: "model" (the default model, loaded at start) or
    # "echo" (no model: streams the prompt back, for tests and benchmarks of everything
    # around the model; services/runtime/echo.py).
    runtime_engine: str = "model"
    # Requests a runtime queues per model before refusing with RESOURCE_EXHAUSTED.
    runtime_max_queued: int = 64
    # Sequences a runtime decodes together in one step (its continuous batch).
    runtime_max_batch: int = 32
    # When the batch is full, the next free place goes to the waiting request of the
    # highest priority class (the kernel's); a waiting request rises one class per this
    # many seconds, so batch work never starves.
    runtime_aging_s: float = 5.0
    # Generated tokens a stream may hold unread (its reader is slow) before its sequence
    # leaves the batch until the reader has taken half of them (flow control).
    runtime_stream_buffer: int = 64
    # KV-cache memory a runtime's running sequences may reserve, per model (MiB).
    runtime_kv_budget_mb: int = 1024
    # The KV cache's host memory is reserved at the hardware service in steps of this many
    # MiB (or less, when that is all that is free), ahead of the batch that needs it.
    runtime_kv_reserve_step_mb: int = 64
    # How the runtime holds model weights: "float32" (exactly Hugging Face's outputs) or
    # "int8" (dynamic int8 Linear layers: 2-3x faster decoding on CPU, not bit-identical;
    # services/runtime/weights.py).
    runtime_weights: str = "float32"
    # The at-rest keys of the kernel's task store and the privacy service's vault and
    # operators (services/keyring.py): `privacy_key` is "id:base64[,id:base64]" (the last
    # active), else the key file (JSON, mode 0600; empty means <data_dir>/privacy/keys.json,
    # created with a fresh key on first start; move it out of the data directory).
    privacy_key: str = ""
    privacy_key_file: str = ""
    # Stored values per second the kernel (and vault entries the privacy service) move onto
    # a new key after `llmos keys rotate`; 0 leaves re-wrapping off until a restart with a
    # rate (e.g. to run it off-peak).
    key_rewrap_rate: int = 1000
    # Compute threads the runtime may use; 0 lets torch decide.
    torch_threads: int = 0
    log_level: str = "info"
    # "json", "text", or "auto" (text on a terminal, JSON otherwise).
    log_format: str = "auto"
    # Prometheus /metrics over HTTP on `host`. The kernel's port; every other process adds
    # the same offset as to its gRPC port (kernel/stack.py). 0 = each gRPC port + 1000
    # (51051, 51052, ...); -1 = no metrics endpoint.
    metrics_port: int = 0
    # How long a service waits for in-flight calls when told to stop.
    shutdown_grace_s: float = 5.0
    # Registration lease with the kernel; services renew at a third of it.
    lease_s: int = 15
    # `llmos up`: restart intensity (at most N restarts within T seconds, then give up)
    max_restarts: int = 5
    restart_window_s: float = 60.0
    # `llmos up`: how long a process may take to report SERVING.
    ready_timeout_s: float = 180.0
    # `llmos status`: the kinds of service that must be registered and healthy.
    expected_services: tuple[str, ...] = ("runtime", "safety", "privacy", "explain", "hardware")
    # Retention (kernel/retention.py): how often the kernel deletes finished tasks past
    # their tenant's `retention`, and the most it examines per sweep (bounded work).
    kernel_retention_sweep_s: float = 60.0
    kernel_retention_batch: int = 500
    # Plugins (kernel/plugins.py): which installed plugins (entry-point group `llmos`) load,
    # by manifest, entry-point or distribution name. `load_plugins` is an allow list ("*":
    # all; empty: none), `disabled_plugins` a deny list that wins over it.
    load_plugins: tuple[str, ...] = ("*",)
    disabled_plugins: tuple[str, ...] = ()
    # A plugin host that crashes (or hangs past its timeout) this many times within
    # plugin_crash_window_s is disabled until an operator enables it again.
    plugin_max_crashes: int = 3
    plugin_crash_window_s: float = 60.0
    # Who may invoke which tool: "TENANT:PLUGIN.TOOL" patterns (shell wildcards), e.g.
    # "acme:faq.search" or "*:faq.*". Empty: no tenant may invoke any tool.
    tool_grants: tuple[str, ...] = ()

    @property
    def kernel_target(self) -> str:
        return self.kernel_address or f"{self.host}:{self.port}"

    def advertised(self, port: int) -> str:
        """The address this process registers under for `port`."""
        return f"{self.advertise_host or self.host}:{port}"

    def metrics_port_for(self, grpc_port: int) -> int | None:
        """The /metrics port of the process serving gRPC on `grpc_port`; None when off.

        One rule for every process, so `llmos status`, the compose file and a Prometheus
        config can all say where a process's metrics are without asking it.
        """
        if self.metrics_port == METRICS_OFF:
            return None
        if self.metrics_port < METRICS_OFF:
            raise InvalidArgument(
                f"metrics_port is {self.metrics_port}; use a port, 0 (gRPC port + "
                f"{METRICS_PORT_OFFSET}) or {METRICS_OFF} (off)",
                reason="BAD_SETTING",
            )
        if self.metrics_port == 0:
            port = grpc_port + METRICS_PORT_OFFSET
        else:
            port = self.metrics_port + (grpc_port - self.port)
        if not 0 < port < 65536:
            raise InvalidArgument(
                f"the metrics port for gRPC port {grpc_port} would be {port}, outside "
                "1-65535; set metrics_port to a lower base, or -1 to turn metrics off",
                reason="BAD_SETTING",
            )
        return port

    def describe(self) -> dict[str, Any]:
        """The effective settings, secrets masked, for the start-up log line."""
        shown: dict[str, Any] = {}
        for name, value in dataclasses.asdict(self).items():
            # Only text can be a secret: `key_rewrap_rate` is a number, not a key.
            secret = (
                isinstance(value, str)
                and value
                and any(marker in name.split("_") for marker in SECRET_MARKERS)
            )
            if secret:
                shown[name] = "***"
            elif isinstance(value, str) and "://" in value and "@" in value:
                # A URL with credentials (redis://user:password@host): keep the host.
                scheme, rest = value.split("://", 1)
                shown[name] = f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
            else:
                shown[name] = value
        return shown


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
# Settings that were removed, and what replaced them: refused by name wherever they are set
# (the environment included, which otherwise ignores names it does not know), so an old
# script fails at start instead of silently getting the default.
REMOVED = {
    "kernel_stages": "the pipeline policy replaced it: [policy] stages (LLMOS_POLICY_STAGES), "
    "with mandatory (LLMOS_POLICY_MANDATORY) empty too to run no stage; see the operator "
    'guide, "Tenant policy"',
}


def _bad(key: str, expected: str, raw: Any) -> InvalidArgument:
    return InvalidArgument(f"setting {key!r} must be {expected}, got {raw!r}", reason="BAD_SETTING")


def _names(key: str, raw: Any) -> tuple[str, ...]:
    """A list of stage names: a TOML array of strings, or a comma-separated string (the
    environment's form, also accepted in TOML like every other list setting)."""
    if isinstance(raw, str):
        items = raw.split(",")
    elif isinstance(raw, list | tuple) and all(isinstance(item, str) for item in raw):
        items = list(raw)
    else:
        raise _bad(key, "a list of stage names", raw)
    return tuple(item.strip() for item in items if item.strip())


def _seconds(key: str, raw: Any) -> float:
    if isinstance(raw, bool):  # float(True) == 1.0 would hide the mistake
        raise _bad(key, "a number of seconds above 0", raw)
    try:
        value = float(raw)
    except (TypeError, ValueError) as exc:
        raise _bad(key, "a number of seconds above 0", raw) from exc
    if not (value > 0 and math.isfinite(value)):
        raise _bad(key, "a number of seconds above 0", raw)
    return value


def _policy_table(key: str, raw: Any, *, tenant: bool) -> PolicyTable:
    """One `[policy]` or `[tenants.NAME]` table, every field typed; `key` names it in errors."""
    if isinstance(raw, PolicyTable):
        return raw
    if not isinstance(raw, Mapping):
        raise _bad(key, f"a table of {', '.join(POLICY_FIELDS)}", raw)
    unknown = sorted(set(raw) - set(POLICY_FIELDS))
    if unknown:
        raise InvalidArgument(
            f"setting {key!r} has unknown fields {[f'{key}.{name}' for name in unknown]}; "
            f"known: {', '.join(POLICY_FIELDS)}",
            reason="BAD_SETTING",
        )
    if tenant and "mandatory" in raw:
        raise InvalidArgument(
            f"setting '{key}.mandatory': mandatory stages are set once for every tenant, in "
            "[policy]; a tenant table cannot change them",
            reason="BAD_SETTING",
        )
    fields: dict[str, Any] = {}
    for name, value in raw.items():
        where = f"{key}.{name}"
        if name == "timeout_s":
            fields[name] = _seconds(where, value)
        elif name == "privacy":
            fields[name] = _privacy_mode(where, value)
        elif name == "privacy_entities":
            fields[name] = _privacy_entities(where, value)
        elif name == "retention":
            fields[name] = _retention(where, value)
        else:
            fields[name] = _names(where, value)
    return PolicyTable(**fields)


RETENTION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
RETENTION_KEEP = ("keep", "forever")


def _retention(key: str, raw: Any) -> float:
    """Seconds to keep finished tasks (0: forever), from "30d", "12h", "90m", "45s", "1w",
    a number of seconds, or "keep"."""
    expected = 'a duration like "30d", "12h", "90m" or "45s", a number of seconds, or "keep"'
    if isinstance(raw, bool):
        raise _bad(key, expected, raw)
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in RETENTION_KEEP:
            return 0.0
        unit = RETENTION_UNITS.get(text[-1:])
        number = text[:-1] if unit is not None else text
        try:
            value = float(number) * (unit or 1)
        except ValueError as exc:
            raise _bad(key, expected, raw) from exc
    elif isinstance(raw, int | float):
        value = float(raw)
    else:
        raise _bad(key, expected, raw)
    if not (value >= 0 and math.isfinite(value)):
        raise _bad(key, expected + " (not negative)", raw)
    return value


def _privacy_mode(key: str, raw: Any) -> str:
    """One of PRIVACY_MODES: a misspelt mode must not quietly send PII to the model."""
    if not isinstance(raw, str) or raw.strip() not in PRIVACY_MODES:
        raise _bad(key, f"one of {', '.join(PRIVACY_MODES)}", raw)
    return raw.strip()


def _privacy_entities(key: str, raw: Any) -> tuple[str, ...]:
    """Known, distinct entity types, at least one: a misspelt type must not quietly let
    that PII through, and redacting nothing is said with `privacy = "off"`."""
    expected = f"a list of entity types among {', '.join(PRIVACY_ENTITY_TYPES)}"
    if isinstance(raw, str):
        items = [item.strip() for item in raw.split(",") if item.strip()]
    elif isinstance(raw, list | tuple) and all(isinstance(item, str) for item in raw):
        items = [item.strip() for item in raw]
    else:
        raise _bad(key, expected, raw)
    unknown = [item for item in items if item not in PRIVACY_ENTITY_TYPES]
    if unknown:
        raise InvalidArgument(
            f"setting {key!r} names unknown entity type {unknown[0]!r}; known: "
            f"{', '.join(PRIVACY_ENTITY_TYPES)}",
            reason="BAD_SETTING",
        )
    if not items:
        raise InvalidArgument(
            f'setting {key!r} is empty; to redact nothing say privacy = "off"',
            reason="BAD_SETTING",
        )
    if len(set(items)) != len(items):
        raise _bad(key, expected + ", each once", raw)
    return tuple(kind for kind in PRIVACY_ENTITY_TYPES if kind in items)


def _tenant_tables(raw: Any) -> dict[str, PolicyTable]:
    if not isinstance(raw, Mapping):
        raise _bad("tenants", "a table of [tenants.NAME] tables", raw)
    tables: dict[str, PolicyTable] = {}
    for name, table in raw.items():
        if not str(name).strip():
            raise InvalidArgument(
                "setting 'tenants' has a table for an empty tenant name; requests without "
                "a tenant belong to the tenant 'default': use [tenants.default]",
                reason="BAD_SETTING",
            )
        tables[str(name)] = _policy_table(f"tenants.{name}", table, tenant=True)
    return tables


def _coerce(name: str, raw: Any) -> Any:
    """Turn a TOML value or environment string into the field's type, or say what is wrong."""
    if name == "policy":
        return _policy_table("policy", raw, tenant=False)
    if name == "tenants":
        return _tenant_tables(raw)
    field_type = str(FIELDS[name].type)
    try:
        # TOML gives bools and floats typed; int(True) == 1 and int(5.5) == 5 would hide
        # a mistake, so refuse them rather than convert.
        if field_type in ("int", "float") and isinstance(raw, bool):
            raise TypeError(raw)
        if field_type == "int":
            if isinstance(raw, float):
                raise TypeError(raw)
            return int(raw)
        if field_type == "float":
            return float(raw)
        if field_type.startswith("tuple"):
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            return tuple(str(item).strip() for item in items if str(item).strip())
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(
            f"setting {name!r} must be {field_type}, got {raw!r}", reason="BAD_SETTING"
        ) from exc


def _from_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgument(f"config file {path}: {exc}", reason="BAD_SETTING") from exc
    removed = sorted(set(data) & set(REMOVED))
    if removed:
        raise InvalidArgument(
            f"config file {path}: {removed[0]!r} is no longer read: {REMOVED[removed[0]]}",
            reason="BAD_SETTING",
        )
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise InvalidArgument(
            f"config file {path}: unknown settings {unknown}; known: {sorted(FIELDS)}",
            reason="BAD_SETTING",
        )
    return data


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Settings:
    """Build the effective settings. `overrides` with value None are ignored (unset flags)."""
    env = os.environ if env is None else env
    for name, instead in REMOVED.items():
        if ENV_PREFIX + name.upper() in env:
            raise InvalidArgument(
                f"{ENV_PREFIX}{name.upper()} is no longer read: {instead}", reason="BAD_SETTING"
            )
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(flags) - set(FIELDS))
    if unknown:
        raise InvalidArgument(f"unknown settings {unknown}", reason="BAD_SETTING")
    from_env = {
        name: env[ENV_PREFIX + name.upper()]
        for name in FIELDS
        if name not in TABLES and ENV_PREFIX + name.upper() in env
    }
    data_dir = flags.get("data_dir") or from_env.get("data_dir") or default_data_dir(env)
    file_name = config_file or env.get(ENV_PREFIX + "CONFIG")
    path = Path(file_name) if file_name else Path(data_dir) / "llmos.toml"
    from_file = _from_file(path) if file_name or path.is_file() else {}
    merged = {**from_file, **from_env, **flags}
    # LLMOS_POLICY_<FIELD> overrides that field of the file's [policy] table, not the table.
    policy_env = {
        field: env[f"{ENV_PREFIX}POLICY_{field.upper()}"]
        for field in POLICY_FIELDS
        if f"{ENV_PREFIX}POLICY_{field.upper()}" in env
    }
    if policy_env and "policy" not in flags:
        table = from_file.get("policy", {})
        merged["policy"] = {**table, **policy_env} if isinstance(table, Mapping) else table
    return Settings(**{name: _coerce(name, value) for name, value in merged.items()})
