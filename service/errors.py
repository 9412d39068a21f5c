"""RFC 9457 problem details for every error the API returns."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from planner.catalog import UnknownName

PROBLEM = "application/problem+json"


class InvalidParam(BaseModel):
    name: str = Field(..., description="Dotted path of the offending field, e.g. body.model.num_layers.")
    reason: str


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    invalid_params: list[InvalidParam] | None = Field(
        None, alias="invalid-params", description="For validation errors: each offending field.")

    model_config = {"populate_by_name": True}


class PlanError(Exception):
    """A request that is well-formed but cannot be planned (422 with the rule that failed)."""

    def __init__(self, detail: str, field: str | None = None, status: int = 422) -> None:
        super().__init__(detail)
        self.detail, self.field, self.status = detail, field, status


def problem_response(status: int, title: str, detail: str | None = None,
                     invalid: list[dict[str, str]] | None = None, type_: str = "about:blank",
                     headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": type_, "title": title, "status": status}
    if detail is not None:
        body["detail"] = detail
    if invalid:
        body["invalid-params"] = invalid
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _loc(loc: tuple | list) -> str:
    return ".".join(str(p) for p in loc)


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        invalid = []
        for err in exc.errors():
            reason = err.get("msg", "invalid")
            ctx = err.get("ctx") or {}
            for key in ("le", "ge", "lt", "gt"):
                if key in ctx and str(ctx[key]) not in reason:
                    reason += f" (limit {key} {ctx[key]})"
            invalid.append({"name": _loc(err.get("loc", ())), "reason": reason})
        detail = "; ".join(f"{i['name']}: {i['reason']}" for i in invalid)
        return problem_response(422, "Request validation failed", detail, invalid,
                                type_="https://memplan.dev/problems/validation")

    @app.exception_handler(UnknownName)
    async def _unknown(_: Request, exc: UnknownName) -> JSONResponse:
        field = "body.model.preset" if exc.kind == "preset" else "body.hardware.gpu"
        return problem_response(422, f"Unknown {exc.kind}", str(exc),
                                [{"name": field, "reason": f"valid names: {', '.join(exc.valid)}"}],
                                type_="https://memplan.dev/problems/unknown-name")

    @app.exception_handler(PlanError)
    async def _plan(_: Request, exc: PlanError) -> JSONResponse:
        invalid = [{"name": exc.field, "reason": exc.detail}] if exc.field else None
        return problem_response(exc.status, "Cannot plan this setup", exc.detail, invalid,
                                type_="https://memplan.dev/problems/unplannable")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(exc.status_code, _title(exc.status_code),
                                str(exc.detail) if exc.detail else None,
                                headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:  # pragma: no cover
        return problem_response(500, "Internal Server Error", type(exc).__name__)


def _title(status: int) -> str:
    from http import HTTPStatus
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# Responses every JSON route documents, so generated clients know the error shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"model": Problem, "content": {PROBLEM: {}}, "description": "Invalid or unplannable input"},
}
__all__ = ["PROBLEM", "Problem", "PlanError", "install", "problem_response", "ERROR_RESPONSES",
           "HTTPException"]
