"""Access control and admission for a shared deployment.

- **Bearer tokens.** Settings hold SHA-256 digests of the accepted tokens, never the tokens
  (``MEMPLAN_API_TOKENS``: a comma list of digests or the path of a file with one a line;
  ``memplan hash-token TOKEN`` prints a digest). A presented token is hashed and compared with
  every digest by ``hmac.compare_digest``. With no tokens configured the job routes are open, so
  that ``memplan serve`` works with no setup; estimate routes are open unless
  ``MEMPLAN_PROTECT_ESTIMATES=1``.
- **Body size.** The request layer (``service.front``) refuses bodies over ``max_body_bytes`` with
  413, from the Content-Length header when there is one and by counting the bytes as they arrive
  otherwise; a Content-Length that is not a byte count is a 400 (``ProblemH11Protocol`` gives
  uvicorn's own refusal of such a request, before it reaches the app, the same problem+json form).
- **Resource caps.** A job spec is checked against the configured caps (layers, hidden size,
  sequence, steps, ranks, wall-clock) before it is queued: 422 naming each field and its cap.
- **Idempotency.** The canonical hash of a job request (``request_hash``) is stored with the
  ``Idempotency-Key`` and the caller's identity; the store decides replay or conflict.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from typing import Annotated, Any, Iterable

import h11
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from uvicorn.protocols.http.h11_impl import H11Protocol

from planner.catalog.presets import UnknownName, resolve_model
from planner.catalog.specs import ResolvedModel, ValidationRequest
from service.errors import problem_response
from service.jobs.store import IdempotencyConflict

_DIGEST = re.compile(r"[0-9a-f]{64}")
_DIGITS = re.compile(rb"[0-9]+")
ANONYMOUS = ""  # the identity of every caller when no tokens are configured


def hash_token(token: str) -> str:
    """The SHA-256 hex digest a token is configured by."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_token_digests(value: str | Iterable[str]) -> tuple[str, ...]:
    """'d1,d2' or a file path (one digest a line, '#' comments) -> validated digests.

    A value that is not a digest is refused rather than taken as a plain token: tokens are never
    stored in clear."""
    if isinstance(value, str):
        text = value.strip()
        if text and not _DIGEST.fullmatch(text.split(",")[0].strip().lower()) \
                and os.path.isfile(text):
            with open(text) as f:
                items = [line.split("#", 1)[0].strip() for line in f]
        else:
            items = text.split(",")
    else:
        items = list(value)
    digests = []
    for item in (i.strip().lower() for i in items):
        if not item:
            continue
        if not _DIGEST.fullmatch(item):
            raise ValueError("MEMPLAN_API_TOKENS takes SHA-256 hex digests (64 hex characters, "
                             "from `memplan hash-token TOKEN`) or the path of a file of them; "
                             f"got an entry of {len(item)} characters")
        digests.append(item)
    return tuple(dict.fromkeys(digests))


# ---- bearer tokens -----------------------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False, description="A token whose SHA-256 digest is in "
                     "MEMPLAN_API_TOKENS. Not required when no tokens are configured.")


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": 'Bearer realm="memplan"'})


def identify(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str:
    """The caller's identity: the digest of a valid token, or ANONYMOUS when the deployment has
    no tokens. Raises 401 when tokens are configured and none (or a wrong one) is presented."""
    digests: tuple[str, ...] = request.app.state.settings.api_tokens
    if not digests:
        return ANONYMOUS
    if credentials is None or not credentials.credentials:
        raise _unauthorized("this route needs 'Authorization: Bearer TOKEN'")
    presented = hash_token(credentials.credentials)
    match = False
    for digest in digests:  # every digest is compared: the time does not tell which one matched
        match |= hmac.compare_digest(presented, digest)
    if not match:
        raise _unauthorized("unknown token")
    return presented


def require_token(request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None,
                                         Depends(_bearer)]) -> str:
    """Dependency of the job routes."""
    identity = identify(request, credentials)
    request.state.identity = identity
    return identity


def estimate_guard(request: Request) -> None:
    """Dependency of the estimate routes: open unless MEMPLAN_PROTECT_ESTIMATES is set.

    Reads the header itself (no security scheme in the contract), since these routes are open in
    the default configuration."""
    if not request.app.state.settings.protect_estimates:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    creds = (HTTPAuthorizationCredentials(scheme=scheme, credentials=token.strip())
             if scheme.lower() == "bearer" and token.strip() else None)
    identify(request, creds)


Identity = Annotated[str, Depends(require_token)]

