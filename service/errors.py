"""RFC 9457 problem details for every error the API returns."""

from __future__ import annotations

import copy
import functools
import json
import re
import typing
from collections import Counter
from typing import Any, Callable, Coroutine

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from planner.catalog.presets import UnknownName

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


# ---- naming the field a rule is about --------------------------------------------------------------
# A rule checked after the schema (a planner rule, a model validator over several fields) comes as
# a message; the fields it names are found in that message, against the route's body model.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_QUOTED = re.compile(r"'([^'\s]+)'")


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (through Optional, unions, Annotated, lists)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _literals_in(annotation: Any) -> set[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return {str(a) for a in typing.get_args(annotation)}
    return {v for arg in typing.get_args(annotation) for v in _literals_in(arg)}


@functools.lru_cache(maxsize=64)
def body_fields(model: type[BaseModel]) -> dict[str, set[str]]:
    """Every field path of a request model ('parallelism.zero_stage'), with its literal values."""
    out: dict[str, set[str]] = {}

    def walk(m: type[BaseModel], prefix: str, seen: tuple[type, ...]) -> None:
        for name, info in m.model_fields.items():
            path = f"{prefix}{name}"
            out[path] = _literals_in(info.annotation)
            for sub in _models_in(info.annotation):
                if sub not in seen:
                    walk(sub, f"{path}.", (*seen, sub))

    walk(model, "", (model,))
    return out


def fields_named_in(message: str, model: type[BaseModel] | None,
                    top_level: bool = False) -> list[str]:
    """Paths of ``model``'s fields that ``message`` names: a dotted path as given, a field name
    as the shallowest fields of that name (a plain word such as 'implementation' only as a
    top-level field: below that it is more likely prose); failing any name, the fields whose
    literal values the message quotes ('adafactor' -> training.optimizer). ``top_level``: only
    the model's own fields (the message of a rule over them)."""
    if model is None:
        return []
    fields = body_fields(model)
    if top_level:
        fields = {p: v for p, v in fields.items() if "." not in p}
    found: list[str] = []

    def shallowest(paths: list[str]) -> list[str]:
        depth = min((p.count(".") for p in paths), default=0)
        return [p for p in paths if p.count(".") == depth]

    for token in _NAME.findall(message):
        if token in fields:
            found.append(token)
            continue
        leaf = token.rsplit(".", 1)[-1]
        if "_" in leaf or "." in token:
            found += shallowest([p for p in fields if p.rsplit(".", 1)[-1] == leaf])
    if not found:
        for value in _QUOTED.findall(message):
            found += shallowest([p for p, values in fields.items() if value in values])
    return list(dict.fromkeys(found))


def body_model(request: Request) -> type[BaseModel] | None:
    """The request model of the route that answered (None for a route without a JSON body)."""
    field = getattr(request.scope.get("route"), "body_field", None)
    models = _models_in(getattr(getattr(field, "field_info", None), "annotation", None))
    return models[0] if len(models) == 1 else None


def _qualified(field: str) -> str:
    return field if field.split(".", 1)[0] in ("body", "query", "header", "path") \
        else f"body.{field}"


def _rule_fields(exc: BaseException, request: Request) -> list[str]:
    """The fields a PlanError is about: its own, else that of the planner error it wraps, else
    the body fields its message names."""
    seen: BaseException | None = exc
    for _ in range(8):  # the exception and the ones it was raised from
        if seen is None:
            break
        field = getattr(seen, "field", None)
        if isinstance(field, str) and field:
            return [_qualified(field)]
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return [f"body.{f}" for f in fields_named_in(str(exc), body_model(request))]


def install(app: FastAPI) -> None:
    _document_problems(app)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        invalid: list[tuple[list[str], str]] = []
        for err in exc.errors():
            reason = err.get("msg", "invalid")
            ctx = err.get("ctx") or {}
            for key in ("le", "ge", "lt", "gt"):
                if key in ctx and str(ctx[key]) not in reason:
                    reason += f" (limit {key} {ctx[key]})"
            names = [_loc(err.get("loc", ()))]
            if tuple(err.get("loc", ())) == ("body",) and err.get("type") == "value_error":
                # A rule over several top-level fields: name those fields, not the whole body.
                names = [f"body.{f}" for f in fields_named_in(reason, body_model(request),
                                                              top_level=True)] or names
            invalid.append((names, reason))
        detail = "; ".join(f"{', '.join(names)}: {reason}" for names, reason in invalid)
        return problem_response(422, "Request validation failed", detail,
                                [{"name": n, "reason": r} for names, r in invalid for n in names],
                                type_="https://memplan.dev/problems/validation")

    @app.exception_handler(UnknownName)
    async def _unknown(_: Request, exc: UnknownName) -> JSONResponse:
        field = "body.model.preset" if exc.kind == "preset" else "body.hardware.gpu"
        return problem_response(422, f"Unknown {exc.kind}", str(exc),
                                [{"name": field, "reason": f"valid names: {', '.join(exc.valid)}"}],
                                type_="https://memplan.dev/problems/unknown-name")

    @app.exception_handler(PlanError)
    async def _plan(request: Request, exc: PlanError) -> JSONResponse:
        invalid = [{"name": f, "reason": exc.detail} for f in _rule_fields(exc, request)] or None
        return problem_response(exc.status, "Cannot plan this setup", exc.detail, invalid,
                                type_="https://memplan.dev/problems/unplannable")

    @app.exception_handler(DuplicateKeys)
    async def _duplicates(_: Request, exc: DuplicateKeys) -> JSONResponse:
        invalid = [{"name": name, "reason": "duplicate key: an object may name a member once "
                    "(which one would count is not defined)"} for name in exc.names]
        return problem_response(422, "Request validation failed",
                                "; ".join(f"{i['name']}: duplicate key" for i in invalid), invalid,
                                type_="https://memplan.dev/problems/validation")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            allowed = allowed_methods(request)
            if allowed:
                headers = {k: v for k, v in headers.items() if k.lower() != "allow"}
                headers["Allow"] = ", ".join(allowed)
        detail = str(exc.detail) if exc.detail else None
        if exc.status_code == 405 and detail == _title(405) and "Allow" in headers:
            detail = f"{request.method} is not allowed here; allowed: {headers['Allow']}"
        return problem_response(exc.status_code, _title(exc.status_code), detail,
                                headers=headers or None)

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:  # pragma: no cover
        return problem_response(500, "Internal Server Error", type(exc).__name__)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route answers at this request's path (Starlette's 405 names only the
    methods of the first route that matched the path)."""
    allowed = []
    for method in _METHODS:
        scope = {"type": "http", "method": method, "path": request.scope.get("path", ""),
                 "root_path": request.scope.get("root_path", ""), "headers": []}
        if any(route.matches(dict(scope))[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


# ---- request bodies: JSON with each member named once ------------------------------------------
class DuplicateKeys(HTTPException):
    """A JSON body that names a member twice in one object (422 naming each such member)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(422, "duplicate keys: " + ", ".join(names))
        self.names = names


