"""Simulator against closed forms and the public check (p=4, m=8, F=1, I=W=1, no communication)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from planner.routes.pipeline import PipelineCosts, PipelineError, PipelineRequest, plan_pipeline
from planner.layouts.pipeline_schedules import build_schedule
from planner.layouts.pipeline_sim import peak_in_flight, simulate


def run(schedule: str, p: int, m: int, v: int = 1, **costs) -> "object":
    return plan_pipeline(PipelineRequest(schedule=schedule, stages=p, microbatches=m,
                                         virtual_stages=v, costs=PipelineCosts(**costs)))


# ---- the public check ------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_public_gpipe_1f1b(schedule: str) -> None:
    r = run(schedule, 4, 8)
    assert r.makespan_s == 33
    assert round(r.bubble_fraction, 4) == 0.2727
    assert r.bubble_fraction == pytest.approx(3 / 11, abs=1e-12)


def test_public_interleaved() -> None:
    assert run("interleaved-1f1b", 4, 8, 2).makespan_s == pytest.approx(28.5, abs=1e-12)


def test_public_zb_h1() -> None:
    assert run("zb-h1", 4, 8).makespan_s == 27


# ---- closed forms ------------------------------------------------------------------------------
PM = [(2, 2), (2, 7), (3, 5), (4, 4), (4, 12), (6, 9), (8, 8), (8, 32)]


@pytest.mark.parametrize("p,m", PM)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_gpipe_1f1b_bubble(schedule: str, p: int, m: int) -> None:
    # (p-1)/(m+p-1): Narayanan et al. 2021, §2.2.1; Huang et al. 2019, §2.2.
    r = run(schedule, p, m, forward_s=1.3, backward_input_s=1.1, backward_weight_s=1.5)
    assert r.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), rel=1e-12)
    assert r.makespan_s == pytest.approx((m + p - 1) * (1.3 + 2.6), rel=1e-12)


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 16, 4), (8, 16, 2), (3, 6, 3)])
def test_interleaved_bubble(p: int, m: int, v: int) -> None:
    # (p-1)/(v·m+p-1) with chunks costing 1/v of a stage: Narayanan et al. 2021, §2.2.2.
    r = run("interleaved-1f1b", p, m, v, forward_s=1.0, backward_input_s=0.5,
            backward_weight_s=1.5)
    assert r.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1), rel=1e-12)


@pytest.mark.parametrize("p,m", PM)
@pytest.mark.parametrize("f,i,w", [(1, 1, 1), (1.0, 1.5, 0.5), (2.0, 1.0, 1.0), (1.2, 1.0, 0.9)])
def test_zb_h1_makespan(p: int, m: int, f: float, i: float, w: float) -> None:
    # m(F+B) + (p-1)(F+I-W), B = I + W: Qi et al. 2023, §3.1 (ZB-H1 bubble (p-1)(T_F+T_B-T_W)),
    # the handcrafted schedule's setting; exact while W <= F and W <= I (a postponed W fits the gap).
    r = run("zb-h1", p, m, forward_s=f, backward_input_s=i, backward_weight_s=w)
    assert r.makespan_s == pytest.approx(m * (f + i + w) + (p - 1) * (f + i - w), rel=1e-12)


@pytest.mark.parametrize("p,m", [(2, 4), (3, 9), (4, 8), (4, 16), (8, 16), (8, 40)])
def test_zb_h2_makespan(p: int, m: int) -> None:
    # Equal F, I, W: the parallelogram's length (p-1)·F + m(F+I+W) (Qi et al. 2023, §3.2, Fig. 4),
    # with at most 2p-1 micro-batches in flight on rank 0.
    r = run("zb-h2", p, m)
    assert r.makespan_s == 3 * m + p - 1
    assert r.ranks[0].peak_in_flight_microbatches == 2 * p - 1
    assert all(x.idle_s == p - 1 for x in r.ranks)


def test_in_flight_per_schedule() -> None:
    # 1F1B keeps p-r micro-batches on rank r (Narayanan et al. 2021 §2.2.1); GPipe all m.
    assert [x.peak_in_flight_microbatches for x in run("1f1b", 4, 8).ranks] == [4, 3, 2, 1]
    assert [x.peak_in_flight_microbatches for x in run("gpipe", 4, 8).ranks] == [8] * 4
    r = run("1f1b", 4, 8)
    assert r.bottleneck_rank == 0
    # ZB-H1 keeps 1F1B's peak (p) on every rank: Qi et al. 2023, Table 1 (memory p·M_B).
    assert [x.peak_in_flight_microbatches for x in run("zb-h1", 4, 8).ranks] == [4] * 4
    # DualPipe: p + 1 micro-batches of activations (DeepSeek-AI 2024, Table 2).
    assert {x.peak_in_flight_microbatches for x in run("dualpipe", 4, 8).ranks} == {5}
    # Interleaved: rank 0 holds (v-1)·p + 2(p-1) + 1 chunk-micro-batches at the end of warm-up.
    r = run("interleaved-1f1b", 4, 8, 2)
    assert r.ranks[0].peak_in_flight_microbatches == 4 + 2 * 3 + 1
    assert r.ranks[0].peak_in_flight_stage_equivalents == 5.5


def test_communication_delays_the_pipeline() -> None:
    base = run("1f1b", 4, 8)
    slow = run("1f1b", 4, 8, p2p_latency_s=0.1, p2p_bandwidth_bytes_per_s=1e9,
               activation_message_bytes=10**8)
    assert slow.p2p_message_s == pytest.approx(0.2)
    # fill and drain each cross p-1 links twice (forward and backward)
    assert slow.makespan_s >= base.makespan_s + 2 * 3 * 0.2 - 1e-9


def test_per_stage_lists_and_bottleneck() -> None:
    r = run("1f1b", 4, 8, forward_s=[1, 1, 2, 1], backward_input_s=1, backward_weight_s=1)
    assert [c.forward_s for c in r.stage_costs] == [1, 1, 2, 1]
    # the slow stage paces the steady state: 8 micro-batches x (2 + 2) on rank 2
    assert r.ranks[2].busy_s == 8 * 4
    with pytest.raises(PipelineError) as e:
        run("1f1b", 4, 8, forward_s=[1, 2, 3])
    assert e.value.field == "costs.forward_s"


def test_virtual_stage_costs_given_per_chunk() -> None:
    r = run("interleaved-1f1b", 2, 4, 2, forward_s=[0.5, 0.5, 0.5, 1.0])
    assert [c.forward_s for c in r.stage_costs] == [0.5, 0.5, 0.5, 1.0]
    assert [c.rank for c in r.stage_costs] == [0, 1, 0, 1]


def test_roofline_setup() -> None:
    setup = {"model": {"preset": "gpt2"}, "training": {"gradient_accumulation_steps": 8,
             "sequence_length": 1024}, "parallelism": {"pipeline_parallel": 4},
             "hardware": {"gpu": "h100-80gb"}}
    r = plan_pipeline(PipelineRequest.model_validate({"setup": setup}))
    assert (r.schedule, r.stages, r.microbatches, r.virtual_stages) == ("1f1b", 4, 8, 1)
    c = r.stage_costs
    # F : I : W = 2 : 2 : 2 per weight, attention adds to F and (twice) to I only
    assert c[0].backward_input_s > c[0].forward_s > c[0].backward_weight_s > 0
    assert c[3].forward_s > c[0].forward_s  # the last stage also runs the output projection
    # one (b, s, h) activation, 1 x 1024 x 768 in bf16 (amp-bf16), over one direction of H100's
    # NVLink 4: half the catalog's 900 GB/s (both directions together)
    assert r.p2p_message_s == pytest.approx(1024 * 768 * 2 / 450e9)
    bw = next(a for a in r.assumptions if a.name == "p2p_bandwidth_bytes_per_s")
    assert float(bw.value) == 450e9 and "one direction" in bw.note
    with pytest.raises(PipelineError):
        plan_pipeline(PipelineRequest.model_validate(
            {"setup": {**setup, "hardware": None}}))


def test_sim_equals_public_with_raw_api() -> None:
    s = build_schedule("interleaved-1f1b", 4, 8, 2)
    out = simulate(s, [0.5] * 8, [0.5] * 8, [0.5] * 8)
    assert out.makespan_s == 28.5
    assert out.peak_in_flight == peak_in_flight(s)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v",
                        "dualpipe-v", "dualpipe"]),
       st.integers(1, 6), st.integers(1, 24), st.integers(1, 3),
       st.floats(0.1, 3), st.floats(0.1, 3), st.floats(0.1, 3), st.floats(0, 1))
def test_every_valid_schedule_completes(name, p, m, v, f, i, w, comm) -> None:
    v = {"gpipe": 1, "1f1b": 1, "zb-h2": 1, "dualpipe": 1, "zb-v": 2, "dualpipe-v": 2}.get(name, v)
    if name == "interleaved-1f1b":
        v = max(v, 2)
    try:
        r = plan_pipeline(PipelineRequest(
            schedule=name, stages=p, microbatches=m, virtual_stages=v,
            costs=PipelineCosts(forward_s=f, backward_input_s=i, backward_weight_s=w,
                                p2p_latency_s=comm)))
    except PipelineError:
        return
    work = m * (f + i + w)  # dualpipe: m/2 per direction, two stages per rank
    for rank in r.ranks:
        assert rank.busy_s == pytest.approx(work, rel=1e-9)
        assert rank.busy_s <= r.makespan_s + 1e-9
    assert 0 <= r.bubble_fraction < 1
    # a schedule cannot beat the busiest rank plus the fill of the first forward
    assert r.makespan_s >= work - 1e-9
    assert len(r.timeline) == sum(len(build_schedule(name, p, m, v).orders[x.rank])
                                  for x in r.ranks)


def _flat_inputs(s, f, i, w, comm):
    from planner.layouts.pipeline_sim import _flat_arrays
    offs, _, dep_pos, cost, cross, _, _ = _flat_arrays(s, f, i, w, comm)
    return s.num_ranks, offs, dep_pos, cost, cross, None, comm


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("interleaved-1f1b", 3),
                        ("interleaved-1f1b", 4), ("zb-h1", 1), ("zb-h1", 2), ("zb-h1", 4),
                        ("zb-h2", 1), ("zb-v", 2), ("dualpipe-v", 2), ("dualpipe", 1)]),
       st.integers(2, 8), st.integers(1, 4), st.randoms(use_true_random=False),
       st.sampled_from([0.0, 0.01, 0.7, 5.0]))
def test_rank_relaxation_equals_event_loop(sched, p, k, rnd, comm) -> None:
    """The vectorised per-rank relaxation, the alternating rank and stage-chain scans in integer
    units (``pipeline_sim_chains.settle``) and the action-by-action event loop time every action
    alike (up to rounding: one sums costs by running totals, one in units of 2**-61 of the
    schedule's total, the other one at a time), on skewed per-stage costs and slow links."""
    from planner.layouts import pipeline_sim as ps
    name, v = sched
    m = p * k if name not in ("dualpipe", "dualpipe-v") else 2 * p * k
    try:
        s = build_schedule(name, p, m, v)
    except Exception:
        return
    S = s.num_stages
    f = [rnd.uniform(0.05, 4) for _ in range(S)]
    i = [rnd.uniform(0.05, 4) for _ in range(S)]
    w = [rnd.uniform(0.05, 4) for _ in range(S)]
    fast = simulate(s, f, i, w, comm)
    orig, settle = ps._relax_by_rank, ps.settle
    try:
        ps.RELAX_WORK, was = 10 ** 6, ps.RELAX_WORK
        assert ps._relax_by_rank(*_flat_inputs(s, f, i, w, comm)) is not None  # it settles
        ps._relax_by_rank = lambda *a: None  # the stage chains' scans
        chains = simulate(s, f, i, w, comm)  # (or the event loop, where they give way)
        ps.settle = lambda *a: None  # the event loop
        slow = simulate(s, f, i, w, comm)
    finally:
        ps._relax_by_rank, ps.settle, ps.RELAX_WORK = orig, settle, was
    for got in (fast, chains):
        assert got.makespan_s == pytest.approx(slow.makespan_s, rel=1e-12)
        assert got.start_flat == pytest.approx(slow.start_flat, rel=1e-9, abs=1e-9)
        assert got.end_flat == pytest.approx(slow.end_flat, rel=1e-9, abs=1e-9)
        assert got.busy_s == pytest.approx(slow.busy_s, rel=1e-12)
        assert got.peak_in_flight == slow.peak_in_flight


def _flat_arrays_for_settle(s, f, i, w, comm):
    from planner.layouts.pipeline_sim import _flat_arrays
    offs, flat, dep_pos, cost, cross, _, _ = _flat_arrays(s, f, i, w, comm)
    return offs, flat, dep_pos, cost, cross, comm


@pytest.mark.parametrize("name,p,v,m", [("interleaved-1f1b", 4, 16, 32), ("zb-h1", 4, 16, 32),
                                         ("interleaved-1f1b", 4, 8, 32), ("zb-h1", 4, 8, 32)])
def test_a_path_wrapping_round_the_ranks_settles_by_stage_chains(name, p, v, m) -> None:
    """Many stages a rank, the last stage four times the others (the loss) and slow links: the
    longest path wraps round the ranks again and again. From CHAINS_FIRST (4) stages a rank on,
    the stage chains' scans go first, and settle, timing every action as the event loop."""
    from planner.layouts import pipeline_sim as ps
    s = build_schedule(name, p, m, v)
    S = s.num_stages
    f, i, w = [0.14] * (S - 1) + [0.57], [0.18] * (S - 1) + [0.5], [0.1] * S
    assert v >= ps.CHAINS_FIRST
    assert ps.settle(s, *_flat_arrays_for_settle(s, f, i, w, 0.0093)) is not None
    fast, used = _simulated(s, f, i, w, 0.0093)
    assert used == ["chains"]
    slow = _event_loop(s, f, i, w, 0.0093)
    # stages alike and free messages: no rank waits at a wrap, the relaxation goes first
    assert _simulated(s, [1.0] * S, [1.0] * S, [1.0] * S, 0.0)[1] == ["relax"]
    assert fast.makespan_s == pytest.approx(slow.makespan_s, rel=1e-12)
    assert fast.start_flat == pytest.approx(slow.start_flat, rel=1e-12, abs=1e-12)
    assert fast.end_flat == pytest.approx(slow.end_flat, rel=1e-12, abs=1e-12)


def test_a_relaxation_past_its_work_limit_gives_way_to_the_stage_chains(monkeypatch) -> None:
    """Two stages a rank and slow links: the relaxation re-runs more than RELAX_WORK actions
    per action (here set to 2, with no floor), gives way, and the stage chains' scans time every
    action as the event loop."""
    from planner.layouts import pipeline_sim as ps
    monkeypatch.setattr(ps, "RELAX_WORK", 2)
    monkeypatch.setattr(ps, "RELAX_FLOOR", 0)
    s = build_schedule("interleaved-1f1b", 8, 64, 2)
    S = s.num_stages
    f, i, w = [0.14] * (S - 1) + [0.57], [0.18] * (S - 1) + [0.5], [0.1] * S
    fast, used = _simulated(s, f, i, w, 0.0093)
    assert used == ["relax", "chains"]
    slow = _event_loop(s, f, i, w, 0.0093)
    assert fast.makespan_s == pytest.approx(slow.makespan_s, rel=1e-12)
    assert fast.end_flat == pytest.approx(slow.end_flat, rel=1e-12, abs=1e-12)


def _simulated(s, f, i, w, comm):
    """``simulate``'s answer, and the ways it took (steady, levels, relax, chains), in order."""
    from planner.layouts import pipeline_sim as ps
    was = ps._relax_by_rank, ps.settle, ps.repeat, ps.by_levels
    orig, settle, repeat, levels = was
    used: list[str] = []
    try:
        ps._relax_by_rank = lambda *a: used.append("relax") or orig(*a)
        ps.settle = lambda *a: used.append("chains") or settle(*a)
        ps.repeat = lambda *a: used.append("steady") or repeat(*a)
        # (the levels' own unit-cost relaxation is not a way taken)
        ps.by_levels = lambda *a, **k: used.append("levels") or levels(*a, relax=orig, **k)
        return simulate(s, f, i, w, comm), used
    finally:
        ps._relax_by_rank, ps.settle, ps.repeat, ps.by_levels = was


def _event_loop(s, f, i, w, comm):
    """``simulate``'s answer from its event loop alone."""
    from planner.layouts import pipeline_sim as ps
    was = ps._relax_by_rank, ps.settle, ps.repeat, ps.by_levels
    try:
        ps._relax_by_rank = ps.settle = ps.repeat = ps.by_levels = lambda *a, **k: None
        return simulate(s, f, i, w, comm)
    finally:
        ps._relax_by_rank, ps.settle, ps.repeat, ps.by_levels = was


def test_relaxation_gives_way_on_a_deadlock_and_on_zero_costs() -> None:
    """A cycle never settles (every cost > 0), so the sweep limit hands over to the event loop,
    which names the waiting ranks; zero costs skip the relaxation altogether."""
    from planner.layouts.pipeline_sim import ScheduleDeadlock, _relax_by_rank
    s = build_schedule("1f1b", 2, 2)
    bad = type(s)(**{**s.__dict__, "orders": [list(reversed(s.orders[0])), s.orders[1]]})
    with pytest.raises(ScheduleDeadlock):
        simulate(bad, [1.0] * 2, [1.0] * 2, [1.0] * 2)
    import numpy as np
    # two ranks each waiting on the other's only action
    assert _relax_by_rank(2, [0, 1, 2], np.array([1, 0]), np.array([1.0, 1.0]),
                          np.zeros(2)) is None
    out = simulate(s, [1.0, 0.0], [1.0, 1.0], [0.0, 0.0])
    assert out.makespan_s == pytest.approx(simulate(s, [1.0, 1e-300], [1.0, 1.0],
                                                    [1e-300, 1e-300]).makespan_s)


@pytest.mark.parametrize("schedule,p,m,v", [("gpipe", 4, 8, 1), ("1f1b", 8, 16, 1),
                                            ("interleaved-1f1b", 4, 8, 2), ("zb-h1", 4, 8, 1),
                                            ("zb-v", 4, 8, 2)])
def test_peak_in_flight_of_some_ranks_equals_every_rank_s(schedule, p, m, v) -> None:
    s = build_schedule(schedule, p, m, v)
    every = peak_in_flight(s)
    assert [peak_in_flight(s, [r])[0] for r in range(p)] == every
    assert peak_in_flight(s, [p - 1, 0]) == [every[-1], every[0]]
