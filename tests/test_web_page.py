"""The page at / is served by the app itself, with every asset it loads, and stays out of the
API's contract (no browser needed: tests/test_web_e2e.py drives it in Chromium)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

WEB = Path(__file__).resolve().parent.parent / "service" / "web"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    db = tmp_path_factory.mktemp("web") / "jobs.db"
    with TestClient(create_app(Settings(database_url=f"sqlite:///{db}"))) as c:
        yield c


def test_the_page_and_every_asset_it_loads_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="(/web/[^"]+)"', page.text)
    assert "/web/js/main.js" in assets and "/web/style.css" in assets
    # Every module the scripts import, followed from main.js: served as JavaScript.
    seen, todo = set(), ["/web/js/main.js"]
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        seen.add(url)
        r = client.get(url)
        assert r.status_code == 200, url
        assert r.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript")
        base = url.rsplit("/", 1)[0]
        for rel in re.findall(r'^import [^;]*? from "(\.{1,2}/[^"]+)";', r.text, flags=re.M):
            parts = f"{base}/{rel}".split("/")
            out: list[str] = []
            for p in parts:
                if p == "..":
                    out.pop()
                elif p != ".":
                    out.append(p)
            todo.append("/".join(out))
    on_disk = {f"/web/{p.relative_to(WEB).as_posix()}" for p in WEB.rglob("*.js")}
    assert seen == on_disk  # no module left unused, none missing
    for url in assets:
        assert client.get(url).status_code == 200
    # Nothing from elsewhere: the page works offline.
    for path in [WEB / "index.html", WEB / "style.css", *WEB.rglob("*.js")]:
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", path.read_text()), path


def test_the_page_is_not_part_of_the_contract(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not [p for p in paths if p.startswith("/web")]


def test_a_missing_asset_is_a_problem_404(client):
    r = client.get("/web/js/nothing.js")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"


def test_an_installed_service_ships_every_file_of_the_page():
    import fnmatch
    import tomllib

    doc = tomllib.loads((WEB.parent.parent / "pyproject.toml").read_text())
    patterns = doc["tool"]["setuptools"]["package-data"]["service"]
    files = [p.relative_to(WEB.parent).as_posix() for p in WEB.rglob("*") if p.is_file()]
    assert files and all(any(fnmatch.fnmatch(f, pat) and f.count("/") == pat.count("/")
                             for pat in patterns) for f in files), (files, patterns)


def test_only_the_pages_own_files_are_served(client):
    for path in ("/web/../app.py", "/web/%2e%2e/app.py", "/web/js/../../routes/web.py",
                 "/web/", "/web/js"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert r.headers["content-type"] == "application/problem+json", path
