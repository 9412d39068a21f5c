"""The web page at ``/``: a client of the public API, served by the same app (no second server,
nothing from elsewhere). Kept out of the OpenAPI document: it is not part of the contract.

Only the files shipped under ``service/web/`` are served, looked up by name (no path is ever
joined from the request), each under the route template ``/web/{path}`` in the metrics."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import FileResponse

WEB = Path(__file__).resolve().parent.parent / "web"
MEDIA_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}
FILES = {p.relative_to(WEB).as_posix(): p for p in sorted(WEB.rglob("*"))
         if p.is_file() and p.suffix in MEDIA_TYPES}

router = APIRouter(include_in_schema=False)


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    """The page; its scripts and style are under /web/."""
    return FileResponse(WEB / "index.html", media_type="text/html; charset=utf-8")


@router.get("/web/{path:path}", include_in_schema=False)
def asset(path: str) -> FileResponse:
    """A file of the page, by its name under service/web/."""
    file = FILES.get(path)
    if file is None:
        raise HTTPException(404, f"no file {path!r} in the web page")
    return FileResponse(file, media_type=f"{MEDIA_TYPES[file.suffix]}; charset=utf-8")


def install(app: FastAPI) -> None:
    app.include_router(router)
