"""A pipeline rank structure's compile with its actions composed per kind.

``compile_pipeline_structure`` (planner/layouts/pipeline_structure.py) replays a rank's
shortened lists on the recording machine with the sizes symbolic; the repeated forwards and
backwards are composed from one record per kind (planner/layouts/pipeline_actions.py), each
composed action logging only the marks that can be its first highest for some sizes
(``undominated``, planner/layouts/pipeline_replays.py). Checked here: templates compiled that
way equal those compiled with every action op by op and the full replay, at new models of the
structure, for every composed schedule (GPipe, 1F1B, interleaved 1F1B, ZB-H1, ZB-H2, ZB-V),
with actions really composed; and ``undominated`` keeps the first highest total at every
sampled point of the domain.
"""

from __future__ import annotations

import random

import pytest

from planner.layouts import pipeline_actions
from planner.layouts.pipeline_machines import undominated
from planner.layouts.pipeline_memory import PipelineRankProgram
from planner.layouts.pipeline_schedules import ScheduleConstraintError, build_schedule
from planner.layouts.pipeline_structure import compile_pipeline_structure, rank_lists
from planner.machine.symbolic import MPoly, Poly, Space
from planner.step.structure import structure_of
from tests.test_pipeline_structure import SETTINGS, _arch, _setup

COMPOSED = [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1), ("zb-h2", 1),
            ("zb-v", 2), ("dualpipe-v", 2)]


@pytest.mark.parametrize("seed", range(14))
def test_composed_compile_equals_op_by_op_and_the_replay(seed: int, monkeypatch) -> None:
    rng = random.Random(100 + seed)
    name, v = COMPOSED[seed % len(COMPOSED)]
    family, gqa = [("gpt2", False), ("llama", False), ("llama", True)][seed % 3]
    setting = SETTINGS[seed % len(SETTINGS)]
    p = 2 if name in ("zb-v", "dualpipe-v") else rng.choice([2, 3, 4])
    m = p * rng.randint(2, 5)
    try:
        sched = build_schedule(name, p, m, v)
    except ScheduleConstraintError:
        sched = build_schedule(name, p, 4 * p, v)
        m = 4 * p
    layers = sched.num_stages * rng.randint(1, 2)
    witness, tr = _setup(_arch(family, gqa, rng, layers), setting, m, rng)
    dom, names, values = structure_of(witness, tr.micro_batch_size, tr.sequence_length)
    composed = []
    real = pipeline_actions.ActionMemo._compose_forward

    def counting(self, *a):
        composed.append(1)
        return real(self, *a)
    monkeypatch.setattr(pipeline_actions.ActionMemo, "_compose_forward", counting)
    for rank in range(sched.num_ranks):
        rl = rank_lists(sched, rank, witness)
        tpl = compile_pipeline_structure(witness, tr, sched, rank, "cuda", names, dom[0],
                                         values, rl)
        with pipeline_actions.op_by_op():
            plain = compile_pipeline_structure(witness, tr, sched, rank, "cuda", names, dom[0],
                                               values, rl)
        for _ in range(3):  # new models of the structure (same domain: sizes >= 2)
            model, tr2 = _setup(_arch(family, gqa, rng, layers), setting, m, rng)
            d2, _, vals = structure_of(model, tr2.micro_batch_size, tr2.sequence_length)
            if d2 != dom:
                continue
            full_values = (*vals, *rl.dropped)
            if tpl.admits is not None and not tpl.admits(*full_values):
                continue
            got = tpl.evaluate(full_values)
            assert got == plain.evaluate(full_values), (name, p, m, rank)
            full = PipelineRankProgram(model, tr2, sched, rank, device="cuda").run_steps()
            assert (got[0], got[1]) == (full.first, full.steady), (name, p, m, rank)
    assert composed, (name, p, m)  # the compile composed actions


def _value(x, point: tuple[int, ...]) -> int:
    if isinstance(x, int):
        return x
    if isinstance(x, Poly):
        return sum(c * (point[0] - 2) ** i * (point[1] - 2) ** j for (i, j), c in x.t.items())
    out = 0
    for e, c in x.t.items():
        for v, k in zip(point, e):
            c *= v ** k
        out += c
    return out


@pytest.mark.parametrize("seed", range(20))
def test_undominated_keeps_every_first_highest(seed: int) -> None:
    """Random totals (ints, polynomials in three sizes >= 2, or in b = B - 2, t = T - 2), some
    equal, some shifted by constants: at random points the first highest is always kept, and a
    total left out is below an earlier one or strictly below a later one at every point."""
    rng = random.Random(seed)
    sp = Space(("a", "b", "c"), (2, 2, 2))
    poly = seed % 2 == 0

    def rand():
        if poly:
            return Poly.make({(i, j): rng.randint(-3, 5) for i in range(2) for j in range(2)
                              if rng.random() < 0.6})
        t = {}
        for _ in range(rng.randint(0, 4)):
            e = tuple(rng.randint(0, 2) for _ in range(3))
            t[e] = t.get(e, 0) + rng.randint(-4, 6)
        return MPoly(t, sp)._make(t) if t else rng.randint(-5, 5)
    base = [rand() for _ in range(rng.randint(1, 12))]
    totals = []
    for _ in range(rng.randint(2, 25)):
        x = rng.choice(base)
        totals.append(x + rng.choice([0, 0, 1, -1, 3]))
    keep = set(undominated(totals))
    pts = [tuple(rng.randint(2, 40) for _ in range(3)) for _ in range(300)]
    for pt in pts:
        vals = [_value(t, pt) for t in totals]
        assert vals.index(max(vals)) in keep, (totals, pt)
    for i in set(range(len(totals))) - keep:
        for pt in pts[:50]:
            vals = [_value(t, pt) for t in totals]
            assert any(vals[j] >= vals[i] for j in range(i)) or \
                any(vals[j] > vals[i] for j in range(i + 1, len(totals)))
