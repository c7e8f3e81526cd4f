"""Settings: flags > LLMOS_* environment > TOML file > defaults, with typed values."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from llmos.services.config import Settings, load_settings
from llmos.services.errors import InvalidArgument


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An empty data directory, so no llmos.toml from the real home directory is read."""
    path = tmp_path / "data"
    path.mkdir()
    return path


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_when_nothing_is_set(data_dir: Path) -> None:
    settings = load_settings({"data_dir": str(data_dir)}, env={})

    assert settings == Settings(data_dir=str(data_dir))
    assert settings.port == 50051
    assert settings.expected_services == ("runtime", "safety", "privacy", "explain", "hardware")


def test_flags_beat_env_beat_file_beat_defaults(tmp_path: Path, data_dir: Path) -> None:
    config = write_config(tmp_path / "llmos.toml", "port = 1000\nmodel = 'from-file'\n")
    env = {"LLMOS_PORT": "2000", "LLMOS_LOG_LEVEL": "debug"}
    flags = {"port": 3000, "data_dir": str(data_dir)}

    assert load_settings(flags, env=env, config_file=str(config)).port == 3000
    assert load_settings({"data_dir": str(data_dir)}, env=env, config_file=str(config)).port == 2000
    assert load_settings({"data_dir": str(data_dir)}, env={}, config_file=str(config)).port == 1000
    assert load_settings({"data_dir": str(data_dir)}, env={}).port == 50051

    # Each source keeps the settings the higher ones leave alone.
    merged = load_settings(flags, env=env, config_file=str(config))
    assert (merged.model, merged.log_level) == ("from-file", "debug")


def test_none_overrides_are_ignored(data_dir: Path) -> None:
    settings = load_settings(
        {"port": None, "host": None, "data_dir": str(data_dir)}, env={"LLMOS_PORT": "6000"}
    )

    assert settings.port == 6000
    assert settings.host == "127.0.0.1"


def test_unknown_override_is_refused(data_dir: Path) -> None:
    with pytest.raises(InvalidArgument) as caught:
        load_settings({"prot": 1, "data_dir": str(data_dir)}, env={})

    assert "prot" in caught.value.message
    assert caught.value.reason == "BAD_SETTING"


def test_unrelated_environment_variables_are_ignored(data_dir: Path) -> None:
    env = {"LLMOS_NOT_A_SETTING": "x", "PORT": "1", "llmos_port": "2"}

    assert load_settings({"data_dir": str(data_dir)}, env=env).port == 50051


def test_environment_strings_are_coerced_to_field_types(data_dir: Path) -> None:
    env = {
        "LLMOS_PORT": "6000",
        "LLMOS_SHUTDOWN_GRACE_S": "2.5",
        "LLMOS_EXPECTED_SERVICES": " runtime, safety ,, ",
        "LLMOS_MODEL": "12",
    }

    settings = load_settings({"data_dir": str(data_dir)}, env=env)

    assert settings.port == 6000
    assert isinstance(settings.port, int)
    assert settings.shutdown_grace_s == 2.5
    assert settings.expected_services == ("runtime", "safety")
    assert settings.model == "12"


