"""A real memplan server (SQLite job store, embedded worker) and Debian's chromium under
Playwright: shared by the browser tests and scripts/screenshots.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("MEMPLAN_CHROMIUM", "/usr/bin/chromium")


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (requirements-dev.txt; scripts/setup.sh)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no chromium at {CHROMIUM} (scripts/setup.sh installs Debian's as root)"
    return None


def require_browser() -> None:
    """Skip only outside CI when chromium or Playwright is missing; in CI, fail."""
    import pytest

    why = browser_missing()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"the browser tests are required in CI: {why}")
    pytest.skip(f"{why} (required in CI)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(tmp: Path) -> Iterator[str]:
    """`memplan serve` (API + embedded worker) on a free port; yields its base URL."""
    port = _free_port()
    env = {**os.environ, "MEMPLAN_DATABASE_URL": f"sqlite:///{tmp / 'jobs.db'}",
           "MEMPLAN_POLL_S": "0.1",
           # The first transformers estimate of a fresh server imports torch and transformers
           # (seconds on a busy CI core) inside the 10 s default work limit: give it room.
           "MEMPLAN_ESTIMATE_DEADLINE_S": "60"}
    env.pop("MEMPLAN_API_TOKENS", None)
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {(tmp / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready in 60 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextmanager
def chromium() -> Iterator[object]:
    """Debian's chromium, headless, under Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()
