"""RFC 9457 problem details for every error the API returns."""

from __future__ import annotations

import copy
import json
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
    """An RFC 9457 problem document (media type application/problem+json)."""

    type: str = Field(..., description="URI of the problem type; 'about:blank' for plain HTTP "
                      "errors.")
    title: str = Field(..., description="Short summary of the problem type.")
    status: int = Field(..., description="The HTTP status code.")
    detail: str = Field(..., description="What went wrong with this request.")
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
    body: dict[str, Any] = {"type": type_, "title": title, "status": status,
                            "detail": detail if detail is not None else title}
    if invalid:
        body["invalid-params"] = invalid
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _loc(loc: tuple | list) -> str:
    return ".".join(str(p) for p in loc)


def install(app: FastAPI) -> None:
    _document_problems(app)

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

_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_PROBLEM_CONTENT = {PROBLEM: {"schema": _PROBLEM_REF}}
# Errors that any operation can answer, whatever its own responses say.
_BAD_BODY = {"description": "The request body is not JSON (or not UTF-8)",
             "content": _PROBLEM_CONTENT}
_TOO_LARGE = {"description": "The request body is over the service's size limit",
              "content": _PROBLEM_CONTENT}
_INVALID = {"description": "Invalid input", "content": _PROBLEM_CONTENT}
_INTERNAL = {"description": "Internal error: a bug in memplan", "content": _PROBLEM_CONTENT}


def problem_openapi(doc: dict[str, Any]) -> dict[str, Any]:
    """Make the OpenAPI document say what the handlers above do (idempotent).

    FastAPI documents ``model=Problem`` responses as application/json and request validation
    errors as its own HTTPValidationError; every error here is application/problem+json with the
    Problem schema, so: error responses carry only that media type, 422s use Problem, an
    operation with a body also documents the 400 for an unparseable body and the 413 for one over
    the size limit, and every operation documents the 500 problem.
    """
    for item in doc.get("paths", {}).values():
        for op in item.values():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            responses = op["responses"]
            for code, response in responses.items():
                if str(code)[0] in "45":
                    response["content"] = {PROBLEM: {"schema": dict(_PROBLEM_REF)}}
            if "requestBody" in op:
                responses.setdefault("400", copy.deepcopy(_BAD_BODY))
                responses.setdefault("413", copy.deepcopy(_TOO_LARGE))
            if "requestBody" in op or op.get("parameters"):
                responses.setdefault("422", copy.deepcopy(_INVALID))
            responses.setdefault("500", copy.deepcopy(_INTERNAL))
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    if "Problem" not in schemas:
        problem = Problem.model_json_schema(by_alias=True,
                                            ref_template="#/components/schemas/{model}")
        schemas.update(problem.pop("$defs", {}), Problem=problem)
    # FastAPI's own 422 body is never sent: drop its schemas once nothing refers to them.
    for name in ("HTTPValidationError", "ValidationError"):
        others = {k: v for k, v in schemas.items() if k != name}
        text = json.dumps([doc.get("paths", {}), others])
        if name in schemas and f'"#/components/schemas/{name}"' not in text \
                and _is_fastapi_error_schema(name, schemas[name]):
            del schemas[name]
    return doc


def _is_fastapi_error_schema(name: str, schema: Any) -> bool:
    props = set(schema.get("properties", {})) if isinstance(schema, dict) else set()
    return props == {"detail"} if name == "HTTPValidationError" else props >= {"loc", "msg", "type"}


def _document_problems(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problem_openapi(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


__all__ = ["PROBLEM", "Problem", "PlanError", "install", "problem_response", "problem_openapi",
           "ERROR_RESPONSES", "HTTPException"]
