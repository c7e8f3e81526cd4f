"""Retention settings and the sweeper's scopes (pure logic: kernel/retention.py,
services/config.py `retention`, kernel/policy.py inheritance)."""

from __future__ import annotations

import pytest

from llmos.kernel.policy import Policies
from llmos.kernel.retention import Scope, scopes
from llmos.services.config import load_settings
from llmos.services.errors import InvalidArgument


def policies(policy: dict[str, object], tenants: dict[str, object] | None = None) -> Policies:
    settings = load_settings({"policy": policy, "tenants": tenants or {}}, env={})
    return Policies.from_settings(settings)


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("30d", 30 * 86400),
        ("12h", 12 * 3600),
        ("90m", 90 * 60),
        ("45s", 45),
        ("1w", 7 * 86400),
        ("1.5h", 5400),
        (" 2D ", 2 * 86400),
        ("keep", 0),
        ("forever", 0),
        (3600, 3600),
        (0.5, 0.5),
        (0, 0),
        ("600", 600),
    ],
)
def test_retention_is_read_as_seconds(written: object, seconds: float) -> None:
    assert policies({"retention": written}).default.retention_s == seconds


@pytest.mark.parametrize("written", ["30 days", "d", "-1d", -5, True, "nan", "inf", [1], ""])
def test_a_bad_retention_is_refused_naming_the_field(written: object) -> None:
    with pytest.raises(InvalidArgument) as caught:
        policies({}, {"acme": {"retention": written}})

    assert caught.value.reason == "BAD_SETTING"
    assert "tenants.acme.retention" in caught.value.message
    assert '"30d"' in caught.value.message


def test_retention_comes_from_the_environment_too() -> None:
    settings = load_settings({}, env={"LLMOS_POLICY_RETENTION": "2h"})

    assert Policies.from_settings(settings).default.retention_s == 7200


def test_by_default_nothing_expires() -> None:
    assert policies({}).default.retention_s == 0
    assert scopes(policies({})) == ()


def test_a_tenant_inherits_the_default_retention_or_sets_its_own() -> None:
    found = policies(
        {"retention": "30d"},
        {"short": {"retention": "1h"}, "forever": {"retention": "keep"}, "same": {}},
    )

    assert found.for_tenant("same").retention_s == 30 * 86400
    assert found.for_tenant("short").retention_s == 3600
    assert found.for_tenant("forever").retention_s == 0
    assert found.for_tenant("anyone").retention_s == 30 * 86400


def test_scopes_cover_each_tenant_with_a_retention_and_the_rest_by_default() -> None:
    found = scopes(
        policies(
            {"retention": "30d"},
            {"short": {"retention": "1h"}, "forever": {"retention": "keep"}, "same": {}},
        )
    )

    assert found == (
        # "same" inherits 30 days but is swept under its own name, like every tenant table.
        Scope("same", 30 * 86400),
        Scope("short", 3600),
        Scope(None, 30 * 86400, frozenset({"short", "forever", "same"})),
    )


def test_without_a_default_retention_only_the_tenants_that_set_one_are_swept() -> None:
    found = scopes(policies({}, {"short": {"retention": "10s"}, "other": {}}))

    assert found == (Scope("short", 10),)


def test_a_batch_outside_what_the_store_takes_is_refused_at_start() -> None:
    from llmos.kernel.retention import RetentionSweeper

    for batch in (0, 1001):
        with pytest.raises(InvalidArgument) as caught:
            RetentionSweeper(None, policies({}), batch=batch)  # type: ignore[arg-type]
        assert "kernel_retention_batch" in caught.value.message