class _Repeated(Exception):
    """An object of the document names a member twice."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Repeated
    return obj


_UNIQUE = json.JSONDecoder(object_pairs_hook=_unique_pairs)


def loads_unique(body: bytes | str) -> Any:
    """``json.loads``, refusing an object that names a member twice (RFC 8259 leaves which one
    counts undefined; Python would silently keep the last). One parse by one decoder made once,
    whose hook sees each object's members as pairs; only when a duplicate is found is the
    document parsed again to name where."""
    if isinstance(body, str):
        if body.startswith("\ufeff"):  # as json.loads
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", body, 0)
        text = body
    elif isinstance(body, (bytes, bytearray)):
        text = body.decode(json.detect_encoding(body), "surrogatepass")
    else:
        return json.loads(body)  # its TypeError
    try:
        return _UNIQUE.decode(text)
    except _Repeated:
        return _loads_naming_repeats(text)


def _loads_naming_repeats(body: str) -> Any:
    repeated: list[tuple[dict, list[str]]] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            repeated.append((obj, [k for k, n in Counter(k for k, _ in pairs).items() if n > 1]))
        return obj

    doc = json.loads(body, object_pairs_hook=pairs_hook)
    if repeated:
        where = {id(obj): keys for obj, keys in repeated}
        names: list[str] = []

        def walk(node: Any, path: str) -> None:
            if isinstance(node, dict):
                names.extend(f"{path}.{k}" for k in where.get(id(node), ()))
                for k, v in node.items():
                    walk(v, f"{path}.{k}")
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    walk(v, f"{path}.{i}")

        walk(doc, "body")
        raise DuplicateKeys(names)
    return doc


class UniqueKeysRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads_unique(await self.body())
        return self._json


class ProblemRoute(APIRoute):
    """The route class of every router: JSON bodies are parsed by :func:`loads_unique`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            return await handler(UniqueKeysRequest(request.scope, request.receive))

        return route_handler


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
_BAD_BODY = {"description": "The request body is not JSON (or not UTF-8), or its Content-Length "
             "is not a byte count",
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
           "ERROR_RESPONSES", "HTTPException", "DuplicateKeys", "loads_unique", "ProblemRoute",
           "allowed_methods", "fields_named_in"]
