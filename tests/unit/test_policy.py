"""Pipeline policy: the [policy] and [tenants.NAME] tables, through the one loader, into
each tenant's stages; every bad input refused with BAD_SETTING naming the key at fault."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmos.kernel.policy import STAGES, Policies, TenantPolicy
from llmos.services.config import PRIVACY_ENTITY_TYPES, PolicyTable, Settings, load_settings
from llmos.services.errors import InvalidArgument


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An empty data directory, so no llmos.toml from the real home directory is read."""
    path = tmp_path / "data"
    path.mkdir()
    return path


def policies(data_dir: Path, toml: str, env: dict[str, str] | None = None) -> Policies:
    config = data_dir / "llmos.toml"
    config.write_text(toml, encoding="utf-8")
    settings = load_settings({"data_dir": str(data_dir)}, env=env or {})
    return Policies.from_settings(settings)


def refused(data_dir: Path, toml: str, env: dict[str, str] | None = None) -> str:
    """The BAD_SETTING message for a policy the loader or the kernel must refuse."""
    with pytest.raises(InvalidArgument) as caught:
        policies(data_dir, toml, env)
    assert caught.value.reason == "BAD_SETTING"
    return caught.value.message


def test_without_tables_every_tenant_runs_every_stage_failing_closed(data_dir: Path) -> None:
    built = policies(data_dir, "")

    assert built == Policies()
    acme = built.for_tenant("acme")
    assert acme is built.default
    assert acme.name == "default"
    assert (
        acme.stages
        == STAGES
        == (
            "plugins:before",
            "safety:input",
            "privacy:redact",
            "safety:output",
            "privacy:restore",
            "plugins:after",
        )
    )
    assert acme.fail_open == frozenset()
    assert acme.timeout_s == 5.0
    assert built.mandatory == {"safety:input", "safety:output"}


def test_a_tenant_table_overrides_the_default_field_by_field(data_dir: Path) -> None:
    built = policies(
        data_dir,
        """
        [policy]
        stages = ["safety:input", "privacy:redact", "safety:output", "privacy:restore"]
        timeout_s = 2

        [tenants.acme]
        fail_open = ["safety:output", "safety:input"]

        [tenants.internal]
        stages = ["safety:output", "safety:input"]
        timeout_s = 0.5
        """,
    )

    assert built.default.stages == (
        "safety:input",
        "privacy:redact",
        "safety:output",
        "privacy:restore",
    )
    acme = built.for_tenant("acme")
    assert acme.name == "tenant:acme"
    assert acme.stages == built.default.stages  # inherited
    assert acme.fail_open == {"safety:input", "safety:output"}
    assert acme.timeout_s == 2.0  # inherited, and typed
    internal = built.for_tenant("internal")
    # Any order in, pipeline order out: the order is the pipeline's, not the policy's.
    assert internal.stages == ("safety:input", "safety:output")
    assert (internal.before_model, internal.after_model) == (("safety:input",), ("safety:output",))
    assert internal.timeout_s == 0.5
    assert built.for_tenant("someone-else") is built.default


def test_an_inherited_fail_open_covers_only_the_stages_a_tenant_runs(data_dir: Path) -> None:
    built = policies(
        data_dir,
        """
        [policy]
        fail_open = ["privacy:redact", "safety:input"]
        [tenants.lean]
        stages = ["safety:input", "safety:output"]
        """,
    )

    assert built.default.fail_open == {"privacy:redact", "safety:input"}
    assert built.for_tenant("lean").fail_open == {"safety:input"}


def test_the_operator_may_turn_every_stage_off_by_dropping_mandatory_too(data_dir: Path) -> None:
    """How bench/kernel.py measures the kernel without stages: one mechanism, the policy."""
    from_file = policies(data_dir, "[policy]\nstages = []\nmandatory = []\n")
    from_env = policies(data_dir, "", env={"LLMOS_POLICY_STAGES": "", "LLMOS_POLICY_MANDATORY": ""})

    for built in (from_file, from_env):
        assert built.default.stages == ()
        assert built.default.unchecked == ("safety:input", "safety:output")
        assert built.mandatory == frozenset()