def test_file_values_are_coerced_to_field_types(tmp_path: Path, data_dir: Path) -> None:
    config = write_config(
        tmp_path / "c.toml",
        'shutdown_grace_s = 3\nexpected_services = ["runtime", "hardware"]\nlease_s = "20"\n',
    )

    settings = load_settings({"data_dir": str(data_dir)}, env={}, config_file=str(config))

    assert settings.shutdown_grace_s == 3.0
    assert isinstance(settings.shutdown_grace_s, float)
    assert settings.expected_services == ("runtime", "hardware")
    assert settings.lease_s == 20


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"LLMOS_PORT": "abc"}, "port"),
        ({"LLMOS_LEASE_S": "1.5"}, "lease_s"),
        ({"LLMOS_RESTART_WINDOW_S": "soon"}, "restart_window_s"),
    ],
)
def test_bad_environment_value_names_the_setting(
    data_dir: Path, env: dict[str, str], setting: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        load_settings({"data_dir": str(data_dir)}, env=env)

    assert repr(setting) in caught.value.message
    assert caught.value.reason == "BAD_SETTING"


def test_bad_file_value_names_the_setting(tmp_path: Path, data_dir: Path) -> None:
    config = write_config(tmp_path / "c.toml", "expected_services = 5\n")

    with pytest.raises(InvalidArgument) as caught:
        load_settings({"data_dir": str(data_dir)}, env={}, config_file=str(config))

    assert "'expected_services'" in caught.value.message


# int() would accept TOML booleans and truncate TOML floats (`port = true` -> 1,
# `port = 5005.5` -> 5005) without a word; they must be refused.
@pytest.mark.parametrize("value", ["true", "5005.5"])
def test_non_integer_file_value_for_int_setting_is_refused(
    tmp_path: Path, data_dir: Path, value: str
) -> None:
    config = write_config(tmp_path / "c.toml", f"port = {value}\n")

    with pytest.raises(InvalidArgument) as caught:
        load_settings({"data_dir": str(data_dir)}, env={}, config_file=str(config))

    assert "'port'" in caught.value.message


def test_unknown_file_keys_are_refused_by_name(tmp_path: Path, data_dir: Path) -> None:
    config = write_config(tmp_path / "c.toml", "port = 1\nprot = 2\n[runtime]\nx = 1\n")

    with pytest.raises(InvalidArgument) as caught:
        load_settings({"data_dir": str(data_dir)}, env={}, config_file=str(config))

    assert "['prot', 'runtime']" in caught.value.message
    assert caught.value.reason == "BAD_SETTING"


def test_malformed_toml_is_invalid_argument(tmp_path: Path, data_dir: Path) -> None:
    config = write_config(tmp_path / "c.toml", "port = \n")

    with pytest.raises(InvalidArgument) as caught:
        load_settings({"data_dir": str(data_dir)}, env={}, config_file=str(config))

    assert str(config) in caught.value.message


# A missing --config file must be our error (the CLI reports LlmosError), not an OSError.
def test_missing_explicit_config_file_is_invalid_argument(tmp_path: Path, data_dir: Path) -> None:
    missing = tmp_path / "nowhere.toml"

    with pytest.raises(InvalidArgument) as caught:
        load_settings({"data_dir": str(data_dir)}, env={}, config_file=str(missing))

    assert str(missing) in caught.value.message


def test_config_file_is_found_in_the_data_dir(data_dir: Path) -> None:
    write_config(data_dir / "llmos.toml", "model = 'in-data-dir'\n")

    from_flag = load_settings({"data_dir": str(data_dir)}, env={})
    from_env = load_settings(env={"LLMOS_DATA_DIR": str(data_dir)})

    assert from_flag.model == "in-data-dir"
    assert from_env.model == "in-data-dir"


def test_llmos_config_env_names_the_file(tmp_path: Path, data_dir: Path) -> None:
    write_config(data_dir / "llmos.toml", "model = 'in-data-dir'\n")
    config = write_config(tmp_path / "other.toml", "model = 'named'\n")
    env = {"LLMOS_CONFIG": str(config)}

    assert load_settings({"data_dir": str(data_dir)}, env=env).model == "named"


def test_kernel_target_defaults_to_host_and_port() -> None:
    assert Settings(host="10.0.0.2", port=7000).kernel_target == "10.0.0.2:7000"
    assert Settings(host="h", port=1, kernel_address="k:9").kernel_target == "k:9"


def test_kernel_target_from_loaded_settings(data_dir: Path) -> None:
    env = {"LLMOS_HOST": "0.0.0.0", "LLMOS_PORT": "6100"}

    assert load_settings({"data_dir": str(data_dir)}, env=env).kernel_target == "0.0.0.0:6100"


def test_advertised_address_defaults_to_the_bound_host(data_dir: Path) -> None:
    assert Settings(host="10.0.0.2").advertised(7001) == "10.0.0.2:7001"

    env = {"LLMOS_HOST": "0.0.0.0", "LLMOS_ADVERTISE_HOST": "runtime"}
    settings = load_settings({"data_dir": str(data_dir)}, env=env)
    assert settings.advertised(7001) == "runtime:7001"
    assert settings.kernel_target == "0.0.0.0:50051"


def test_describe_lists_every_setting() -> None:
    settings = Settings(data_dir="/d", port=6001)
    shown = settings.describe()

    assert set(shown) == {field.name for field in dataclasses.fields(Settings)}
    assert shown["port"] == 6001
    assert shown["data_dir"] == "/d"


# Markers match whole words: `default_max_tokens` is not a secret.
def test_describe_masks_none_of_the_current_settings() -> None:
    settings = Settings(data_dir="/d")

    assert settings.describe() == dataclasses.asdict(settings)


@dataclasses.dataclass(frozen=True)
class SettingsWithSecrets(Settings):
    api_key: str = "hunter2"
    db_password: str = "pw"
    empty_secret: str = ""


def test_describe_masks_secret_looking_names_that_are_set() -> None:
    shown = SettingsWithSecrets(data_dir="/d").describe()

    assert shown["api_key"] == "***"
    assert shown["db_password"] == "***"
    # Nothing to hide: an unset secret shows as unset.
    assert shown["empty_secret"] == ""
    assert shown["host"] == "127.0.0.1"
