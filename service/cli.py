"""The ``memplan`` command line.

    memplan serve [--host H] [--port P] [--database-url URL] [--no-worker]
    memplan worker [--database-url URL] [--device KIND:COUNT:MEMORY]
    memplan validate SPEC.json [--json] [--server URL]
    memplan estimate [SPEC.json] [--json] [--preset NAME --precision P --optimizer O ...]
    memplan openapi [--out FILE]
    memplan hash-token TOKEN|-
    memplan pipeline SPEC.json [--json] [--svg FILE]
    memplan plan SPEC.json [--json]

Exit status: 0 success; 2 bad input (as argparse's usage errors); for ``validate`` 1 the job
failed or was cancelled and 3 the server is unreachable; for ``estimate`` 3 the setup does not fit
on the given GPU or memory (0 when it fits, or when no hardware is given); for ``plan`` 3 when no
layout fits at any cluster size.
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
EXIT_DOES_NOT_FIT = 3  # memplan estimate
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

    from planner.machine import collector
    from service.app import create_app
    from service.jobs.embedded import EmbeddedWorker
    from service.security import ProblemH11Protocol

    settings = _settings(args)
    _logging(settings)
    app = create_app(settings)
    collector.tune()  # everything is imported and built: out of the cyclic collector's way
    embedded = None
    if not args.no_worker:
        embedded = EmbeddedWorker(app.state.jobs.get(), settings)
        embedded.start()
    try:
        # uvicorn handles SIGINT/SIGTERM: it stops serving and returns here.
        # Logging stays as configured above; the app writes its own access lines (request ids).
        # ProblemH11Protocol: a request h11 cannot parse gets a problem+json 400, not plain text.
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info",
                    log_config=None, access_log=False, http=ProblemH11Protocol)
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
    from planner.catalog.specs import ValidationRequest

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

    from planner.catalog.validation_specs import ValidationJob

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
    if args.hf_config is not None:
        put("model.hf_config", _read_hf_config(args.hf_config))
    put("training.implementation", args.implementation)
    put("training.attention", args.attention)
    put("training.precision", args.precision)
    put("training.optimizer", args.optimizer)
    put("training.micro_batch_size", args.micro_batch_size)
    put("training.sequence_length", args.sequence_length)
    put("training.activation_checkpointing.strategy",
        args.checkpointing or _implied_checkpointing(args))
    put("training.activation_checkpointing.every_k", args.every_k)
    put("training.activation_checkpointing.budget_bytes",
        None if args.checkpoint_budget_gib is None else round(args.checkpoint_budget_gib * 2**30))
    put("training.activation_checkpointing.blocks", args.checkpoint_blocks)
    put("training.loss.kind", args.loss)
    put("training.loss.chunks", args.loss_chunks)
    put("parallelism.data_parallel", args.data_parallel)
    put("parallelism.tensor_parallel", args.tensor_parallel)
    put("parallelism.pipeline_parallel", args.pipeline_parallel)
    put("parallelism.zero_stage", args.zero_stage)
    put("parallelism.fsdp_mixed_precision", True if args.fsdp_mixed_precision else None)
    put("parallelism.expert_parallel", args.expert_parallel)
    put("hardware.gpu", args.gpu)
    return out


def _read_hf_config(path: str) -> dict[str, Any]:
    """A Hugging Face config.json, read from a local file (nothing is downloaded)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise InputError(f"--hf-config: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise InputError(f"--hf-config: {path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"--hf-config: {path} holds no JSON object (a config.json is one)")
    return data


def _implied_checkpointing(args: argparse.Namespace) -> str | None:
    """The strategy a checkpointing field flag implies when --checkpointing is not given."""
    if args.every_k is not None:
        if args.checkpoint_budget_gib is not None or args.checkpoint_blocks is not None:
            raise InputError("--every-k belongs to --checkpointing every-k, "
                             "--checkpoint-budget-gib and --checkpoint-blocks to budget or "
                             "blocks: give one strategy")
        return "every-k"
    if args.checkpoint_budget_gib is not None:
        return "budget"
    if args.checkpoint_blocks is not None:
        return "blocks"
    return None


def _check_checkpointing_flags(args: argparse.Namespace, strategy: str) -> None:
    """A field flag the final strategy would ignore is an error, not a silent no-op."""
    if args.every_k is not None and strategy != "every-k":
        raise InputError(f"--every-k applies to --checkpointing every-k, not {strategy!r}")
    if args.checkpoint_budget_gib is not None and strategy != "budget":
        raise InputError(f"--checkpoint-budget-gib applies to --checkpointing budget, "
                         f"not {strategy!r}")


def cmd_estimate(args: argparse.Namespace) -> int:
    from planner.catalog.presets import UnknownName
    from planner.machine import collector
    from planner.routes.memory import estimate_memory
    from planner.catalog.specs import MemoryRequest

    collector.tune()  # the planner is imported: out of the cyclic collector's way
    overrides = _estimate_overrides(args)
    if args.spec:
        request = load_spec(args.spec, MemoryRequest, overrides)
    elif overrides.get("model"):
        request = validate(MemoryRequest, overrides)
    else:
        raise InputError("give a SPEC.json or at least --preset NAME or --hf-config "
                         "config.json (see memplan estimate -h)")
    _check_checkpointing_flags(args, request.training.activation_checkpointing.strategy)
    from planner.hf.errors import ExtraMissing

    try:
        result = estimate_memory(request)
    except (UnknownName, ExtraMissing) as exc:
        raise InputError(str(exc)) from None
    except ValueError as exc:
        raise InputError(f"cannot plan this setup: {exc}") from None
    status = 0 if result.fit is None or result.fit.fits else EXIT_DOES_NOT_FIT
    if args.json:
        print(_dump(result))
        if status:
            _err(f"memplan estimate: does not fit on "
                 f"{result.fit.gpu or human_bytes(result.fit.memory_bytes)} (exit status 3)")
        return status
    name = result.model.name or (f"{result.model.model_type} config" if result.model.model_type
                                 else f"{result.model.num_parameters:,} parameters")
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
    for sug in result.suggestions:
        print(f"fits with: {sug.change} (peak {human_bytes(sug.peak_bytes)}, headroom "
              f"{human_bytes(sug.headroom_bytes)})")
    return status


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
        from planner.routes.pipeline import PipelineRequest, plan_pipeline
        from planner.routes.pipeline_svg import render_svg
    except ImportError as exc:
        raise InputError(f"pipeline simulation is not available in this build ({exc})") from None

    request = load_spec(args.spec, PipelineRequest)
    try:
        result = plan_pipeline(request)
    except ValueError as exc:
        raise InputError(f"cannot simulate this schedule: {exc}") from None
    if args.svg:
        Path(args.svg).write_text(render_svg(result))
    if args.json:
        print(_dump(result))
    else:
        print(pipeline_summary(result, _pipeline_rank_memory(request, result)))
        if args.svg:
            print(f"timeline written to {args.svg}")
    return 0


def _seconds(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(s) >= scale:
            return f"{s / scale:,.3f} {unit}"
    return f"{s * 1e9:.3f} ns" if s else "0 s"


def _pipeline_rank_memory(request: Any, result: Any) -> list[Any] | None:
    """With a model setup: every rank's replayed step (planner.layouts.pipeline_memory) for the simulated
    schedule, or None where that replay does not cover the setup."""
    if request.setup is None:
        return None
    from planner.catalog.presets import resolve_model
    from planner.layouts.pipelined import pipelined_estimate

    setup = request.setup
    training = setup.training.model_copy(update={"gradient_accumulation_steps":
                                                 result.microbatches})
    parallel = setup.parallelism.model_copy(update={
        "pipeline_parallel": result.stages, "virtual_pipeline_stages": result.virtual_stages,
        "pipeline_schedule": result.schedule})
    try:
        estimate = pipelined_estimate(resolve_model(setup.model), training, parallel, "cuda")
    except ValueError:
        return None
    return None if estimate is None else sorted(estimate[1], key=lambda pk: pk.rank)


def pipeline_summary(result: Any, rank_memory: list[Any] | None = None) -> str:
    """The schedule's figures per rank; activation memory in bytes where a setup's ranks were
    replayed, else in units of one stage's activations for one micro-batch."""
    chunks = "1 stage" if result.virtual_stages == 1 else f"{result.virtual_stages} stages"
    lines = [(f"pipeline {result.schedule}: {result.stages} ranks x {chunks} each, "
              f"{result.microbatches} micro-batches"),
             (f"step time: {_seconds(result.makespan_s)}   bubble fraction: "
              f"{result.bubble_fraction:.1%}   p2p message: {_seconds(result.p2p_message_s)}   "
              f"bottleneck rank: {result.bottleneck_rank}")]
    header = ["rank", "stages", "busy", "idle", "in-flight micro-batches"]
    if rank_memory is not None:
        header += ["activations", "peak memory"]
        mem = {pk.rank: pk.steady for pk in rank_memory}
    else:
        header += ["activations (stage-micro-batches)"]
    rows = []
    for r in result.ranks:
        row = [str(r.rank), ",".join(map(str, r.stages)), _seconds(r.busy_s),
               _seconds(r.idle_s), str(r.peak_in_flight_microbatches)]
        if rank_memory is not None:
            snap = mem[r.rank]
            row += [human_bytes(snap.as_dict()["activations"]), human_bytes(snap.total)]
        else:
            row += [f"{r.peak_in_flight_stage_equivalents:g}"]
        rows.append(row)
    lines.append(_table(header, rows))
    if rank_memory is None:
        lines.append("activations: in units of one stage's activations for one micro-batch "
                     "(a setup gives bytes)")
    else:
        lines.append("activations, peak memory: each rank's steady-state peak (reference step, "
                     "replayed op by op)")
    for a in result.assumptions:
        lines.append(f"assumption: {a.name} = {a.value}")
    if result.timeline_omitted:
        lines.append(f"timeline: {result.timeline_omitted}")
    elif result.timeline is not None:
        lines.append(f"timeline: {len(result.timeline)} actions (--json lists them, --svg FILE "
                     "draws them)")
    return "\n".join(lines)


def cmd_hash_token(args: argparse.Namespace) -> int:
    from service.security import hash_token

    token = sys.stdin.readline().strip() if args.token == "-" else args.token
    if not token:
        raise InputError("empty token")
    print(hash_token(token))
    return 0


# ---- parser ------------------------------------------------------------------------------------
ESTIMATE_EPILOG = """\
exit status:
  0  the setup fits on the GPU (--gpu, or hardware in SPEC.json), or no hardware was given
  2  invalid input: a usage error, an unreadable or invalid SPEC.json, an unknown preset or GPU,
     a setup that cannot be planned
  3  the setup does not fit (the estimate is printed all the same, with --json too; the text
     output says what to change)

GPU and preset names are matched without regard to case (A100-80GB is a100-80gb)."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _block_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of block indices: "
                                         f"{text!r}") from None


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

    p = sub.add_parser("estimate", help="per-device memory breakdown",
                       description="Per-device peak memory of one training step, by category, "
                       "and whether it fits on the GPU.\nFlags override the fields of SPEC.json.",
                       epilog=ESTIMATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", metavar="SPEC.json", nargs="?", help="a MemoryRequest ('-' for stdin)")
    p.add_argument("--json", action="store_true", help="print the result object as JSON (the "
                   "exit status is the same)")
    p.add_argument("--preset", help="model preset name (GET /v1/models), e.g. llama-2-7b")
    p.add_argument("--hf-config", metavar="config.json", help="a Hugging Face config.json file "
                   "as the model (e.g. a model card's config.json; read locally)")
    p.add_argument("--implementation", help="reference (default), megatron or transformers "
                   "(the Hugging Face model code; needs memplan[hf])")
    p.add_argument("--attention", help="sdpa or eager")
    p.add_argument("--precision")
    p.add_argument("--optimizer")
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--sequence-length", type=int)
    p.add_argument("--checkpointing", metavar="STRATEGY", help="activation checkpointing: none, "
                   "full, every-k, sqrt, selective, budget or blocks")
    p.add_argument("--every-k", type=int, metavar="K", help="checkpoint every K-th block "
                   "(implies --checkpointing every-k)")
    p.add_argument("--checkpoint-budget-gib", type=_positive_float, metavar="GIB",
                   help="peak-memory budget per device in GiB (implies --checkpointing budget; "
                   "default budget: the GPU's memory)")
    p.add_argument("--checkpoint-blocks", type=_block_list, metavar="I,J,...",
                   help="checkpointed block indices (implies --checkpointing blocks; with "
                   "budget: a resolved plan)")
    p.add_argument("--loss", metavar="KIND", help="cross-entropy loss: standard, chunked "
                   "(torchtune-style chunked output) or chunked-linear (head + loss recomputed "
                   "per chunk in backward)")
    p.add_argument("--loss-chunks", type=int, metavar="N", help="token chunks of a chunked loss")
    p.add_argument("--data-parallel", type=int)
    p.add_argument("--tensor-parallel", type=int)
    p.add_argument("--pipeline-parallel", type=int)
    p.add_argument("--zero-stage", type=int)
    p.add_argument("--fsdp-mixed-precision", action="store_true",
                   help="mixed-bf16 on zero-stage 3 as FSDP2's MixedPrecisionPolicy runs it "
                   "(fp32 sharded parameters, bf16 compute, fp32 reduce-scatter)")
    p.add_argument("--expert-parallel", type=int, help="MoE models: ranks the routed experts "
                   "are split over (divides the experts and --data-parallel)")
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

    p = sub.add_parser("pipeline", help="simulate a pipeline schedule",
                       description="Simulate a pipeline schedule (a PipelineRequest) and print a "
                       "summary: bubble, step time, per-rank in-flight micro-batches and "
                       "activation memory.")
    p.add_argument("spec", metavar="SPEC.json", help="a PipelineRequest ('-' for stdin)")
    p.add_argument("--svg", metavar="FILE", help="write the timeline as SVG")
    p.add_argument("--json", action="store_true", help="print the full result object as JSON "
                   "(every action's start and end included)")
    p.set_defaults(fn=cmd_pipeline)

    from service.plan_cli import add_parser
    add_parser(sub)
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