_CHALLENGE = {"WWW-Authenticate": {"description": "Bearer realm=\"memplan\"",
                                   "schema": {"type": "string"}}}
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or unknown bearer token (only when tokens are configured)",
          "content": {"application/problem+json": {}}, "headers": _CHALLENGE},
}
# The estimate routes answer 401 only in a deployment that protects them.
ESTIMATE_AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or unknown bearer token (only when MEMPLAN_PROTECT_ESTIMATES "
          "is set and tokens are configured; send 'Authorization: Bearer TOKEN')",
          "content": {"application/problem+json": {}}, "headers": _CHALLENGE},
}


# ---- resource caps -----------------------------------------------------------------------------
class CapExceeded(Exception):
    """A job spec over the deployment's resource caps (422, each field and its cap)."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{f}: {r}" for f, r in violations))
        self.violations = violations


def check_caps(body: ValidationRequest, settings: Any) -> None:
    """Refuse, before it is queued, a job larger than this deployment runs."""
    real = body.mode == "real"
    mode = "real" if real else "traced"
    limits = {
        "num_layers": settings.max_real_layers if real else settings.max_traced_layers,
        "hidden_size": settings.max_real_hidden_size if real else settings.max_traced_hidden_size,
    }
    problems: list[tuple[str, str]] = []

    def over(field: str, value: float | None, cap: float, what: str) -> None:
        if value is not None and value > cap:
            problems.append((field, f"{value:g} is over this deployment's cap of {cap:g} {what}"))

    model = body.model
    if model.preset is not None or model.hf_config is not None:
        # A preset or config.json is checked by what it resolves to (an unknown name is the
        # catalog's 422, an unsupported config the planner's).
        try:
            resolved = resolve_model(model)
        except UnknownName:
            raise
        except ValueError:  # an unsupported config: the planner's 422 when it is estimated
            resolved = ResolvedModel(num_parameters=1, architecture_known=False)
        layers, hidden = resolved.num_layers, resolved.hidden_size
        where = "body.model.preset" if model.preset is not None else "body.model.hf_config"
        what = f"preset {model.preset!r}" if model.preset is not None else "the config"
        over(where, layers, limits["num_layers"], f"layers for a {mode} job ({what} has "
             f"{layers})")
        over(where, hidden, limits["hidden_size"], f"hidden size for a {mode} job ({what} has "
             f"{hidden})")
    else:
        over("body.model.num_layers", model.num_layers, limits["num_layers"],
             f"for a {mode} job")
        over("body.model.hidden_size", model.hidden_size, limits["hidden_size"],
             f"for a {mode} job")
    seq_cap = settings.max_real_sequence_length if real else settings.max_traced_sequence_length
    over("body.training.sequence_length", body.training.sequence_length, seq_cap,
         f"for a {mode} job")
    over("body.steps", body.steps, settings.max_steps, "steps")
    p = body.parallelism
    ranks = p.data_parallel * p.tensor_parallel * p.pipeline_parallel
    if ranks > settings.max_ranks:
        problems.append(("body.parallelism", f"{ranks} ranks (data x tensor x pipeline) is over "
                         f"this deployment's cap of {settings.max_ranks} ranks"))
    over("body.timeout_s", body.timeout_s, settings.job_timeout_cap_s, "seconds of wall clock")
    if problems:
        raise CapExceeded(problems)


# ---- idempotency -------------------------------------------------------------------------------
def request_hash(body: ValidationRequest) -> str:
    """SHA-256 of the request as validated (defaults filled in, canonical JSON): the same job
    asked for twice hashes the same whatever the spacing or key order of the two bodies."""
    return hashlib.sha256(body.model_dump_json().encode()).hexdigest()


# ---- request body size -------------------------------------------------------------------------
class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over this service's limit of {limit} bytes")


class BodyLimit:
    """413 for a body over ``limit`` bytes, before the route reads (or parses) it. The request
    layer in front of FastAPI (``service.front``) applies it to every HTTP request: a request
    with one Content-Length of digits within the limit passes as it is (the HTTP server delivers
    exactly that many bytes: h11 and httptools frame the body by it, so nothing is counted);
    any other goes through :meth:`admit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    async def admit(self, scope: dict, length: bytes | None, several: bool, receive: Any,
                    send: Any) -> Any:
        """The receive channel the request's body is read from, or None when the request has
        been answered here (413, or 400 for a Content-Length that is not a byte count).
        ``length``: the last Content-Length header's value; ``several``: there was more than
        one."""
        if length is not None and not several and length.isdigit():
            if int(length) > self.limit:
                await self._too_large(send, int(length))
                return None
            return receive
        if length is not None and await self._refuse_lengths(scope, send):
            return None
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # Raised inside the route's body read: FastAPI re-raises HTTPException and
                    # the problem+json handler answers it.
                    raise BodyTooLarge(self.limit)
            return message

        return counted

    async def _refuse_lengths(self, scope: dict, send: Any) -> bool:
        """Content-Length given otherwise than as one byte count: 400 when it is not a byte
        count, 413 when it is over the limit (True: answered)."""
        lengths = {value.strip() for name, value in scope.get("headers", ())
                   if name == b"content-length"}
        # RFC 9110 8.6: one decimal byte count (a list of equal counts is the same count).
        counts = {v.strip() for value in lengths for v in value.split(b",")}
        if len(counts) != 1 or not _DIGITS.fullmatch(next(iter(counts))):
            shown = ", ".join(sorted(v.decode("latin-1") for v in lengths))[:100]
            await _send_problem(send, 400, "Bad Request",
                                f"Content-Length {shown!r} is not a byte count (one "
                                "non-negative decimal integer)",
                                [{"name": "header.content-length",
                                  "reason": "must be one non-negative decimal integer"}])
            return True
        declared = int(next(iter(counts)))
        if declared > self.limit:
            await self._too_large(send, declared)
            return True
        return False

    async def _too_large(self, send: Any, declared: int) -> None:
        await _send_problem(send, 413, "Request Entity Too Large", f"request body of {declared} "
                            f"bytes is over this service's limit of {self.limit} bytes")


async def _send_problem(send: Any, status: int, title: str, detail: str,
                        invalid: list[dict[str, str]] | None = None) -> None:
    response: JSONResponse = problem_response(status, title, detail, invalid)
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in response.headers.items()]
                + [(b"connection", b"close")]})
    await send({"type": "http.response.body", "body": response.body})


# ---- requests that are not HTTP ----------------------------------------------------------------
class ProblemH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, answering a request h11 cannot parse (a Content-Length that is not
    a byte count, a malformed header line, ...) with a problem+json 400 naming what was wrong,
    where uvicorn answers a plain-text 'Invalid HTTP request received.'. Such a request never
    reaches the app: h11 refuses its head. ``memplan serve`` runs uvicorn with this protocol
    (with the uvicorn command: ``--http service.security:ProblemH11Protocol``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parse_error: str | None = None
        next_event = self.conn.next_event

        def next_event_noting_errors() -> Any:
            try:
                return next_event()
            except h11.RemoteProtocolError as exc:
                self.parse_error = str(exc)
                raise

        self.conn.next_event = next_event_noting_errors  # type: ignore[method-assign]

    def send_400_response(self, msg: str) -> None:
        error = (self.parse_error or "")[:200]
        invalid = None
        if "content-length" in error.lower():
            invalid = [{"name": "header.content-length",
                        "reason": f"{error}: must be one non-negative decimal integer"}]
        detail = f"not a valid HTTP/1.1 request: {error}" if error else msg
        body = problem_response(400, "Bad Request", detail, invalid).body
        headers = [(b"content-type", b"application/problem+json"),
                   (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def install(app: FastAPI) -> None:
    """The 422 handlers for resource caps and key reuse (the body-size middleware is one of the
    request layers ``service.app`` puts in front of the framework)."""

    @app.exception_handler(IdempotencyConflict)
    async def _reused_key(_: Request, exc: IdempotencyConflict) -> JSONResponse:
        return problem_response(422, "Idempotency-Key reused", f"{exc}; use a new key for a "
                                "new job", [{"name": "header.idempotency-key",
                                             "reason": "used before with a different request"}],
                                type_="https://memplan.dev/problems/idempotency-key-reused")

    @app.exception_handler(CapExceeded)
    async def _caps(_: Request, exc: CapExceeded) -> JSONResponse:
        return problem_response(422, "Over this deployment's resource caps", str(exc),
                                [{"name": f, "reason": r} for f, r in exc.violations],
                                type_="https://memplan.dev/problems/resource-cap")


__all__ = ["hash_token", "parse_token_digests", "require_token", "estimate_guard", "Identity",
           "AUTH_RESPONSES", "ESTIMATE_AUTH_RESPONSES", "CapExceeded", "check_caps",
           "request_hash", "BodyLimit", "ProblemH11Protocol", "install", "ANONYMOUS"]
