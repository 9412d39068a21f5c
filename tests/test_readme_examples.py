"""The README's examples run as written.

Every command in a fenced ``bash`` block of README.md that calls ``memplan`` or ``curl`` a
``/v1/...`` route is run: ``memplan`` lines in a shell (``.venv/bin/memplan`` becomes this Python
running ``service.cli`` from this checkout), in a scratch directory where ``examples/`` is
this repository's; each must exit with 0, or with the status its comment names ("exit status 3").
``curl`` bodies (inline or ``-d @file``) are posted to the app in process (a temporary SQLite job
store) and must be answered with 2xx. Lines that need a running service are skipped by name
(``SKIPPED``), nothing else.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
# Commands that need a running service (or start one): the only ones not run.
SKIPPED = ("memplan serve", "memplan worker", "--server")
MEMPLAN = re.compile(r"^(?:\.venv/bin/)?memplan\b")


def readme_commands(text: str) -> list[tuple[str, str]]:
    """(kind, command) for each memplan/curl command of the bash blocks, continuation lines and
    multi-line quoted arguments joined."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        pending = ""
        for line in block.splitlines():
            pending = f"{pending}\n{line}" if pending else line
            if pending.endswith("\\"):
                continue
            try:
                shlex.split(pending, comments=True)
            except ValueError:  # an open quote: the command goes on
                continue
            command, pending = pending.strip(), ""
            if MEMPLAN.match(command):
                out.append(("memplan", command))
            elif command.startswith("curl ") and "/v1/" in command:
                out.append(("curl", command))
        assert not pending, f"unterminated command in README.md: {pending!r}"
    return out


COMMANDS = readme_commands(README.read_text())


def _id(command: str) -> str:
    return re.sub(r"\s+", " ", command)[:90]


def test_the_readme_has_the_examples_this_test_expects():
    memplan = [c for k, c in COMMANDS if k == "memplan"]
    curl = [c for k, c in COMMANDS if k == "curl"]
    assert any("estimate" in c and "exit status 3" in c for c in memplan)
    assert any("estimate" in c and "exit status 0" in c for c in memplan)
    assert any(" pipeline " in c for c in memplan) and any(" validate " in c for c in memplan)
    assert any("/v1/memory" in c for c in curl) and any("@examples/" in c for c in curl)
    assert [c for _, c in COMMANDS if any(s in c for s in SKIPPED)]  # the skip list is live


def _expected_status(command: str) -> int:
    comment = command.split("#", 1)[1] if "#" in command else ""
    m = re.search(r"exit status (\d+)", comment)
    return int(m.group(1)) if m else 0


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    (d / "examples").symlink_to(REPO / "examples")
    return d


# lines that need a running service are left out here (not collected, so nothing is skipped)
@pytest.mark.parametrize("command", [c for k, c in COMMANDS if k == "memplan"
                                     and not any(s in c for s in SKIPPED)], ids=_id)
def test_memplan_command(command, scratch):
    shell = MEMPLAN.sub(lambda _: f"{shlex.quote(sys.executable)} -m service.cli", command)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["bash", "-c", shell], cwd=scratch, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    expected = _expected_status(command)
    assert proc.returncode == expected, (
        f"README.md: {command}\nexited with {proc.returncode}, expected {expected}\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    code = command.split(" #", 1)[0]
    if expected == 0 and " estimate " in code and "--json" not in code:
        assert ": yes" in proc.stdout  # "fits on ...: yes" where the README says it fits


def _curl_request(command: str) -> tuple[str, str, dict[str, str], bytes | None]:
    args = shlex.split(command, comments=True)[1:]
    method, url, headers, body = None, None, {}, None
    it = iter(args)
    for a in it:
        if a in ("-s", "--silent", "-S", "--show-error", "-f", "--fail"):
            continue
        if a in ("-H", "--header"):
            name, _, value = next(it).partition(":")
            headers[name.strip().lower()] = value.strip()
        elif a in ("-d", "--data", "--data-binary", "--data-raw"):
            data = next(it)
            body = ((REPO / data[1:]).read_bytes() if data.startswith("@") and a != "--data-raw"
                    else data.encode())
        elif a in ("-X", "--request"):
            method = next(it)
        elif a in ("-o", "--output"):
            next(it)
        elif a.startswith("-"):
            raise AssertionError(f"curl option {a!r} is not understood by this test: {command}")
        else:
            url = a
    assert url, command
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return method or ("POST" if body is not None else "GET"), path, headers, body


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from service.app import create_app
    from service.settings import Settings

    db = tmp_path_factory.mktemp("readme-api") / "jobs.db"
    with TestClient(create_app(Settings(database_url=f"sqlite:///{db}"))) as client:
        yield client


@pytest.mark.parametrize("command", [c for k, c in COMMANDS if k == "curl"], ids=_id)
def test_curl_command(command, api):
    method, path, headers, body = _curl_request(command)
    r = api.request(method, path, headers=headers, content=body)
    assert 200 <= r.status_code < 300, f"README.md: {command}\n{r.status_code}: {r.text[:2000]}"
    if path == "/v1/memory":
        assert r.json()["fit"]["fits"] is ("does-not-fit" not in command), command
