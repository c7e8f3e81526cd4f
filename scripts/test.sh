#!/usr/bin/env bash
# Install everything and run every check: lint, types, contracts, unit, integration and
# end-to-end tests against the real stack and the real model. Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh all,dev
(cd tests/e2e/node && npm ci --no-audit --no-fund --loglevel=error)
scripts/ensure-redis.sh
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
scripts/typecheck.sh
echo "== pytest"
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit "$status"
