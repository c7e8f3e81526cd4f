"""Regenerate the llmos.v1 Python stubs from protos/llmos/v1/*.proto.

Run after changing a .proto file: `python scripts/gen_protos.py`. Writes *_pb2.py,
*_pb2_grpc.py and mypy-protobuf's *.pyi next to the sources, where the `llmos.v1`
package lives. `--out DIR` writes elsewhere (the staleness test uses it).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"


def proto_files() -> list[Path]:
    """The contract files, in a stable order."""
    return sorted((PROTO_ROOT / "llmos" / "v1").glob("*.proto"))


def generate(out: Path) -> None:
    """Run protoc (from grpcio-tools) with the python, grpc and mypy plugins into `out`."""
    mypy_plugin = shutil.which("protoc-gen-mypy", path=str(Path(sys.executable).parent))
    mypy_grpc_plugin = shutil.which("protoc-gen-mypy_grpc", path=str(Path(sys.executable).parent))
    if mypy_plugin is None or mypy_grpc_plugin is None:
        raise SystemExit("mypy-protobuf is not installed: pip install -e '.[dev]'")
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={mypy_plugin}",
        f"--plugin=protoc-gen-mypy_grpc={mypy_grpc_plugin}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_ROOT)
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
