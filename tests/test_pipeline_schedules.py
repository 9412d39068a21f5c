"""Schedule orders against torch.distributed.pipelining's own ``pipeline_order``."""

from __future__ import annotations

import pytest

from planner.layouts.pipeline_schedules import ScheduleConstraintError, build_schedule

schedules = pytest.importorskip("torch.distributed.pipelining.schedules")


class FakeStage:
    """Just the attributes torch's schedule constructors read to build ``pipeline_order``."""

    def __init__(self, stage_index: int, num_stages: int, rank: int, group_size: int) -> None:
        self.stage_index, self.num_stages = stage_index, num_stages
        self.group_rank, self.group_size = rank, group_size
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.submod = None
        self.stage_index_to_group_rank: dict[int, int] = {}


def _flat(actions) -> list[tuple[str, int, int]]:
    out = []
    for a in actions:
        if a is None:
            continue
        if a.sub_actions is not None:  # OVERLAP_F_B: its F, then its B
            out.extend(_flat(a.sub_actions))
            continue
        kind = a.computation_type.value
        if kind in ("F", "B", "I", "W"):
            out.append((kind, a.stage_index, a.microbatch_index))
    return out


def torch_order(cls, p: int, m: int, v: int) -> dict[int, list[tuple[str, int, int]]]:
    if v == 1 and cls in (schedules.ScheduleGPipe, schedules.Schedule1F1B):
        sched = cls(FakeStage(0, p, 0, p), m)
    else:
        sched = cls([FakeStage(k * p, p * v, 0, p) for k in range(v)], m)
    return {r: _flat(sched.pipeline_order[r]) for r in range(p)}


def ours(name: str, p: int, m: int, v: int) -> dict[int, list[tuple[str, int, int]]]:
    s = build_schedule(name, p, m, v)
    return {r: s.actions(r) for r in range(p)}


PM = [(2, 2), (2, 5), (3, 3), (4, 4), (4, 8), (4, 10), (5, 12), (8, 8), (8, 16)]


@pytest.mark.parametrize("p,m", PM)
def test_gpipe_equals_torch(p: int, m: int) -> None:
    assert ours("gpipe", p, m, 1) == torch_order(schedules.ScheduleGPipe, p, m, 1)


@pytest.mark.parametrize("p,m", PM)
def test_1f1b_equals_torch(p: int, m: int) -> None:
    theirs = torch_order(schedules.Schedule1F1B, p, m, 1)
    mine = ours("1f1b", p, m, 1)
    for r in range(p - 1):
        assert mine[r] == theirs[r], r
    # torch 2.13's Schedule1F1B._get_pipeline_order numbers the last rank's forwards from 1
    # (F1 B0 F2 B1 ... F_m B_{m-1}); the order its runtime executes (_step_microbatches: one
    # warm-up forward, then B/F pairs) is F0 B0 F1 B1 ... — that is the one we emit.
    last = p - 1
    assert theirs[last] == [(k, s, j + 1 if k == "F" else j) for k, s, j in mine[last]]
    assert mine[last] == [x for j in range(m) for x in (("F", last, j), ("B", last, j))]


@pytest.mark.parametrize("p,m,v", [(2, 2, 2), (2, 4, 3), (4, 4, 2), (4, 8, 2), (4, 10, 2),
                                   (4, 3, 2), (3, 9, 3), (8, 16, 2), (8, 24, 4)])
def test_interleaved_equals_torch(p: int, m: int, v: int) -> None:
    assert ours("interleaved-1f1b", p, m, v) == torch_order(
        schedules.ScheduleInterleaved1F1B, p, m, v)


@pytest.mark.parametrize("p,m,v", [(2, 2, 1), (4, 4, 1), (4, 8, 1), (4, 10, 1), (8, 16, 1),
                                   (4, 8, 2), (3, 9, 3), (8, 16, 2)])
def test_zb_h1_equals_torch_interleaved_zero_bubble(p: int, m: int, v: int) -> None:
    assert ours("zb-h1", p, m, v) == torch_order(
        schedules.ScheduleInterleavedZeroBubble, p, m, v)


@pytest.mark.parametrize("p,m", [(2, 2), (2, 5), (4, 4), (4, 8), (4, 12), (8, 16), (3, 7)])
def test_zb_v_equals_torch(p: int, m: int) -> None:
    assert ours("zb-v", p, m, 2) == torch_order(schedules.ScheduleZBVZeroBubble, p, m, 2)


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 12), (3, 6), (8, 16), (8, 20)])
def test_dualpipe_v_equals_torch(p: int, m: int) -> None:
    assert ours("dualpipe-v", p, m, 2) == torch_order(schedules.ScheduleDualPipeV, p, m, 2)


