"""The ``memplan`` command line.

    memplan serve [--host H] [--port P] [--database-url URL] [--no-worker]
    memplan worker [--database-url URL] [--device KIND:COUNT:MEMORY]
    memplan validate SPEC.json [--json] [--server URL]
    memplan estimate [SPEC.json] [--json] [--preset NAME --precision P --optimizer O ...]
    memplan openapi [--out FILE]
    memplan hash-token TOKEN|-
    memplan pipeline SPEC.json --svg FILE

Exit status: 0 success; 1 the job failed or was cancelled; 2 bad input; 3 server unreachable.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ValidationError

EXIT_FAILED, EXIT_INPUT, EXIT_UNREACHABLE = 1, 2, 3
CATEGORIES = ("parameters", "gradients", "optimizer_states", "activations", "temporaries", "total")


class InputError(Exception):
    """Bad input: printed as is, exit status 2."""


# ---- helpers -----------------------------------------------------------------------------------
def _err(*lines: str) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def describe_validation_error(exc: ValidationError) -> str:
    lines = [f"invalid input ({exc.error_count()} problem{'s' if exc.error_count() > 1 else ''}):"]
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ())) or "(top level)"
        lines.append(f"  {loc}: {e.get('msg', 'invalid')}")
    return "\n".join(lines)


def load_spec(path: str, model: type[BaseModel], extra: dict[str, Any] | None = None) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None
    if extra:
        data = _merge(data, extra)
    return validate(model, data)


def validate(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InputError(describe_validation_error(exc)) from None


def _merge(base: Any, extra: dict[str, Any]) -> Any:
    if not isinstance(base, dict):
        return base
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.1f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def comparison_table(result: Any) -> str:
    rows = [(k, human_bytes(getattr(result.estimate, k)), human_bytes(getattr(result.measured, k)),
             _pct(getattr(result.relative_error, k))) for k in CATEGORIES]
    lines = [_table(("category", "estimate", "measured", "error%"), rows)]
    lines.append(f"device: {result.device}   mode: {result.mode}"
                 + (f"   peak at: {result.peak_op}" if result.peak_op else "")
                 + (f"   step time: {result.step_time_s:.4f} s" if result.step_time_s else ""))
    if getattr(result, "pipeline", None) is not None:
        lines.append(pipeline_table(result.pipeline))
    return "\n".join(lines)


def pipeline_table(pv: Any) -> str:
    """The pipelined step per rank against the simulator (measured F/I/W fed to it)."""
    def ms(s: float) -> str:
        return f"{s * 1e3:.2f}"

    rows = [(str(r.rank), "yes" if r.action_order_matches else f"no (at {r.first_mismatch})",
             f"{r.in_flight_measured}/{r.in_flight_simulated}",
             f"{ms(r.busy_s_measured)}/{ms(r.busy_s_simulated)}",
             f"{ms(r.idle_s_measured)}/{ms(r.idle_s_simulated)}",
             human_bytes(r.peak_memory.total)) for r in pv.ranks]
    head = (f"pipeline {pv.schedule}: {pv.stages} ranks x {pv.virtual_stages} stages, "
            f"{pv.microbatches} micro-batches   action order: "
            f"{'matches' if pv.action_order_matches else 'DIFFERS'}   in-flight: "
            f"{'matches' if pv.in_flight_matches else 'DIFFERS'}")
    table = _table(("rank", "order", "in-flight meas/sim", "busy ms meas/sim",
                    "idle ms meas/sim", "peak memory"), rows)
    tail = (f"makespan: measured {ms(pv.makespan_s_measured)} ms, simulated "
            f"{ms(pv.makespan_s_simulated)} ms ({_pct(pv.makespan_relative_error)})   "
            f"simulated bubble: {pv.bubble_fraction_simulated:.1%}\nmemory: {pv.memory_note}")
    return f"{head}\n{table}\n{tail}"


def _dump(model: BaseModel) -> str:
    return json.dumps(model.model_dump(mode="json"), indent=2)


def _settings(args: argparse.Namespace) -> Any:
    from service.settings import Settings

    try:
        return Settings.from_env(
            database_url=getattr(args, "database_url", None), host=getattr(args, "host", None),
            port=getattr(args, "port", None), worker_device=getattr(args, "device", None))
    except (ValidationError, ValueError) as exc:
        raise InputError(describe_validation_error(exc) if isinstance(exc, ValidationError)
                         else str(exc)) from None


def _logging(settings: Any) -> None:
    from service.logs import configure

    configure(settings.log_format)  # JSON lines by default (MEMPLAN_LOG_FORMAT=text for plain)


# ---- serve / worker ----------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.jobs.embedded import EmbeddedWorker

    settings = _settings(args)
    _logging(settings)
    app = create_app(settings)
    embedded = None
    if not args.no_worker:
        embedded = EmbeddedWorker(app.state.jobs.get(), settings)
        embedded.start()
    try:
        # uvicorn handles SIGINT/SIGTERM: it stops serving and returns here.
        # Logging stays as configured above; the app writes its own access lines (request ids).
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info",
                    log_config=None, access_log=False)
    finally:
        if embedded is not None:
            embedded.stop()
        app.state.jobs.close()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from service.jobs.worker import Worker

    settings = _settings(args)
    _logging(settings)
    store = _open_store_with_retry(settings)
    worker = Worker(store, settings)

    def stop(signum: int, _: Any) -> None:
        logging.getLogger("memplan.worker").info("signal %d: finishing or releasing the job in "
                                                 "hand, then exiting", signum)
        worker.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        worker.run(max_jobs=args.max_jobs)
    finally:
        store.close()
    return 0


def _open_store_with_retry(settings: Any, wait_s: float = 60.0) -> Any:
    from sqlalchemy.exc import SQLAlchemyError

    from service.jobs.store import JobStore

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return JobStore.from_settings(settings)
        except SQLAlchemyError as exc:
            if time.monotonic() > deadline:
                raise InputError(f"cannot open the job store at {settings.database_url}: "
                                 f"{type(exc).__name__}") from None
            time.sleep(1.0)


# ---- validate ----------------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    from planner.specs import ValidationRequest

    request = load_spec(args.spec, ValidationRequest)
    if args.server:
        return _validate_remote(args, request)
    return _validate_local(args, request)


def _progress_bar(status: str, phase: str, step: int, total: int, width: int = 30) -> str:
    filled = int(width * step / total) if total else 0
    return f"\r[{'#' * filled}{'.' * (width - filled)}] {status:<9} {phase} {step}/{total}   "


def _report(args: argparse.Namespace, result: Any, error: str | None, status: str) -> int:
    if result is not None:
        print(_dump(result) if args.json else comparison_table(result))
        return 0
    _err(f"validation {status}: {error}")
    return EXIT_FAILED


def _validate_local(args: argparse.Namespace, request: Any) -> int:
    """Run the job here, in a spawned process, with the same fit check and limit as a worker."""
    from service.jobs.executors import SpawnedProcessExecutor
    from service.jobs.requirements import requirements_for
    from service.settings import Settings

    settings = Settings.from_env()
    try:
        requirements = requirements_for(request)
    except ValueError as exc:
        raise InputError(f"cannot plan this setup: {exc}") from None
    execution = SpawnedProcessExecutor(settings.job_target).start(request,
                                                                  requirements.peak_bytes)
    limit_s = min(request.timeout_s, settings.job_timeout_cap_s)
    deadline = time.monotonic() + limit_s
    tty = sys.stderr.isatty()
    try:
        while execution.outcome is None:
            for p in execution.poll(0.25):
                if tty:
                    sys.stderr.write(_progress_bar("running", p.phase, p.step, p.total_steps))
            if execution.outcome is None and time.monotonic() > deadline:
                execution.kill()
                if tty:
                    sys.stderr.write("\n")
                return _report(args, None, f"timed out after {limit_s:g} s", "failed")
    except KeyboardInterrupt:
        execution.kill()
        _err("\ninterrupted")
        return 130
    if tty:
        sys.stderr.write("\n")
    outcome = execution.outcome
    return _report(args, outcome.result, outcome.error, "failed")


def _validate_remote(args: argparse.Namespace, request: Any) -> int:
    import httpx

    from planner.specs import ValidationJob

    base = args.server.rstrip("/")
    with httpx.Client(base_url=base, timeout=30) as client:
        try:
            r = client.post("/v1/validations", content=request.model_dump_json(),
                            headers={"content-type": "application/json"})
        except httpx.HTTPError as exc:
            _err(f"cannot reach {base}: {exc}")
            return EXIT_UNREACHABLE
        if r.status_code != 202:
            _err(f"server refused the job ({r.status_code}): {_problem_text(r)}")
            return EXIT_INPUT if r.status_code in (400, 409, 422) else EXIT_FAILED
        job = ValidationJob.model_validate(r.json())
        location = r.headers.get("location", f"/v1/validations/{job.id}")
        _err(f"job {job.id} queued")
        unreachable_since: float | None = None
        while job.status in ("queued", "running"):
            sys.stderr.write(_progress_bar(job.status, job.progress.phase, job.progress.step,
                                           job.progress.total_steps))
            sys.stderr.flush()
            time.sleep(args.poll_s)
            try:
                r = client.get(location)
                if r.status_code >= 500:
                    raise httpx.HTTPStatusError("server error", request=r.request, response=r)
                r.raise_for_status()
            except httpx.HTTPError as exc:
                # The API may be restarting: keep polling for a while; the job lives in the store.
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > args.patience_s:
                    _err(f"\nlost contact with {base} for {args.patience_s:g} s ({exc}); "
                         f"the job continues: {base}{location}")
                    return EXIT_UNREACHABLE
                continue
            unreachable_since = None
            job = ValidationJob.model_validate(r.json())
        sys.stderr.write(_progress_bar(job.status, job.progress.phase, job.progress.step,
                                       job.progress.total_steps) + "\n")
    return _report(args, job.result, job.error, job.status)


def _problem_text(r: Any) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:500]
    return body.get("detail") or body.get("title") or json.dumps(body)


# ---- estimate ----------------------------------------------------------------------------------
def _estimate_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def put(path: str, value: Any) -> None:
        if value is None:
            return
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    put("model.preset", args.preset)
    put("training.precision", args.precision)
    put("training.optimizer", args.optimizer)
    put("training.micro_batch_size", args.micro_batch_size)
    put("training.sequence_length", args.sequence_length)
    put("training.activation_checkpointing.strategy", args.checkpointing)
    put("parallelism.data_parallel", args.data_parallel)
    put("parallelism.tensor_parallel", args.tensor_parallel)
    put("parallelism.pipeline_parallel", args.pipeline_parallel)
    put("parallelism.zero_stage", args.zero_stage)
    put("hardware.gpu", args.gpu)
    return out


def cmd_estimate(args: argparse.Namespace) -> int:
    from planner.catalog import UnknownName
    from planner.memory import estimate_memory
    from planner.specs import MemoryRequest

    overrides = _estimate_overrides(args)
    if args.spec:
        request = load_spec(args.spec, MemoryRequest, overrides)
    elif overrides.get("model"):
        request = validate(MemoryRequest, overrides)
    else:
        raise InputError("give a SPEC.json or at least --preset NAME (see memplan estimate -h)")
    try:
        result = estimate_memory(request)
    except UnknownName as exc:
        raise InputError(str(exc)) from None
    except ValueError as exc:
        raise InputError(f"cannot plan this setup: {exc}") from None
    if args.json:
        print(_dump(result))
        return 0
    name = result.model.name or f"{result.model.num_parameters:,} parameters"
    print(f"model: {name} ({result.model.num_parameters:,} parameters)")
    rows = [(k, human_bytes(getattr(result.breakdown, k)), f"{getattr(result.breakdown, k):,}")
            for k in CATEGORIES]
    print(_table(("category", "per device", "bytes"), rows))
    print(f"peak phase: {result.peak_phase}   allocator reserve: "
          f"{human_bytes(result.allocator_reserve_bytes)}")
    if result.fit is not None:
        f = result.fit
        print(f"fits on {f.gpu or human_bytes(f.memory_bytes)}: {'yes' if f.fits else 'no'} "
              f"(headroom {human_bytes(f.headroom_bytes)}"
              + (f", largest micro-batch {f.max_micro_batch_size}"
                 if f.max_micro_batch_size is not None else "") + ")")
    for note in result.notes:
        print(f"note: {note}")
    return 0


# ---- openapi / pipeline ------------------------------------------------------------------------
def cmd_openapi(args: argparse.Namespace) -> int:
    from service.app import create_app
    from service.settings import Settings

    # The contract does not depend on settings; never touch a database to print it.
    doc = create_app(Settings(database_url="sqlite://")).openapi()
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    try:
        from planner.pipeline import PipelineRequest, plan_pipeline
        from planner.pipeline_svg import render_svg
    except ImportError as exc:
        raise InputError(f"pipeline simulation is not available in this build ({exc})") from None

    request = load_spec(args.spec, PipelineRequest)
    try:
        result = plan_pipeline(request)
    except ValueError as exc:
        raise InputError(f"cannot simulate this schedule: {exc}") from None
    if args.svg:
        Path(args.svg).write_text(render_svg(result))
    if args.json or not args.svg:
        print(_dump(result))
    return 0


def cmd_hash_token(args: argparse.Namespace) -> int:
    from service.security import hash_token

    token = sys.stdin.readline().strip() if args.token == "-" else args.token
    if not token:
        raise InputError("empty token")
    print(hash_token(token))
    return 0


# ---- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memplan", description="Memory and parallelism "
                                     "planner for training large models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="API + one embedded worker (SQLite by default)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--database-url")
    p.add_argument("--device", help="override the detected device: KIND:COUNT:MEMORY")
    p.add_argument("--no-worker", action="store_true", help="API only")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("worker", help="a standalone worker against a shared job store")
    p.add_argument("--database-url")
    p.add_argument("--device", help="override the detected device: KIND:COUNT:MEMORY")
    p.add_argument("--max-jobs", type=int, help="exit after this many jobs")
    p.set_defaults(fn=cmd_worker)

    p = sub.add_parser("validate", help="run a validation job and compare estimate and measurement")
    p.add_argument("spec", metavar="SPEC.json", help="a ValidationRequest ('-' for stdin)")
    p.add_argument("--json", action="store_true", help="print the result object as JSON")
    p.add_argument("--server", metavar="URL", help="submit to a memplan service instead")
    p.add_argument("--poll-s", type=float, default=0.5, help=argparse.SUPPRESS)
    p.add_argument("--patience-s", type=float, default=120.0,
                   help="how long to keep polling an unreachable server")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("estimate", help="per-device memory breakdown")
    p.add_argument("spec", metavar="SPEC.json", nargs="?", help="a MemoryRequest ('-' for stdin)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--preset")
    p.add_argument("--precision")
    p.add_argument("--optimizer")
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--sequence-length", type=int)
    p.add_argument("--checkpointing", help="activation checkpointing strategy")
    p.add_argument("--data-parallel", type=int)
    p.add_argument("--tensor-parallel", type=int)
    p.add_argument("--pipeline-parallel", type=int)
    p.add_argument("--zero-stage", type=int)
    p.add_argument("--gpu")
    p.set_defaults(fn=cmd_estimate)

    p = sub.add_parser("hash-token", help="print the SHA-256 digest of an API token, for "
                       "MEMPLAN_API_TOKENS")
    p.add_argument("token", metavar="TOKEN", help="the token ('-' reads it from stdin, which "
                   "keeps it out of the shell history)")
    p.set_defaults(fn=cmd_hash_token)

    p = sub.add_parser("openapi", help="print the OpenAPI document")
    p.add_argument("--out", metavar="FILE")
    p.set_defaults(fn=cmd_openapi)

    p = sub.add_parser("pipeline", help="simulate a pipeline schedule")
    p.add_argument("spec", metavar="SPEC.json")
    p.add_argument("--svg", metavar="FILE", help="write the timeline as SVG")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_pipeline)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except InputError as exc:
        _err(f"memplan {args.command}: {exc}")
        return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())
