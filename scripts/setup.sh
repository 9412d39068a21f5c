#!/usr/bin/env bash
# Create .venv (if missing) and install memplan with its pinned development dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# requirements-dev.txt pins torch to the 2.13.0 CPU wheel; pyproject.toml keeps a range that CUDA
# builds satisfy too.
.venv/bin/python -m pip install --disable-pip-version-check -q -r requirements-dev.txt
.venv/bin/python -m pip install --disable-pip-version-check -q --no-deps -e .
# The browser tests (tests/test_web_e2e.py) drive Debian's chromium through Playwright, which
# cannot download a browser of its own here. Installed once when missing and we may; quick after.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver
fi
