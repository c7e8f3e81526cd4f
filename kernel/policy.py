"""Pipeline policy: which service stages a tenant's requests run through, and which may fail open.

The request path is admit → plugins:before → safety:input → privacy:redact →
runtime:generate → safety:output → privacy:restore → plugins:after → record. The kernel's
own steps (admit, runtime:generate, record) always run; the six others are the *service
stages* a policy chooses from (kernel/stages.py runs them). The rules, which
docs/operator-guide.md "Tenant policy" repeats for operators:

- A tenant's policy is its `[tenants.NAME]` table if it has one, else `[policy]`, the
  default. A tenant table sets any of `stages`, `fail_open`, `timeout_s`; what it leaves
  out comes from `[policy]`, and what `[policy]` leaves out from the built-in default:
  every stage, none fail-open, 5 s, `safety:input` and `safety:output` mandatory.
- `stages` says which stages run; their order is always the pipeline's. A stage left out
  is not called and writes no trace step; the `admit` step's evidence `policy` names the
  policy that chose the list, so a trace still says why a stage is missing.
- `fail_open` stages let the request through when their service is down (not registered,
  not serving, UNAVAILABLE, DEADLINE_EXCEEDED), traced "failed_open" with the policy in
  the evidence; every other stage fails closed (the task fails, UNAVAILABLE /
  STAGE_UNAVAILABLE). A service that answers UNIMPLEMENTED has not built the stage yet:
  "not_available", and the request goes on, whatever the policy. Every fail_open stage
  must be one the policy runs.
- `mandatory` (in `[policy]` only) names the stages no tenant table may leave out; each
  must be in `[policy].stages` too. Only the operator, by editing `[policy].mandatory`,
  makes a stage optional. Mandatory means "always runs", not "fails closed": a tenant's
  policy may make a mandatory stage fail-open, and the trace then says "failed_open".
  Plugins (the plugins work item) will add stages, never remove one.
- `privacy` (`off` | `mask` | `pseudonymize`, default `pseudonymize`) is what
  `privacy:redact` does to the PII it finds before the model sees the prompt:
  typed placeholders restored in the output on its way to the client (`pseudonymize`),
  an irreversible mask (`mask`: the client sees the mask wherever the model repeats it),
  or nothing (`off`: both privacy stages are traced "skipped"). The default protects:
  PII reaches the model only where a policy says so.
- `privacy_entities` names the entity types `privacy:redact` takes out. The default is
  every type the service detects but LOCATION: a place on its own ("the capital of
  France", "weather in Boston") is rarely personal and is often the question itself, so
  hiding it makes the model answer a different question; what makes a place personal -
  a name, an email, a phone number - is still redacted. A tenant that must hide places
  lists LOCATION too.
- `retention` is how long the tenant's finished tasks (with their events, traces and
  subject index) are kept, counted from when each was created; 0, the default, keeps
  them. The kernel's sweeper (kernel/retention.py) deletes the expired ones; a queued or
  running task is never expired, however old.
- `plugins:before` and `plugins:after` call the enabled plugins (kernel/plugins.py); a
  plugin that crashes, hangs or answers garbage counts as a down service: fail closed
  unless the stage is in `fail_open`. With no plugin to call they are traced "skipped".

A bad policy stops the kernel at start with BAD_SETTING naming the key
(`tenants.acme.stages`): a misspelt stage would otherwise be silently skipped. This module
is pure logic; the loader (services/config.py) has already checked shapes and types.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from llmos.services.config import PRIVACY_ENTITY_TYPES, PolicyTable, Settings
from llmos.services.errors import InvalidArgument

# The service stages, in pipeline order, on either side of runtime:generate.
BEFORE_MODEL = ("plugins:before", "safety:input", "privacy:redact")
AFTER_MODEL = ("safety:output", "privacy:restore", "plugins:after")
STAGES = BEFORE_MODEL + AFTER_MODEL
SAFETY = ("safety:input", "safety:output")
# The kernel's own steps: always run, never named in a policy.
KERNEL_STEPS = ("admit", "runtime:generate", "record")

DEFAULT_MANDATORY = SAFETY
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_POLICY = "default"
DEFAULT_PRIVACY = "pseudonymize"
# Every type but LOCATION (the module docstring says why).
DEFAULT_PRIVACY_ENTITIES = tuple(kind for kind in PRIVACY_ENTITY_TYPES if kind != "LOCATION")


@dataclasses.dataclass(frozen=True)
class TenantPolicy:
    """What one tenant's requests run through. Frozen and hashable, so the stage objects
    built for it are built once (kernel/stages.py `for_policy`)."""

    # How traces and logs name it: "default" for [policy], "tenant:NAME" for a tenant table.
    name: str
    # The service stages that run, in pipeline order.
    stages: tuple[str, ...] = STAGES
    fail_open: frozenset[str] = frozenset()
    timeout_s: float = DEFAULT_TIMEOUT_S
    # What privacy:redact does with PII: "pseudonymize", "mask" or "off".
    privacy: str = DEFAULT_PRIVACY
    # The entity types privacy:redact takes out, in PRIVACY_ENTITY_TYPES order.
    privacy_entities: tuple[str, ...] = DEFAULT_PRIVACY_ENTITIES
    # Seconds the tenant's finished tasks are kept after they were created; 0: forever.
    retention_s: float = 0.0

    @property
    def before_model(self) -> tuple[str, ...]:
        return tuple(name for name in self.stages if name in BEFORE_MODEL)

    @property
    def after_model(self) -> tuple[str, ...]:
        return tuple(name for name in self.stages if name in AFTER_MODEL)

    @property
    def unchecked(self) -> tuple[str, ...]:
        """The safety stages it leaves out: worth a warning at start."""
        return tuple(name for name in SAFETY if name not in self.stages)

    def describe(self) -> str:
        """One line for the kernel's start-up log."""
        stages = ", ".join(
            f"{name} (fail-open)" if name in self.fail_open else name for name in self.stages
        )
        return (
            f"{self.name}: {stages or 'no service stages'}; timeout {self.timeout_s:g}s; "
            f"privacy {self.privacy}"
            + (f" ({', '.join(self.privacy_entities)})" if self.privacy != "off" else "")
            + (f"; tasks kept {self.retention_s:g}s" if self.retention_s else "")
        )