def test_environment_overrides_fields_of_the_file_policy_table(data_dir: Path) -> None:
    built = policies(
        data_dir,
        '[policy]\nfail_open = ["safety:input"]\ntimeout_s = 3.0\n',
        env={"LLMOS_POLICY_TIMEOUT_S": "1.5", "LLMOS_POLICY_STAGES": "safety:input, safety:output"},
    )

    assert built.default.stages == ("safety:input", "safety:output")
    assert built.default.fail_open == {"safety:input"}  # from the file, kept
    assert built.default.timeout_s == 1.5


def test_a_tenant_may_make_a_mandatory_stage_fail_open(data_dir: Path) -> None:
    """Mandatory means "always runs", not "fails closed"."""
    built = policies(data_dir, '[tenants.acme]\nfail_open = ["safety:input", "safety:output"]\n')

    assert {"safety:input", "safety:output"} <= built.mandatory
    assert built.for_tenant("acme").fail_open == {"safety:input", "safety:output"}


def test_an_optional_stage_may_be_left_out_by_a_tenant(data_dir: Path) -> None:
    built = policies(data_dir, '[tenants.acme]\nstages = ["safety:input", "safety:output"]\n')

    assert built.for_tenant("acme").stages == ("safety:input", "safety:output")


def test_a_tenant_named_default_is_the_tenant_of_requests_without_one(data_dir: Path) -> None:
    built = policies(data_dir, '[tenants.default]\nfail_open = ["safety:input"]\n')

    assert built.for_tenant("default").name == "tenant:default"
    assert built.default.fail_open == frozenset()


def test_flags_may_pass_policy_tables_as_objects() -> None:
    settings = load_settings(
        {
            "data_dir": "/nonexistent-llmos",
            "policy": PolicyTable(stages=("safety:input", "safety:output")),
            "tenants": {"acme": {"fail_open": ["safety:input"]}},
        },
        env={},
    )
    built = Policies.from_settings(settings)

    assert built.for_tenant("acme").stages == ("safety:input", "safety:output")
    assert built.for_tenant("acme").fail_open == {"safety:input"}


def test_settings_describe_shows_the_tables() -> None:
    shown = Settings(data_dir="/d", tenants={"acme": PolicyTable(timeout_s=1.0)}).describe()

    assert shown["policy"]["stages"] is None  # not set: the kernel's default
    assert shown["tenants"]["acme"]["timeout_s"] == 1.0


def test_policies_describe_one_line_each_default_first(data_dir: Path) -> None:
    built = policies(
        data_dir,
        '[tenants.zed]\nstages = ["safety:input", "safety:output"]\n'
        'fail_open = ["safety:output"]\n[tenants.acme]\ntimeout_s = 1\n',
    )

    assert [policy.name for policy in built.all()] == ["default", "tenant:acme", "tenant:zed"]
    assert built.for_tenant("zed").describe() == (
        "tenant:zed: safety:input, safety:output (fail-open); timeout 5s; privacy pseudonymize "
        "(EMAIL_ADDRESS, PHONE_NUMBER, CREDIT_CARD, IBAN_CODE, IP_ADDRESS, US_SSN, PERSON)"
    )
    assert TenantPolicy("x", stages=(), privacy="off").describe() == (
        "x: no service stages; timeout 5s; privacy off"
    )


def test_privacy_defaults_to_pseudonymize_and_a_tenant_table_overrides_it(
    data_dir: Path,
) -> None:
    built = policies(
        data_dir, '[policy]\nprivacy = "mask"\n[tenants.open]\nprivacy = "off"\n[tenants.b]\n'
    )
    assert policies(data_dir, "").default.privacy == "pseudonymize"
    assert built.default.privacy == "mask"
    assert built.for_tenant("open").privacy == "off"
    assert built.for_tenant("b").privacy == "mask"  # inherited from [policy]


