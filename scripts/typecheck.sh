#!/usr/bin/env bash
# mypy --strict over the installed package layout. The repository maps kernel/, services/,
# plugins/ and protos/llmos into `llmos` (setuptools package-dir), which mypy cannot follow
# through the editable-install finder, so we lay the same mapping out as symlinks.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck/llmos
rm -rf build/typecheck && mkdir -p "$tree"
ln -s "$PWD/protos/llmos/__init__.py" "$tree/__init__.py"
ln -s "$PWD/protos/llmos/py.typed" "$tree/py.typed"
ln -s "$PWD/protos/llmos/v1" "$tree/v1"
ln -s "$PWD/kernel" "$tree/kernel"
ln -s "$PWD/services" "$tree/services"
ln -s "$PWD/plugins" "$tree/plugins"
cd build/typecheck && ../../.venv/bin/python -m mypy --config-file ../../pyproject.toml -p llmos
