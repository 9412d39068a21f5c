"""The web page at ``/``: a client of the public API, served by the same app (no second server,
nothing from elsewhere). Kept out of the OpenAPI document: it is not part of the contract."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB = Path(__file__).resolve().parent.parent / "web"

router = APIRouter(include_in_schema=False)


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    """The page; its scripts and style are under /web/."""
    return FileResponse(WEB / "index.html", media_type="text/html")


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/web", StaticFiles(directory=WEB), name="web")
