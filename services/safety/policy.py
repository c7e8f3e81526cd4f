"""Per-tenant safety policy: thresholds and an action per category, deny and allow lists,
versioned, changed at run time.

`PolicyBook` holds the default policy and each tenant's own; `set` validates a policy
from the wire (unknown category, threshold outside [0, 1], no action, a stale version:
refused naming what to fix) and stores it with the next version, "acme@4". Checks read
the book on every call, so a change takes effect on the next check, without a restart.
The book is saved as JSON under the data directory after each change (written to a
temporary file, then renamed), so a restarted service keeps its policies.

A tenant's rules override the default's for the categories they name; the others keep
the default's. Pure logic apart from `load` and `save`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

from llmos.services.errors import FailedPrecondition, InvalidArgument, NotFound
from llmos.services.safety.rules import Rule, phrase_rule
from llmos.services.safety.taxonomy import CATEGORIES
from llmos.v1 import safety_pb2

DEFAULT = "default"
# The default policy's operating point. The classifier's scores are calibrated (head.py,
# `calibrate`) so that 0.5 is, for each direction, the lowest raw threshold whose
# false-positive rate on the validation split's benign texts is within 2.5% (the 3% target
# less a margin; scripts/safety/train.py chose them, model/card.json records them and the
# curves). Benign users refused is the costlier error for a default; a tenant that wants
# more recall lowers its own thresholds, one that wants fewer refusals raises them.
DEFAULT_THRESHOLD = 0.5
ACTIONS = {
    "allow": safety_pb2.SAFETY_ACTION_ALLOW,
    "flag": safety_pb2.SAFETY_ACTION_FLAG,
    "block": safety_pb2.SAFETY_ACTION_BLOCK,
}
ACTION_NAMES = {value: name for name, value in ACTIONS.items()}
MAX_PHRASES = 1000


@dataclasses.dataclass(frozen=True)
class CategoryRule:
    category: str
    threshold: float
    action: safety_pb2.SafetyAction.ValueType


@dataclasses.dataclass(frozen=True)
class Policy:
    tenant: str
    version: str
    rules: tuple[CategoryRule, ...]
    deny: tuple[tuple[str, str], ...] = ()  # (phrase, category)
    allow: tuple[str, ...] = ()

    def decide(self, category: str, score: float) -> safety_pb2.SafetyAction.ValueType:
        """The strongest action among this category's rules whose threshold `score` reaches."""
        action = safety_pb2.SAFETY_ACTION_ALLOW
        for rule in self.rules:
            if rule.category == category and score >= rule.threshold:
                action = max(action, rule.action)
        return action

    def deny_rules(self) -> tuple[Rule, ...]:
        return tuple(
            phrase_rule(f"deny.{self.tenant}.{i}", category, phrase)
            for i, (phrase, category) in enumerate(self.deny)
        )

    def allow_rules(self) -> tuple[Rule, ...]:
        return tuple(
            phrase_rule(f"allow.{self.tenant}.{i}", "", phrase, score=0.0)
            for i, phrase in enumerate(self.allow)
        )

    def to_proto(self) -> safety_pb2.SafetyPolicy:
        return safety_pb2.SafetyPolicy(
            tenant=self.tenant,
            version=self.version,
            rules=[
                safety_pb2.CategoryRule(category=r.category, threshold=r.threshold, action=r.action)
                for r in self.rules
            ],
            deny=[safety_pb2.DenyPhrase(phrase=p, category=c) for p, c in self.deny],
            allow=list(self.allow),
        )


def default_policy() -> Policy:
    """Block every category at DEFAULT_THRESHOLD."""
    rules = tuple(
        CategoryRule(c, DEFAULT_THRESHOLD, safety_pb2.SAFETY_ACTION_BLOCK) for c in CATEGORIES
    )
    return Policy(DEFAULT, f"{DEFAULT}@0", rules)


