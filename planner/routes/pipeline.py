"""Pipeline schedules: request/result models, per-stage costs, and the planning entry point.

Orders live in ``planner.layouts.pipeline_schedules``, the event simulation in ``planner.layouts.pipeline_sim``,
the SVG picture in ``planner.routes.pipeline_svg``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from planner.catalog.errors import PlanningError
from planner.catalog.presets import get_gpu, hf_config_of, resolve_model
from planner.layouts.expert import validate as validate_expert_parallel
from planner.catalog.parameters import count_parameters
from planner.layouts.pipeline_schedules import ScheduleConstraintError, build_schedule
from planner.layouts.pipeline_sim import peak_in_flight, simulate
from planner.catalog.specs import MAX_STAGE_MICROBATCHES, Assumption, MemoryRequest, PipelineScheduleName

# ---- documented input limits -------------------------------------------------------------------
MAX_STAGES = 1024
MAX_MICROBATCHES = 65_536
MAX_VIRTUAL_STAGES = 64
MAX_COST_S = 1e6
MAX_TIMELINE_EVENTS = 50_000
DEFAULT_MFU = 0.5  # Narayanan et al. 2021 report 52% of A100 peak for GPT-3-sized models (Table 1)

Seconds = Annotated[float, Field(ge=0, le=MAX_COST_S, allow_inf_nan=False)]
StageSeconds = Seconds | Annotated[list[Seconds], Field(min_length=1,
                                                         max_length=MAX_STAGES * MAX_VIRTUAL_STAGES)]
Kind = Literal["F", "B", "I", "W"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PipelineCosts(_Frozen):
    """Per-stage compute times and the point-to-point link. A scalar applies to every stage; a list
    has one entry per stage (length ``stages``: each of a rank's v chunks then costs 1/v of it) or
    one per virtual stage (length ``stages * virtual_stages``, in pipeline order, used as is)."""

    forward_s: StageSeconds = Field(1.0, description="Forward time of one micro-batch on a stage.")
    backward_input_s: StageSeconds = Field(
        1.0, description="Backward for the stage's inputs (I); a full backward B costs I + W.")
    backward_weight_s: StageSeconds = Field(
        1.0, description="Backward for the stage's weights (W).")
    p2p_latency_s: float = Field(0.0, ge=0, le=10.0, allow_inf_nan=False,
                                 description="Per-message latency between ranks.")
    p2p_bandwidth_bytes_per_s: float | None = Field(
        None, ge=1, le=1e15, allow_inf_nan=False,
        description="Link bandwidth (at least 1 byte/s, so a message's time stays finite); "
        "null: unlimited.")
    activation_message_bytes: int = Field(
        0, ge=0, le=2**40, description="Bytes of one activation (or its gradient) message.")


class PipelineRequest(_Frozen):
    """A schedule for ``stages`` ranks and ``microbatches`` micro-batches, with explicit costs or a
    model setup whose per-stage costs are derived from a GPU roofline."""

    schedule: PipelineScheduleName | None = Field(
        None, description="Defaults to the setup's parallelism.pipeline_schedule, else 1f1b.")
    stages: int | None = Field(None, ge=1, le=MAX_STAGES, description="Pipeline ranks p "
                               "(defaults to the setup's pipeline_parallel).")
    microbatches: int | None = Field(
        None, ge=1, le=MAX_MICROBATCHES, description="Micro-batches per step m (defaults to the "
        "setup's gradient_accumulation_steps).")
    virtual_stages: int | None = Field(
        None, ge=1, le=MAX_VIRTUAL_STAGES, description="Stage chunks per rank v (defaults to the "
        "setup's virtual_pipeline_stages, else 1).")
    costs: PipelineCosts | None = Field(None, description="Explicit costs; default 1 s each.")
    setup: MemoryRequest | None = Field(
        None, description="Model, training and parallelism setup with hardware.gpu: per-stage "
        "costs from a roofline instead of explicit costs.")
    model_flops_utilization: float = Field(
        DEFAULT_MFU, gt=0, le=1, description="Fraction of peak 16-bit FLOP/s the roofline assumes.")
    include_timeline: bool = Field(
        True, description=f"Return every action's start and end: at most {MAX_TIMELINE_EVENTS:,} "
        "actions (a longer schedule is answered without its timeline, timeline_omitted saying "
        "why, and its SVG is a 422).")

    @model_validator(mode="after")
    def _one_source(self) -> "PipelineRequest":
        if self.costs is not None and self.setup is not None:
            raise ValueError("give costs or setup, not both")
        if self.setup is None and (self.stages is None or self.microbatches is None):
            raise ValueError("stages and microbatches are required without a setup")
        return self


class StageCost(_Frozen):
    stage: int = Field(..., description="Virtual stage index in pipeline order.")
    rank: int
    forward_s: float
    backward_input_s: float
    backward_weight_s: float


class RankFigures(_Frozen):
    rank: int
    stages: list[int] = Field(..., description="Virtual stages this rank holds.")
    busy_s: float
    idle_s: float = Field(..., description="makespan_s - busy_s.")
    first_start_s: float
    last_end_s: float
    peak_in_flight_microbatches: int = Field(
        ..., description="Most (virtual stage, micro-batch) activation sets live at once: from "
        "the start of F to the end of B (or of W when the backward is split).")
    peak_in_flight_stage_equivalents: float = Field(
        ..., description="peak_in_flight_microbatches / v: in units of a whole stage's "
        "activations for one micro-batch.")


class TimelineEvent(_Frozen):
    rank: int
    kind: Kind
    stage: int
    microbatch: int
    start_s: float
    end_s: float


class PipelineResult(_Frozen):
    schedule: PipelineScheduleName
    stages: int
    microbatches: int
    virtual_stages: int
    makespan_s: float = Field(..., description="First action's start to last action's end.")
    bubble_fraction: float = Field(
        ..., description="Idle rank-time inside one iteration over total rank-time: "
        "(stages * makespan_s - sum busy_s) / (stages * makespan_s).")
    ranks: list[RankFigures]
    bottleneck_rank: int = Field(
        ..., description="The rank with the most in-flight activations (first on ties): it sets "
        "the pipeline's activation memory.")
    stage_costs: list[StageCost]
    p2p_message_s: float = Field(..., description="Latency + bytes / bandwidth of one message.")
    timeline: list[TimelineEvent] | None = Field(
        None, description="Every action, ordered by rank then start; null when omitted.")
    timeline_omitted: str | None = Field(
        None, description=f"Why the timeline is null although asked for: the schedule has more "
        f"than {MAX_TIMELINE_EVENTS:,} actions.")
    assumptions: list[Assumption] = Field(default_factory=list)


class PipelineError(ValueError):
    """A request the schedules cannot plan; ``field`` names the request field and ``rule`` why."""

    def __init__(self, rule: str, field: str) -> None:
        super().__init__(rule)
        self.rule, self.field = rule, field


# ---- roofline costs from a model setup ---------------------------------------------------------
def roofline_costs(setup: MemoryRequest, n_stages: int, mfu: float
                   ) -> tuple[list[float], list[float], list[float], int, float, list[Assumption]]:
    """Per virtual stage F, I, W seconds, message bytes and link bandwidth for ``setup``.

    FLOPs per token: a matmul with P weights costs 2P forward, 2P for the input gradient and 2P for
    the weight gradient (the 6·N·D rule, Kaplan et al. 2020 §2.1; split F:I:W = 2:2:2 as in Qi et
    al. 2023 §2). Causal attention scores add 4·s·h forward and 8·s·h backward per token per layer,
    all input-gradient work (Narayanan et al. 2021, §5.1, the 4·B·s²·h term per layer forward).
    Time = FLOPs / (peak 16-bit FLOP/s × MFU), per tensor-parallel shard.
    """
    model = resolve_model(setup.model)
    if not model.architecture_known:
        raise PipelineError("the roofline needs architecture fields (a bare parameter count has "
                            "no layers to place on stages)", "setup.model")
    if setup.hardware is None or setup.hardware.gpu is None:
        raise PipelineError("the roofline needs hardware.gpu (its peak FLOP/s)",
                            "setup.hardware.gpu")
    gpu = get_gpu(setup.hardware.gpu)
    L = model.num_layers
    if L < n_stages:
        raise PipelineError(f"every virtual stage needs a layer: num_layers ({L}) < stages × "
                            f"virtual_stages ({n_stages})", "setup.model.num_layers")
    counts = count_parameters(model)
    tr, par = setup.training, setup.parallelism
    s, h = tr.sequence_length, model.hidden_size
    tokens = tr.micro_batch_size * s
    tp = par.tensor_parallel
    rate = gpu.peak_bf16_flops * mfu
    head = model.vocab_size * h  # the output projection's matmul weights (tied or not)
    f_s, i_s, w_s = [], [], []
    for c in range(n_stages):
        layers = (c + 1) * L // n_stages - c * L // n_stages  # even split, remainder spread
        p_mm = layers * counts.per_layer + (head if c == n_stages - 1 else 0)
        attn = layers * 4 * s * h
        f_s.append(tokens * (2 * p_mm + attn) / tp / rate)
        i_s.append(tokens * (2 * p_mm + 2 * attn) / tp / rate)
        w_s.append(tokens * (2 * p_mm) / tp / rate)
    act_bytes = 4 if tr.precision == "fp32" else 2
    msg = tokens * h * act_bytes // (tp if par.sequence_parallel else 1)  # (b, s, h) activation
    # a p2p send uses one direction of the link; the catalog's figure is both directions together
    bw = gpu.interconnect_one_direction_bytes_per_s
    notes = [
        Assumption(name="model_flops_utilization", value=f"{mfu:g}",
                   note="fraction of the GPU's dense 16-bit peak reached by every stage"),
        Assumption(name="gpu", value=gpu.name, note=f"peak {gpu.peak_bf16_flops:.4g} FLOP/s"),
        Assumption(name="p2p_bandwidth_bytes_per_s", value=f"{bw:.4g}",
                   note=f"{gpu.interconnect}: stages within one node; across nodes use the "
                   "network's bandwidth via explicit costs. One direction of the link (half "
                   f"the catalog's {gpu.interconnect_bytes_per_s:.4g}, both directions): a "
                   "send to the next stage uses one direction"),
        Assumption(name="layers_per_virtual_stage", value=f"{L}/{n_stages}",
                   note="embeddings on the first stage (no FLOPs), output projection on the last"),
    ]
    return f_s, i_s, w_s, msg, bw, notes


def _per_stage(value, p: int, v: int, name: str) -> list[float]:
    S = p * v
    if not isinstance(value, list):
        return [float(value) / v] * S
    if len(value) == p:
        return [float(value[r]) / v for r in range(p) for _ in range(v)]
    if len(value) == S:
        return [float(x) for x in value]
    raise PipelineError(f"{name} needs 1, stages ({p}) or stages × virtual_stages ({S}) entries, "
                        f"got {len(value)}", f"costs.{name}")


def _stage_costs_for(f_s, i_s, w_s, dualpipe: bool):
    # dualpipe: virtual stage p+j is the reverse pipeline's copy of stage j.
    if not dualpipe:
        return f_s, i_s, w_s
    return f_s + f_s, i_s + i_s, w_s + w_s


def schedule_shape(req: PipelineRequest) -> tuple[PipelineScheduleName, int, int, int]:
    """(schedule, stages p, micro-batches m, virtual stages v) the request asks for, defaults
    from its setup filled in."""
    setup = req.setup
    name = req.schedule or (setup.parallelism.pipeline_schedule if setup else "1f1b")
    p = req.stages or (setup.parallelism.pipeline_parallel if setup else 1)
    m = req.microbatches or (setup.training.gradient_accumulation_steps if setup else 1)
    v = req.virtual_stages or (setup.parallelism.virtual_pipeline_stages if setup else 1)
    if name in ("zb-v", "dualpipe-v") and req.virtual_stages is None and v == 1:
        v = 2  # the V-shaped schedules always hold two stages per rank
    return name, p, m, v


def min_timeline_events(req: PipelineRequest) -> int:
    """A lower bound on the timeline's actions: a forward and a backward per stage and
    micro-batch (a split backward adds a weight-gradient action)."""
    _, p, m, v = schedule_shape(req)
    return 2 * p * v * m


def plan_pipeline(req: PipelineRequest) -> PipelineResult:
    """Build the schedule's action lists, simulate them, and report per-rank figures."""
    setup = req.setup
    if setup is not None and setup.parallelism.expert_parallel > 1:  # a dense model's: 422
        try:
            validate_expert_parallel(hf_config_of(setup.model), setup.parallelism)
        except PlanningError as exc:
            raise PipelineError(exc.detail, f"setup.{exc.field}") from None
    name, p, m, v = schedule_shape(req)
    if p * v * m > MAX_STAGE_MICROBATCHES:
        raise PipelineError(f"stages × virtual_stages × microbatches must be <= "
                            f"{MAX_STAGE_MICROBATCHES}, got {p * v * m}", "microbatches")
    try:
        sched = build_schedule(name, p, m, v)
    except ScheduleConstraintError as e:
        raise PipelineError(e.rule, e.field) from None
    n_model_stages = p * v  # dualpipe: v = 1 and each rank holds its stage in both directions
    assumptions: list[Assumption] = []
    if setup is not None:
        f_s, i_s, w_s, msg, bw, assumptions = roofline_costs(setup, n_model_stages,
                                                             req.model_flops_utilization)
        latency = 0.0
    else:
        c = req.costs or PipelineCosts()
        f_s = _per_stage(c.forward_s, p, v, "forward_s")
        i_s = _per_stage(c.backward_input_s, p, v, "backward_input_s")
        w_s = _per_stage(c.backward_weight_s, p, v, "backward_weight_s")
        msg, bw, latency = c.activation_message_bytes, c.p2p_bandwidth_bytes_per_s, c.p2p_latency_s
    comm_s = latency + (msg / bw if bw else 0.0)
    f_s, i_s, w_s = _stage_costs_for(f_s, i_s, w_s, name == "dualpipe")
    out = simulate(sched, f_s, i_s, w_s, comm_s)
    held = [[] for _ in range(p)]
    for st, r in enumerate(sched.stage_to_rank):
        held[r].append(st)
    chunks = len(held[0])
    ranks = [RankFigures(rank=r, stages=held[r], busy_s=out.busy_s[r],
                         idle_s=out.makespan_s - out.busy_s[r], first_start_s=out.first_start_s[r],
                         last_end_s=out.last_end_s[r],
                         peak_in_flight_microbatches=out.peak_in_flight[r],
                         peak_in_flight_stage_equivalents=out.peak_in_flight[r] / chunks)
             for r in range(p)]
    peak = max(out.peak_in_flight)
    timeline, omitted = None, None
    n_events = sum(len(o) for o in sched.orders)
    if req.include_timeline and n_events <= MAX_TIMELINE_EVENTS:
        timeline = timeline_events(sched, out)
    elif req.include_timeline:
        omitted = f"{n_events} actions exceed the {MAX_TIMELINE_EVENTS}-event timeline limit"
    return PipelineResult(
        schedule=name, stages=p, microbatches=m, virtual_stages=v, makespan_s=out.makespan_s,
        bubble_fraction=out.bubble_fraction, ranks=ranks,
        bottleneck_rank=out.peak_in_flight.index(peak),
        stage_costs=[StageCost(stage=st, rank=sched.stage_to_rank[st], forward_s=f_s[st],
                               backward_input_s=i_s[st], backward_weight_s=w_s[st])
                     for st in range(sched.num_stages)],
        p2p_message_s=comm_s, timeline=timeline, timeline_omitted=omitted,
        assumptions=assumptions)


def timeline_events(sched, out) -> list[TimelineEvent]:
    start, end = out.start_s.tolist(), out.end_s.tolist()  # (Python floats, read per action)
    events = []
    for r, seq in enumerate(sched.orders):
        for code in seq:
            kind, st, mb = sched.decode(code)
            events.append(TimelineEvent.model_construct(
                rank=r, kind=kind, stage=st, microbatch=mb, start_s=start[code],
                end_s=end[code]))
    return events


def in_flight_microbatches(schedule: PipelineScheduleName, stages: int, microbatches: int,
                           virtual_stages: int = 1) -> list[int]:
    """Per rank, peak live (virtual stage, micro-batch) activation sets of a schedule — what the
    memory estimate multiplies per-chunk activation bytes by when pipeline_parallel > 1."""
    try:
        return peak_in_flight(build_schedule(schedule, stages, microbatches, virtual_stages))
    except ScheduleConstraintError as e:
        raise PipelineError(e.rule, e.field) from None


__all__ = ["PipelineCosts", "PipelineRequest", "PipelineResult", "RankFigures", "StageCost",
           "TimelineEvent", "PipelineError", "plan_pipeline", "roofline_costs",
           "in_flight_microbatches", "timeline_events"]