def test_privacy_entities_default_to_every_type_but_location_and_a_tenant_overrides_them(
    data_dir: Path,
) -> None:
    """A place on its own is the question more often than personal data ("the capital of
    France"): the default leaves LOCATION to the model and redacts every other type."""
    default = policies(data_dir, "").default.privacy_entities
    assert "LOCATION" not in default
    assert set(default) == set(PRIVACY_ENTITY_TYPES) - {"LOCATION"}
    built = policies(
        data_dir,
        '[policy]\nprivacy_entities = ["PERSON", "EMAIL_ADDRESS"]\n'
        '[tenants.strict]\nprivacy_entities = "LOCATION, PERSON"\n[tenants.b]\n',
    )
    assert built.default.privacy_entities == ("EMAIL_ADDRESS", "PERSON")  # in a fixed order
    assert built.for_tenant("strict").privacy_entities == ("PERSON", "LOCATION")
    assert built.for_tenant("b").privacy_entities == ("EMAIL_ADDRESS", "PERSON")  # inherited


def test_the_loaders_entity_types_are_the_privacy_services() -> None:
    from llmos.services.privacy.recognizers import ENTITY_TYPES

    assert set(PRIVACY_ENTITY_TYPES) == set(ENTITY_TYPES)


# Each bad input, and the key its message must name.
BAD = [
    # unknown stage names, wherever a stage list is read
    ('[policy]\nstages = ["safety:inputs"]\n', ["'policy.stages'", "'safety:inputs'"]),
    ('[policy]\nfail_open = ["safety"]\n', ["'policy.fail_open'", "'safety'"]),
    ('[policy]\nmandatory = ["plugins"]\n', ["'policy.mandatory'", "'plugins'"]),
    ('[tenants.acme]\nstages = ["Safety:Input"]\n', ["'tenants.acme.stages'", "'Safety:Input'"]),
    ('[tenants.acme]\nfail_open = ["safety:inputt"]\n', ["'tenants.acme.fail_open'"]),
    # the kernel's own steps are not a policy's to choose
    ('[policy]\nstages = ["runtime:generate"]\n', ["'policy.stages'", "runs itself"]),
    ('[tenants.acme]\nstages = ["admit", "safety:input"]\n', ["'tenants.acme.stages'", "'admit'"]),
    # a stage named twice
    ('[policy]\nstages = ["safety:input", "safety:input"]\n', ["'policy.stages'", "twice"]),
    # unknown fields
    ("[policy]\nstage = []\n", ["'policy.stage'", "known: stages"]),
    ("[tenants.acme]\nfailopen = []\n", ["'tenants.acme.failopen'"]),
    # wrong types
    ("[policy]\nstages = 5\n", ["'policy.stages'", "list of stage names"]),
    ('[policy]\nstages = ["safety:input", 3]\n', ["'policy.stages'"]),
    ("[tenants.acme]\nfail_open = true\n", ["'tenants.acme.fail_open'"]),
    ('[policy]\ntimeout_s = "fast"\n', ["'policy.timeout_s'", "seconds"]),
    ("[policy]\ntimeout_s = true\n", ["'policy.timeout_s'"]),
    ("[tenants.acme]\ntimeout_s = 0\n", ["'tenants.acme.timeout_s'", "above 0"]),
    ("[tenants.acme]\ntimeout_s = -1.5\n", ["'tenants.acme.timeout_s'"]),
    ("[tenants.acme]\ntimeout_s = nan\n", ["'tenants.acme.timeout_s'"]),
    ("[tenants.acme]\ntimeout_s = inf\n", ["'tenants.acme.timeout_s'"]),
    ('policy = "all"\n', ["'policy'", "table"]),
    ("tenants = 5\n", ["'tenants'", "table"]),
    ("[tenants]\nacme = 5\n", ["'tenants.acme'", "table"]),
    ('[tenants.""]\nstages = []\n', ["'tenants'", "empty tenant name"]),
    # privacy modes
    ('[tenants.acme]\nprivacy = "redact"\n', ["'tenants.acme.privacy'", "pseudonymize"]),
    ("[policy]\nprivacy = true\n", ["'policy.privacy'", "one of off, mask"]),
    # privacy entity types
    (
        '[tenants.acme]\nprivacy_entities = ["EMAIL"]\n',
        ["'tenants.acme.privacy_entities'", "'EMAIL'", "EMAIL_ADDRESS"],
    ),
    ("[policy]\nprivacy_entities = []\n", ["'policy.privacy_entities'", "off"]),
    ("[policy]\nprivacy_entities = 3\n", ["'policy.privacy_entities'", "entity types"]),
    ('[policy]\nprivacy_entities = ["PERSON", "PERSON"]\n', ["'policy.privacy_entities'"]),
    # mandatory is the operator's, in [policy] only
    ("[tenants.acme]\nmandatory = []\n", ["'tenants.acme.mandatory'", "[policy]"]),
    # a tenant cannot leave a mandatory stage out
    (
        '[tenants.acme]\nstages = ["safety:input", "privacy:redact"]\n',
        ["'tenants.acme.stages'", "safety:output", "mandatory"],
    ),
    ("[tenants.acme]\nstages = []\n", ["'tenants.acme.stages'", "safety:input"]),
    # a mandatory stage must run by default
    ("[policy]\nstages = []\n", ["'policy.mandatory'", "'policy.stages'"]),
    # fail_open only for stages the policy runs
    (
        '[policy]\nstages = ["safety:input", "safety:output"]\nfail_open = ["privacy:redact"]\n',
        ["'policy.fail_open'", "privacy:redact"],
    ),
    (
        '[tenants.acme]\nstages = ["safety:input", "safety:output"]\n'
        'fail_open = ["privacy:restore"]\n',
        ["'tenants.acme.fail_open'", "privacy:restore"],
    ),
]