@dataclasses.dataclass(frozen=True)
class Policies:
    """The default policy, the tenants that have their own, and the mandatory stages."""

    default: TenantPolicy = TenantPolicy(DEFAULT_POLICY)
    tenants: Mapping[str, TenantPolicy] = dataclasses.field(default_factory=dict)
    mandatory: frozenset[str] = frozenset(DEFAULT_MANDATORY)

    def for_tenant(self, tenant: str) -> TenantPolicy:
        return self.tenants.get(tenant, self.default)

    @classmethod
    def from_settings(cls, settings: Settings) -> Policies:
        """Build and check every policy; raise BAD_SETTING naming the key at fault."""
        table = settings.policy
        default = _policy(DEFAULT_POLICY, "policy", table, TenantPolicy(DEFAULT_POLICY))
        mandatory = _stage_list(
            "policy.mandatory", DEFAULT_MANDATORY if table.mandatory is None else table.mandatory
        )
        missing = [name for name in mandatory if name not in default.stages]
        if missing:
            raise InvalidArgument(
                f"setting 'policy.mandatory' names {missing}, which 'policy.stages' leaves "
                "out; a stage that does not run cannot be mandatory: leave it out of "
                "'policy.mandatory' too",
                reason="BAD_SETTING",
            )
        tenants = {
            tenant: _policy(f"tenant:{tenant}", f"tenants.{tenant}", override, default)
            for tenant, override in settings.tenants.items()
        }
        for tenant, policy in tenants.items():
            left_out = [name for name in mandatory if name not in policy.stages]
            if left_out:
                raise InvalidArgument(
                    f"setting 'tenants.{tenant}.stages' leaves out {left_out}, which "
                    "'policy.mandatory' makes mandatory for every tenant; a tenant may make "
                    "them fail-open instead (fail_open), or the operator may drop them "
                    "from policy.mandatory",
                    reason="BAD_SETTING",
                )
        return cls(default, tenants, frozenset(mandatory))

    def all(self) -> tuple[TenantPolicy, ...]:
        """Every policy, the default first, for the start-up log."""
        return (self.default, *(self.tenants[tenant] for tenant in sorted(self.tenants)))


def _policy(name: str, key: str, table: PolicyTable, inherited: TenantPolicy) -> TenantPolicy:
    """The policy `name`: `table`'s fields over `inherited`'s; `key` names the table."""
    stages = inherited.stages
    if table.stages is not None:
        stages = _stage_list(f"{key}.stages", table.stages)
    if table.fail_open is None:  # inherited: moot for the stages this table leaves out
        fail_open = inherited.fail_open.intersection(stages)
    else:
        fail_open = frozenset(_stage_list(f"{key}.fail_open", table.fail_open))
    not_run = [stage for stage in STAGES if stage in fail_open and stage not in stages]
    if not_run:
        raise InvalidArgument(
            f"setting '{key}.fail_open' names {not_run}, which the policy does not run "
            f"(its stages: {', '.join(stages) or 'none'})",
            reason="BAD_SETTING",
        )
    return TenantPolicy(
        name=name,
        stages=stages,
        fail_open=fail_open,
        timeout_s=inherited.timeout_s if table.timeout_s is None else table.timeout_s,
        privacy=inherited.privacy if table.privacy is None else table.privacy,
        privacy_entities=(
            inherited.privacy_entities if table.privacy_entities is None else table.privacy_entities
        ),
        retention_s=inherited.retention_s if table.retention is None else table.retention,
    )


def _stage_list(key: str, names: Iterable[str]) -> tuple[str, ...]:
    """Known, distinct stage names, returned in pipeline order whatever order they came in."""
    seen: list[str] = []
    for name in names:
        if name in KERNEL_STEPS:
            raise InvalidArgument(
                f"setting {key!r} names {name!r}, which the kernel runs itself for every "
                f"request; a policy chooses among {', '.join(STAGES)}",
                reason="BAD_SETTING",
            )
        if name not in STAGES:
            raise InvalidArgument(
                f"setting {key!r} names unknown stage {name!r}; known: {', '.join(STAGES)}",
                reason="BAD_SETTING",
            )
        if name in seen:
            raise InvalidArgument(f"setting {key!r} names {name!r} twice", reason="BAD_SETTING")
        seen.append(name)
    return tuple(name for name in STAGES if name in seen)
