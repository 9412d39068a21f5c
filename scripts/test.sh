#!/usr/bin/env bash
# One command: set up, then run the whole test suite. PostgreSQL tests need a server at
# 127.0.0.1:5432 (they are skipped outside CI when it is unreachable, and fail in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One pytest worker per core (pytest-xdist), each test file whole on one worker (module fixtures
# and the order within a file as in one process); MEMPLAN_TEST_WORKERS=0 runs one process.
# The run fails when two collected tests share a node id (xdist would run one of them) or when
# fewer or more tests report a result than were collected (tests/result_count.py). The 25
# slowest tests are listed at the end (where the suite's time goes).
exec .venv/bin/python -m pytest -q -n "${MEMPLAN_TEST_WORKERS:-auto}" --dist loadfile \
    --durations=25 "$@"
