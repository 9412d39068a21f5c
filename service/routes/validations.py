"""Validation jobs: run the reference training step and compare it with the estimate."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Annotated, Iterator

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
from sqlalchemy.exc import SQLAlchemyError

from planner.catalog.presets import UnknownName
from planner.catalog.specs import ValidationRequest
from planner.catalog.validation_specs import JobStatus, ValidationJob, ValidationPage
from service.errors import ERROR_RESPONSES, PROBLEM, PlanError, Problem, ProblemRoute
from service.jobs.store import (BadCursor, JobFinished, JobNotFound, JobStore, MAX_PAGE,
                                NoWorkerCanRun, QueueFull)
from service.logs import bind_job
from service.security import AUTH_RESPONSES, Identity, check_caps, request_hash, require_token

# Every job route needs a bearer token when the deployment configures tokens.
router = APIRouter(prefix="/v1", tags=["validations"], dependencies=[Depends(require_token)],
                   responses=AUTH_RESPONSES, route_class=ProblemRoute)
# How long a client over its queued-jobs cap is asked to wait before trying again.
QUEUE_FULL_RETRY_AFTER_S = 10


def get_store(request: Request) -> JobStore:
    """The app's job store, opened (and migrated) on first use."""
    with store_errors():
        return request.app.state.jobs.get()


StoreDep = Annotated[JobStore, Depends(get_store)]


@contextmanager
def store_errors() -> Iterator[None]:
    """A database that cannot be reached is a 503 with Retry-After, never a 500."""
    try:
        yield
    except (SQLAlchemyError, OSError) as exc:
        raise HTTPException(503, f"job store unavailable ({type(exc).__name__}); retry shortly",
                            headers={"Retry-After": "2"}) from exc


def _problem(status: int, description: str) -> dict:
    return {"model": Problem, "content": {PROBLEM: {}}, "description": description}


NOT_FOUND = {404: _problem(404, "No job with this id")}
UNAVAILABLE = {503: _problem(503, "The job store cannot be reached")}


def _not_found(job_id: str) -> HTTPException:
    return HTTPException(404, f"no validation job with id {job_id!r}")


@router.post("/validations", status_code=202,
             responses={**ERROR_RESPONSES, **UNAVAILABLE,
                        413: _problem(413, "Request body over the service's size limit"),
                        429: _problem(429, "Too many queued jobs for this token (see "
                                      "Retry-After)"),
                        202: {"headers": {"Location": {"description": "URL of the new job",
                                                       "schema": {"type": "string"}}}}})
def create_validation(
    body: ValidationRequest, request: Request, response: Response, store: StoreDep,
    identity: Identity,
    idempotency_key: Annotated[str | None, Header(
        min_length=1, max_length=200, description="Retry-safe submission: the same key with the "
        "same body returns the job the first request created; with a different body, 422.")] = None,
) -> ValidationJob:
    """Queue a validation job: run this training setup for real (or traced) and compare.

    Refused before it is queued (422): what the validation runner does not run, whatever worker
    took it; and a real job that no live worker of its device class can hold (the estimate
    against each worker's advertised device memory). A job whose device no live worker has is
    queued and says so in ``waiting_reason``."""
    from planner.catalog.errors import PlanningError
    from planner.hf.errors import ExtraMissing
    from service.jobs.requirements import requirements_for, runner_refusal

    settings = request.app.state.settings
    check_caps(body, settings)
    try:
        requirements = requirements_for(body)
    except UnknownName:
        raise
    except PlanningError as exc:
        raise PlanError(exc.detail, field=f"body.{exc.field}" if exc.field else None) from exc
    except ExtraMissing as exc:
        raise PlanError(exc.detail, field="body.training.implementation", status=503) from exc
    except (ValueError, ArithmeticError) as exc:
        raise PlanError(str(exc)) from exc
    refusal = runner_refusal(body)
    if refusal is not None:
        field, reason = refusal
        raise PlanError(reason, field=field)
    with store_errors():
        try:  # a reused Idempotency-Key with another body is the 422 of service.security
            job, _ = store.submit_once(
                body, requirements, timeout_s=min(body.timeout_s, settings.job_timeout_cap_s),
                owner=identity, idempotency_key=idempotency_key, request_hash=request_hash(body),
                max_queued=settings.max_queued_per_token, check_workers=True)
        except NoWorkerCanRun as exc:
            raise PlanError(str(exc), field=exc.field) from None
        except QueueFull as exc:
            raise HTTPException(429, f"{exc}; retry when some have started",
                                headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)}) from None
    bind_job(job.id)
    response.headers["Location"] = str(request.url_for("get_validation", job_id=job.id).path)
    return job


@router.get("/validations/{job_id}", responses={**NOT_FOUND, **UNAVAILABLE})
def get_validation(job_id: str, store: StoreDep) -> ValidationJob:
    """A job: status, progress (phase, step i of N) and, once succeeded, the comparison; while
    queued with no live worker able to run it, ``waiting_reason``."""
    bind_job(job_id)
    with store_errors():
        try:
            return store.get(job_id)
        except JobNotFound:
            raise _not_found(job_id) from None


@router.get("/validations", responses={**ERROR_RESPONSES, **UNAVAILABLE})
def list_validations(
    store: StoreDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
    cursor: Annotated[str | None, Query(max_length=200,
                                        description="next_cursor of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Page size.")] = 50,
) -> ValidationPage:
    """Jobs, newest first, a page at a time (follow ``next_cursor``)."""
    with store_errors():
        try:
            return store.list(status=status, cursor=cursor, limit=limit)
        except BadCursor as exc:
            raise PlanError(str(exc), field="query.cursor") from None


@router.delete("/validations/{job_id}",
               responses={**NOT_FOUND, **UNAVAILABLE,
                          409: _problem(409, "The job has already finished")})
def cancel_validation(job_id: str, store: StoreDep) -> ValidationJob:
    """Cancel a queued or running job (a running job's process is stopped)."""
    bind_job(job_id)
    with store_errors():
        try:
            return store.cancel(job_id)
        except JobNotFound:
            raise _not_found(job_id) from None
        except JobFinished as exc:
            raise HTTPException(409, f"job {job_id} has already {exc.job.status}; "
                                "only queued or running jobs can be cancelled") from None
