"""The llmos.v1 contracts: buf lint clean, the committed stubs current, the expected services.

The staleness check regenerates the stubs with scripts/gen_protos.py into a temporary
folder and compares them with protos/llmos/v1: the *_pb2.py modules by their serialized
FileDescriptorProto (what the runtime actually loads), the *_pb2_grpc.py and *.pyi files
by text, after blanking only the lines that carry tool version numbers.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, text_format

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"
PROTO_DIR = PROTO_ROOT / "llmos" / "v1"
NODE_DIR = REPO / "tests" / "e2e" / "node"
BUF = NODE_DIR / "node_modules" / ".bin" / "buf"
REGENERATE = "run `python scripts/gen_protos.py` and commit the regenerated stubs"

EXPECTED_SERVICES = {
    "common": set(),
    "kernel": {"KernelService"},
    "runtime": {"RuntimeService"},
    "safety": {"SafetyService"},
    "privacy": {"PrivacyService"},
    "explain": {"ExplainService"},
    "hardware": {"HardwareService"},
    "plugin": {"PluginHostService"},
}

# Lines whose only differences come from the versions of protoc, grpcio-tools or protobuf.
VERSION_LINES = [
    (re.compile(r"^GRPC_GENERATED_VERSION = .*$"), "GRPC_GENERATED_VERSION = <version>"),
    (re.compile(r"^# Protobuf Python Version: .*$"), "# Protobuf Python Version: <version>"),
]
STUB_PATTERNS = ("*_pb2.py", "*_pb2_grpc.py", "*.pyi")


# ---------------------------------------------------------------- buf lint


def test_buf_lint_is_clean(tmp_path: Path) -> None:
    if not BUF.exists():
        pytest.fail(f"buf is not installed ({BUF}): run `npm ci` in tests/e2e/node")
    result = subprocess.run(
        [str(BUF), "lint"],
        cwd=PROTO_ROOT,
        env={**os.environ, "BUF_CACHE_DIR": str(tmp_path / "buf-cache")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (
        f"buf lint protos/ exited {result.returncode}:\n{result.stdout}{result.stderr}"
    )


# ---------------------------------------------------------------- stale stubs


def regenerate(repo: Path, out: Path) -> Path:
    """Run `scripts/gen_protos.py --out OUT` of `repo`; return the folder of llmos.v1 stubs."""
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, str(repo / "scripts" / "gen_protos.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"gen_protos.py failed:\n{result.stdout}{result.stderr}"
    return out / "llmos" / "v1"


def serialized_descriptor(module_path: Path) -> bytes:
    """The FileDescriptorProto a generated *_pb2.py registers, read without importing it."""
    tree = ast.parse(module_path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, bytes)
        ):
            return node.args[0].value
    raise AssertionError(f"{module_path}: no AddSerializedFile(b'...') call")


def committed_descriptor(stem: str) -> bytes:
    """What `llmos.v1.<stem>_pb2` registers at import, i.e. the committed stub."""
    module = importlib.import_module(f"llmos.v1.{stem}_pb2")
    assert Path(module.__file__ or "").resolve().parent == PROTO_DIR.resolve(), (
        f"llmos.v1 is imported from {module.__file__}, not from this checkout"
    )
    return bytes(module.DESCRIPTOR.serialized_pb)


def normalise(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        normalised = line
        for pattern, replacement in VERSION_LINES:
            normalised = pattern.sub(replacement, normalised)
        lines.append(normalised)
    # ValidateProtobufRuntimeVersion(Domain, MAJOR, MINOR, PATCH, SUFFIX, file): the numbers
    # are the generating protobuf's, one argument per line.
    joined = "\n".join(lines)
    joined = re.sub(
        r"(ValidateProtobufRuntimeVersion\(\s*[\w.]+,)\s*\d+,\s*\d+,\s*\d+,\s*'[^']*',",
        r"\1 <version>,",
        joined,
    )
    return joined.splitlines()


def descriptor_diff(committed: bytes, regenerated: bytes) -> str:
    old, new = descriptor_pb2.FileDescriptorProto(), descriptor_pb2.FileDescriptorProto()
    old.ParseFromString(committed)
    new.ParseFromString(regenerated)
    if old == new:
        return ""
    diff = difflib.unified_diff(
        text_format.MessageToString(old).splitlines(),
        text_format.MessageToString(new).splitlines(),
        "committed",
        "regenerated",
        lineterm="",
        n=2,
    )
    return "\n".join(list(diff)[:40])


def stale_stubs(generated: Path) -> list[str]:
    """How the committed stubs differ from freshly generated ones in `generated`."""
    problems: list[str] = []

    def stubs(folder: Path) -> set[str]:
        return {p.name for pattern in STUB_PATTERNS for p in folder.glob(pattern)}

    committed, fresh = stubs(PROTO_DIR), stubs(generated)
    problems += [f"{name}: missing from protos/llmos/v1" for name in sorted(fresh - committed)]
    problems += [f"{name}: no .proto generates it any more" for name in sorted(committed - fresh)]
    for name in sorted(committed & fresh):
        if name.endswith("_pb2.py"):
            stem = name.removesuffix("_pb2.py")
            diff = descriptor_diff(
                committed_descriptor(stem), serialized_descriptor(generated / name)
            )
            if diff:
                problems.append(f"{name}: the descriptor differs\n{diff}")
            continue
        old = normalise((PROTO_DIR / name).read_text(encoding="utf-8"))
        new = normalise((generated / name).read_text(encoding="utf-8"))
        if old != new:
            lines = difflib.unified_diff(old, new, "committed", "regenerated", lineterm="", n=2)
            problems.append(f"{name}: the text differs\n" + "\n".join(list(lines)[:40]))
    return problems


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    problems = stale_stubs(regenerate(REPO, tmp_path))
    assert not problems, (
        f"the generated stubs in protos/llmos/v1 are stale: {REGENERATE}\n\n"
        + "\n\n".join(problems)
    )


def test_the_staleness_check_catches_a_proto_edited_without_regenerating(
    tmp_path: Path,
) -> None:
    """Edit a copy of the contracts (never the real ones) and regenerate from the copy."""
    copy = tmp_path / "repo"
    shutil.copytree(PROTO_ROOT, copy / "protos", ignore=shutil.ignore_patterns("*.py", "*.pyi"))
    (copy / "scripts").mkdir()
    shutil.copy2(REPO / "scripts" / "gen_protos.py", copy / "scripts" / "gen_protos.py")
    edited = copy / "protos" / "llmos" / "v1" / "common.proto"
    source = edited.read_text(encoding="utf-8")
    first_message = re.search(r"^message \w+ \{\n", source, re.MULTILINE)
    assert first_message, "common.proto declares no message"
    at = first_message.end()
    edited.write_text(
        source[:at] + "  string staleness_probe = 536870911;\n" + source[at:], encoding="utf-8"
    )

    problems = stale_stubs(regenerate(copy, tmp_path / "out"))

    assert any(p.startswith("common_pb2.py: the descriptor differs") for p in problems), problems
    assert any(p.startswith("common_pb2.pyi: the text differs") for p in problems), problems
    assert all(p.startswith("common_pb2") for p in problems), problems


def test_normalising_blanks_version_numbers_only() -> None:
    generated = "GRPC_GENERATED_VERSION = '1.85.1'\nclass KernelServiceStub:\n"
    older = "GRPC_GENERATED_VERSION = '1.70.0'\nclass KernelServiceStub:\n"
    assert normalise(generated) == normalise(older)
    assert normalise(generated) != normalise(older.replace("Kernel", "Runtime"))


# ---------------------------------------------------------------- the contracts


def test_every_expected_proto_file_exists() -> None:
    present = {path.stem for path in PROTO_DIR.glob("*.proto")}
    missing = set(EXPECTED_SERVICES) - present
    assert not missing, f"missing from protos/llmos/v1: {sorted(f'{m}.proto' for m in missing)}"


@pytest.mark.parametrize("path", sorted(PROTO_DIR.glob("*.proto")), ids=lambda p: p.name)
def test_every_proto_declares_package_llmos_v1(path: Path) -> None:
    packages = re.findall(r"^\s*package\s+([\w.]+)\s*;", path.read_text(encoding="utf-8"), re.M)
    assert packages == ["llmos.v1"], f"{path.name}: declares package {packages}"


@pytest.mark.parametrize("stem", sorted(EXPECTED_SERVICES))
def test_each_file_defines_its_service(stem: str) -> None:
    module = importlib.import_module(f"llmos.v1.{stem}_pb2")
    assert module.DESCRIPTOR.package == "llmos.v1"
    assert module.DESCRIPTOR.name == f"llmos/v1/{stem}.proto"
    services = set(module.DESCRIPTOR.services_by_name)
    assert EXPECTED_SERVICES[stem] <= services, (
        f"{stem}.proto defines {sorted(services)}, expected {sorted(EXPECTED_SERVICES[stem])}"
    )
