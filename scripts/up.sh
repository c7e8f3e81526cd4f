#!/usr/bin/env bash
# Install (first time) and start the whole local stack: scripts/up.sh [llmos up options]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh all
exec .venv/bin/llmos up "$@"