@pytest.mark.parametrize(("toml", "named"), BAD)
def test_a_bad_policy_is_refused_naming_the_key(
    data_dir: Path, toml: str, named: list[str]
) -> None:
    message = refused(data_dir, toml)

    for part in named:
        assert part in message, (part, message)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"LLMOS_POLICY_TIMEOUT_S": "soon"}, "'policy.timeout_s'"),
        ({"LLMOS_POLICY_STAGES": "safety:input,safety:ouput"}, "'safety:ouput'"),
        ({"LLMOS_POLICY_FAIL_OPEN": "privacy:redact", "LLMOS_POLICY_STAGES": ""}, "fail_open"),
    ],
)
def test_a_bad_policy_environment_variable_is_refused(
    data_dir: Path, env: dict[str, str], named: str
) -> None:
    assert named in refused(data_dir, "", env)


def test_the_whole_table_names_are_not_environment_variables(data_dir: Path) -> None:
    """LLMOS_POLICY and LLMOS_TENANTS are no settings: a table has no one-string form."""
    built = policies(data_dir, "", env={"LLMOS_POLICY": "x", "LLMOS_TENANTS": "y"})

    assert built == Policies()


@pytest.mark.parametrize(
    ("toml", "env"), [('kernel_stages = ""\n', {}), ("", {"LLMOS_KERNEL_STAGES": ""})]
)
def test_the_removed_kernel_stages_setting_points_to_the_policy(
    data_dir: Path, toml: str, env: dict[str, str]
) -> None:
    """It turned stages off for every request; ignoring it silently would turn them on."""
    message = refused(data_dir, toml, env)

    assert "kernel_stages" in message.lower()
    assert "no longer read" in message and "[policy] stages" in message