def validate(proto: safety_pb2.SafetyPolicy) -> Policy:
    """A policy from the wire, checked; its version is left for the book to set."""
    tenant = proto.tenant.strip()
    if not tenant:
        raise InvalidArgument("a policy needs a tenant ('default' for the default policy)",
                              reason="BAD_POLICY")  # fmt: skip
    rules: list[CategoryRule] = []
    for index, rule in enumerate(proto.rules):
        where = {"tenant": tenant, "rule": str(index)}
        if rule.category not in CATEGORIES:
            raise InvalidArgument(
                f"rule {index} names unknown category {rule.category!r}; known: "
                f"{', '.join(CATEGORIES)}",
                reason="UNKNOWN_CATEGORY",
                metadata={**where, "category": rule.category},
            )
        if not 0.0 <= rule.threshold <= 1.0:
            raise InvalidArgument(
                f"rule {index} ({rule.category}) has threshold {rule.threshold:g}; thresholds "
                "are scores between 0 and 1",
                reason="BAD_THRESHOLD",
                metadata=where,
            )
        if rule.action not in ACTION_NAMES:
            raise InvalidArgument(
                f"rule {index} ({rule.category}) has no action: say allow, flag or block",
                reason="BAD_ACTION",
                metadata=where,
            )
        rules.append(CategoryRule(rule.category, float(rule.threshold), rule.action))
    if len(proto.deny) + len(proto.allow) > MAX_PHRASES:
        raise InvalidArgument(f"at most {MAX_PHRASES} deny and allow phrases per policy",
                              reason="BAD_POLICY")  # fmt: skip
    deny: list[tuple[str, str]] = []
    for index, entry in enumerate(proto.deny):
        if not entry.phrase.strip():
            raise InvalidArgument(f"deny phrase {index} is empty", reason="BAD_POLICY")
        if entry.category not in CATEGORIES:
            raise InvalidArgument(
                f"deny phrase {index} names unknown category {entry.category!r}; known: "
                f"{', '.join(CATEGORIES)}",
                reason="UNKNOWN_CATEGORY",
                metadata={"tenant": tenant, "category": entry.category},
            )
        deny.append((entry.phrase.strip(), entry.category))
    allow = [phrase.strip() for phrase in proto.allow]
    if any(not phrase for phrase in allow):
        raise InvalidArgument("an allow phrase is empty", reason="BAD_POLICY")
    return Policy(tenant, "", tuple(rules), tuple(deny), tuple(allow))


class PolicyBook:
    """The default policy and the tenants' own; thread-safe; saved to `path` if given."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._default = default_policy()
        self._tenants: dict[str, Policy] = {}
        self._serial: dict[str, int] = {}
        if path is not None and path.is_file():
            self._load(path)

    def effective(self, tenant: str) -> Policy:
        """What a check for `tenant` applies: its rules over the default's."""
        with self._lock:
            own = self._tenants.get(tenant)
            base = self._default
        if own is None:
            return base
        named = {rule.category for rule in own.rules}
        rules = own.rules + tuple(r for r in base.rules if r.category not in named)
        return dataclasses.replace(own, rules=rules, deny=base.deny + own.deny,
                                   allow=base.allow + own.allow)  # fmt: skip

    def get(self, tenant: str) -> Policy:
        with self._lock:
            if tenant in ("", DEFAULT):
                return self._default
            if tenant not in self._tenants:
                raise NotFound(
                    f"tenant {tenant!r} has no safety policy of its own; its checks use the "
                    "default policy (GetPolicy 'default'), and SetPolicy creates one",
                    reason="UNKNOWN_TENANT",
                    metadata={"tenant": tenant},
                )
            return self._tenants[tenant]

    def set(self, proto: safety_pb2.SafetyPolicy) -> Policy:
        policy = validate(proto)
        with self._lock:
            current = (
                self._default if policy.tenant == DEFAULT else self._tenants.get(policy.tenant)
            )
            if proto.version and (current is None or current.version != proto.version):
                raise FailedPrecondition(
                    f"policy version {proto.version!r} is not the current one "
                    f"({current.version if current else 'none'}); read it again and retry",
                    reason="POLICY_VERSION_MISMATCH",
                    metadata={"tenant": policy.tenant},
                )
            serial = self._serial.get(policy.tenant, 0) + 1
            self._serial[policy.tenant] = serial
            if policy.tenant == DEFAULT:  # the default must cover every category
                named = {rule.category for rule in policy.rules}
                keep = tuple(r for r in self._default.rules if r.category not in named)
                policy = dataclasses.replace(policy, rules=policy.rules + keep)
            policy = dataclasses.replace(policy, version=f"{policy.tenant}@{serial}")
            if policy.tenant == DEFAULT:
                self._default = policy
            else:
                self._tenants[policy.tenant] = policy
            self._save()
        return policy

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        policies = [self._default, *self._tenants.values()]
        document = {
            "serials": self._serial,
            "policies": [
                {
                    "tenant": p.tenant,
                    "version": p.version,
                    "rules": [[r.category, r.threshold, ACTION_NAMES[r.action]] for r in p.rules],
                    "deny": [list(d) for d in p.deny],
                    "allow": list(p.allow),
                }
                for p in policies
            ],
        }
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps(document, indent=1), encoding="utf-8")
        os.replace(partial, self.path)

    def _load(self, path: Path) -> None:
        document = json.loads(path.read_text(encoding="utf-8"))
        self._serial = {str(k): int(v) for k, v in document.get("serials", {}).items()}
        for item in document.get("policies", []):
            policy = Policy(
                tenant=item["tenant"],
                version=item["version"],
                rules=tuple(CategoryRule(c, float(t), ACTIONS[a]) for c, t, a in item["rules"]),
                deny=tuple((p, c) for p, c in item["deny"]),
                allow=tuple(item["allow"]),
            )
            if policy.tenant == DEFAULT:
                self._default = policy
            else:
                self._tenants[policy.tenant] = policy