@pytest.mark.parametrize("name,p,m,v", [
    ("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1), ("interleaved-1f1b", 4, 8, 2), ("zb-h1", 4, 8, 1),
    ("zb-h2", 4, 8, 1), ("zb-h2", 6, 9, 1), ("zb-v", 4, 8, 2), ("dualpipe-v", 4, 8, 2),
    ("dualpipe", 4, 8, 1), ("dualpipe", 8, 20, 1), ("dualpipe", 2, 4, 1),
])
def test_every_action_once_and_dependencies_in_rank_order(name: str, p: int, m: int, v: int) -> None:
    s = build_schedule(name, p, m, v)
    seen = {}
    for r in range(p):
        for pos, (kind, stage, mb) in enumerate(s.actions(r)):
            assert s.stage_to_rank[stage] == r
            assert (kind, stage, mb) not in seen
            seen[(kind, stage, mb)] = (r, pos)
    for stage in range(s.num_stages):
        for mb in range(s.microbatches):
            f = seen.pop(("F", stage, mb))
            if ("B", stage, mb) in seen:
                b = seen.pop(("B", stage, mb))
                assert f < b
            else:
                i, w = seen.pop(("I", stage, mb)), seen.pop(("W", stage, mb))
                assert f < i < w
    assert not seen


def test_dualpipe_runs_both_directions() -> None:
    s = build_schedule("dualpipe", 4, 8, 1)
    # rank 0 holds forward-direction stage 0 and reverse-direction stage 3 (virtual stage 7)
    assert {st for _, st, _ in s.actions(0)} == {0, 7}
    assert s.prev_stage[4] == -1 and s.next_stage[3] == -1 and s.next_stage[7] == -1


@pytest.mark.parametrize("name,p,m,v,field", [
    ("1f1b", 4, 3, 1, "microbatches"),
    ("zb-v", 4, 8, 1, "virtual_stages"),
    ("zb-v", 4, 8, 3, "virtual_stages"),
    ("dualpipe-v", 4, 7, 2, "microbatches"),
    ("dualpipe", 3, 8, 1, "stages"),
    ("dualpipe", 4, 9, 1, "microbatches"),
    ("interleaved-1f1b", 4, 9, 2, "microbatches"),
    ("interleaved-1f1b", 4, 8, 1, "virtual_stages"),
    ("gpipe", 4, 8, 2, "virtual_stages"),
])
def test_constraints_name_the_rule(name: str, p: int, m: int, v: int, field: str) -> None:
    with pytest.raises(ScheduleConstraintError) as err:
        build_schedule(name, p, m, v)
    assert err.value.field == field
    assert name in err.value.rule


def test_zb_h2_fast_forward_equals_the_plain_pass() -> None:
    """The periodic fast forward of ZB-H2's list pass emits exactly the plain pass's orders."""
    from planner.layouts.pipeline_schedules import _zb_h2
    n_ff = 0
    for p in [*range(1, 13), 16, 24, 33]:
        for m in [*range(p, 3 * p + 24, 3), 100, 257]:
            fast, plain = _zb_h2(p, m), _zb_h2(p, m, fast_forward=False)
            assert fast.orders == plain.orders, (p, m)
            n_ff += m > 6 * p
    assert n_ff > 10  # cases long enough to have a periodic middle


def test_zb_h2_steps_at_once_equal_the_plain_pass() -> None:
    """ZB-H2's pass with every rank's step at once (``pipeline_zb_h2``, what deep pipelines
    take) emits exactly the rank-by-rank pass's orders, shallow and deep."""
    import numpy as np

    from planner.layouts.pipeline_schedules import WIDE_ZB_H2, _zb_h2
    from planner.layouts.pipeline_zb_h2 import orders
    cases = [(p, m) for p in [*range(1, 13), 16, 33] for m in [*range(p, 3 * p + 24, 5), 100]]
    cases += [(64, 64), (64, 131), (96, 200)]
    for p, m in cases:
        plain = _zb_h2(p, m, fast_forward=False).orders
        assert [list(o) for o in plain] == [o.tolist() for o in orders(p, m)[0]], (p, m)
    deep = _zb_h2(WIDE_ZB_H2[0], WIDE_ZB_H2[0] + 3)  # (the builder takes the wide pass)
    plain = _zb_h2(WIDE_ZB_H2[0], WIDE_ZB_H2[0] + 3, fast_forward=False)
    assert all(np.array_equal(a, b) for a, b in zip(deep.orders, plain.orders))


def test_zb_h2_first_rank_in_flight_in_closed_form() -> None:
    """The composed approximation reads ZB-H2's first-rank micro-batches in flight as
    min(m, 2p - 1) (its pass caps rank 0 there, and the first input gradient comes back after
    2p - 1 forwards) instead of building the schedule: equal to the pass's over every p up to
    16 and m from p to 3p + 4 (and two longer counts), and p where the constraints fail."""
    from planner.layouts.compose import _first_stage_in_flight
    from planner.layouts.pipeline_sim import peak_in_flight
    for p in range(1, 17):
        for m in [*range(p, 3 * p + 5), 4 * p, 7 * p + 3]:
            want = peak_in_flight(build_schedule("zb-h2", p, m, 1), [0])[0]
            assert _first_stage_in_flight.__wrapped__("zb-h2", p, m, 1) == want == min(m, 2 * p - 1)
    assert _first_stage_in_flight.__wrapped__("zb-h2", 8, 4, 1) == 8  # m < p: not a schedule
