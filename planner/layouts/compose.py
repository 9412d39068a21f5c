"""What one device holds under a parallel layout, composed from the layers below.

- ``data_parallel``: DDP and ZeRO 1-3, every rank class replayed op by op with what its
  implementation allocates (``planner/layouts/data_parallel.py``); the worst rank is reported.
- ``composed``: tensor and pipeline parallelism where ranks are not replayed: the per-rank model
  states (``planner/layouts/sharding.py``) plus the single-device step's activation and temporary
  peaks, split as the layout splits them (stated as assumptions: an upper bound).
- ``megatron``: Korthikanti et al. 2022's activation formula (``planner/layouts/megatron.py``).
- ``model_states_only``: a bare parameter count (no architecture): the model states alone.

Each returns a ``Breakdown`` (with the first step's, the phase and the forward/backward peaks
where replayed) and appends the assumptions it makes.
"""

from __future__ import annotations

import functools
import math

from planner.catalog.errors import PlanningError
from planner.catalog.result_specs import breakdown_of
from planner.catalog.specs import Assumption, Breakdown, ParallelSpec, ResolvedModel, TrainingSpec
from planner.layouts.data_parallel import ParallelProgram
from planner.layouts.parallel_ranks import data_parallel_peaks, zero1_ownership
from planner.layouts.megatron import megatron_activation_bytes
from planner.layouts.pipeline_schedules import check, schedule_of
from planner.layouts.pipeline_sim import peak_in_flight
from planner.layouts.sharding import MP_POLICY, data_parallel_implementation, shard_model_states
from planner.step import simulate as step_cache


def breakdown(d: dict[str, int]) -> Breakdown:
    return Breakdown(**d)


def snap_breakdown(p) -> Breakdown:
    """A replayed (or template) peak's breakdown: the planner's own byte counts, not validated
    again (``breakdown_of``)."""
    c = p.by_cat
    return breakdown_of(c[0], c[1], c[2], c[3], c[4], p.total)


# The assumptions every estimate states (the specs are frozen, so one instance serves all).


def fb_fields(activation_peak: int | None, fb: Breakdown | None, fb_phase: str | None) -> dict:
    """MemoryResult's activation peak and forward/backward peak."""
    return {"activation_peak_bytes": activation_peak, "forward_backward_peak": fb,
            "forward_backward_peak_phase": fb_phase}


def replayed_fields(peaks, steady: Breakdown | None = None) -> dict:
    """The activation and forward/backward peaks of a replayed step (StepPeaks); ``steady``:
    the steady peak's breakdown, already made, which is the forward/backward peak's too when
    the peak falls in forward/backward (one frozen object for both)."""
    fb = peaks.fb_steady
    bd = steady if steady is not None and fb is peaks.steady else snap_breakdown(fb)
    return fb_fields(peaks.act_max_total, bd, f"{fb.phase}: {fb.op}")


def single_device(par: ParallelSpec) -> bool:
    return (par.data_parallel == par.tensor_parallel == par.pipeline_parallel == 1
            and par.zero_stage == 0)


def _dp_peaks(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec, device: str,
              checkpointed: frozenset[int]):
    def simulate(model, tr, par, rank, device, ck):
        return step_cache.simulate(model, tr, device, checkpointed, par, rank,
                                   program=ParallelProgram)

    def ownership(model, tr, par):
        return step_cache.setup_memo(_worst_ownership, model, tr, par)
    return data_parallel_peaks(model, tr, par, device, set(checkpointed), every_rank=False,
                               simulate=simulate, ownership=ownership)


def single_rank_candidate(par: ParallelSpec) -> bool:
    """Whether rank 0 is the only worst-rank candidate of a data-parallel estimate (DDP, and
    FSDP2's ZeRO 2-3: rank 0 holds the most rows of every tensor; ``data_parallel_peaks``)."""
    return par.zero_stage == 0 or par.zero_stage >= 2


def _worst_ownership(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec):
    """zero1_ownership kept for the worst-rank candidates only (what is memoised: a million
    ranks' keys would not be)."""
    keys, worst = zero1_ownership(model, tr, par)
    return {r: keys[r] for r in worst}, worst


def data_parallel(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec, device: str,
                   ckpt: set[int], assumptions: list[Assumption], notes: list[str],
                   rank0=None):
    """Data parallelism (DDP, ZeRO 1-3): every rank's step replayed op by op with what its
    implementation allocates (planner/layouts/data_parallel.py); the worst rank is reported.
    ``rank0``: rank 0's peaks already evaluated from its template, where rank 0 is the only
    candidate (``single_rank_candidate``)."""
    peaks = [(0, rank0)] if rank0 is not None else _dp_peaks(model, tr, par, device,
                                                            frozenset(ckpt))
    rank, worst = max(peaks, key=lambda rp: (rp[1].steady.total, -rp[0]))
    assumptions.extend(dp_assumptions(par.zero_stage, par.data_parallel,
                                       par.fsdp_mixed_precision, rank))
    bd = snap_breakdown(worst.steady)
    return (bd, snap_breakdown(worst.first), f"{worst.steady.phase}: {worst.steady.op}",
            replayed_fields(worst, bd))


@functools.lru_cache(maxsize=4096)
def dp_assumptions(zero_stage: int, world: int, mp: bool, rank: int) -> tuple[Assumption, ...]:
    """What a data-parallel estimate states: how it was derived, the implementation, the rank
    reported (one tuple per layout and rank, shared between estimates)."""
    impl = data_parallel_implementation(zero_stage, world) + (MP_POLICY if mp else "")
    return (_PROFILE_DATA_PARALLEL, _assumption("implementation", impl, "what each rank holds"),
            _assumption("worst_rank", str(rank), "the rank with the highest steady-state peak"))


