#!/usr/bin/env bash
# One command: set up, then serve the API with an embedded worker on a local SQLite file.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/memplan serve "$@"