_PROFILE_DATA_PARALLEL = Assumption(
    name="profile", value="reference step per data-parallel rank, simulated op by op",
    note="the step measured by multi-rank validation jobs")


@functools.lru_cache(maxsize=4096)
def _assumption(name: str, value: str, note: str) -> Assumption:
    """An Assumption, shared between estimates (frozen specs)."""
    return Assumption(name=name, value=value, note=note)


def composed(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec, device: str,
              ckpt: set[int], assumptions: list[Assumption], notes: list[str]):
    """Several devices: model states per rank from planner.layouts.sharding; activations and temporaries of
    the simulated single-device step, split as the parallel layout splits them."""
    try:
        ms = step_cache.setup_memo(shard_model_states, model, tr, par)
    except ValueError as exc:
        raise PlanningError(str(exc), "parallelism") from exc
    t, p = par.tensor_parallel, par.pipeline_parallel
    peaks = step_cache.simulate(model, tr, device, frozenset(ckpt))
    fb = peaks.act_peak.as_dict()
    act, tmp = fb["activations"], fb["temporaries"]
    act_max = peaks.act_max_total
    assumptions.append(Assumption(
        name="composition", value="sharded model states + single-device activation peak",
        note="activations and temporaries at their own peak in the reference step, added to the "
             "per-rank model states (an upper bound when the two peaks do not coincide)"))
    if t > 1:
        # Megatron tensor parallelism (Korthikanti et al. 2022, Table 2): of the 34·sbh + 5·as²b
        # per-layer terms, 10·sbh stay replicated without sequence parallelism and the rest divide
        # by t; with sequence parallelism everything divides by t.
        replicated = 0.0 if par.sequence_parallel else 10 / 34
        act = int(act * (replicated + (1 - replicated) / t))
        act_max = int(act_max * (replicated + (1 - replicated) / t))
        tmp = tmp // t
        assumptions.append(Assumption(name="tensor_parallel_activations",
                                      value="Korthikanti et al. 2022 Table 2 split",
                                      note="not measured by the reference step"))
    if p > 1:
        per_stage = math.ceil(model.num_layers / p) / model.num_layers
        inflight = _first_stage_in_flight(par.pipeline_schedule, p,
                                          max(tr.gradient_accumulation_steps, p),
                                          par.virtual_pipeline_stages)
        act = int(act * per_stage * inflight)
        act_max = int(act_max * per_stage * inflight)
        assumptions.append(Assumption(
            name="pipeline_in_flight", value=str(inflight),
            note=f"micro-batches in flight on the first stage under {par.pipeline_schedule} "
                 "(planner.routes.pipeline simulation); the first stage is the bottleneck"))
    bd = Breakdown(parameters=ms.parameters, gradients=ms.gradients,
                   optimizer_states=ms.optimizer_states, activations=act,
                   temporaries=tmp + ms.buffers,
                   total=ms.parameters + ms.gradients + ms.optimizer_states + act + tmp + ms.buffers)
    assumptions.append(Assumption(name="implementation", value=ms.implementation,
                                  note="what the per-rank model states describe"))
    notes.extend(ms.notes)
    phase = "backward (activations of all in-flight micro-batches live)"
    return bd, None, phase, fb_fields(act_max, bd, phase)


@functools.lru_cache(maxsize=256)
def _first_stage_in_flight(schedule: str, p: int, m: int, v: int) -> int:
    """Micro-batches in flight on the first stage (planner.routes.pipeline's simulation; p where the
    schedule's constraints do not hold: /v1/pipeline reports those)."""
    try:
        if schedule == "zb-h2":  # its pass caps rank 0 at 2p - 1 and reaches the cap
            check(schedule, p, m, v)  # (tests/test_pipeline_schedules.py: against the pass)
            return min(m, 2 * p - 1)
        return peak_in_flight(schedule_of(schedule, p, m, v), [0])[0]
    except Exception:  # noqa: BLE001 - schedule constraints are reported by /v1/pipeline
        return p


def megatron(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec,
             assumptions: list[Assumption]):
    try:
        act = int(megatron_activation_bytes(model, tr, par))
        ms = shard_model_states(model, tr, par)
    except ValueError as exc:
        raise PlanningError(str(exc), "training.activation_checkpointing") from exc
    assumptions.append(Assumption(name="profile", value="megatron",
                                  note="Korthikanti et al. 2022, Table 2 and §4.3"))
    bd = Breakdown(parameters=ms.parameters, gradients=ms.gradients,
                   optimizer_states=ms.optimizer_states, activations=act, temporaries=ms.buffers,
                   total=ms.parameters + ms.gradients + ms.optimizer_states + act + ms.buffers)
    return bd, "end of forward (Korthikanti et al. activation total)"


def model_states_only(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec,
                      assumptions: list[Assumption]) -> Breakdown:
    try:
        ms = shard_model_states(model, tr, par)
    except ValueError as exc:
        raise PlanningError(str(exc), "parallelism") from exc
    tmp = ms.buffers + ms.step_temporaries
    assumptions.append(Assumption(name="implementation", value=ms.implementation))
    return Breakdown(parameters=ms.parameters, gradients=ms.gradients,
                     optimizer_states=ms.optimizer_states, activations=0, temporaries=tmp,
                     total=ms.parameters + ms.gradients + ms.optimizer_states + tmp)
