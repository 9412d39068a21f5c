"""A rank's shortened lists derived for a new micro-batch count from two searched ones
(planner/layouts/pipeline_families.py) against the plain search.

Over every schedule kind (GPipe, 1F1B, interleaved 1F1B with 2 and 3 virtual stages, ZB-H1 with
1 and 2, ZB-H2, ZB-V, DualPipe-V, DualPipe), pipeline sizes 2, 4, 8 and 16 and seeded random
sequences of micro-batch counts, ``rank_lists`` derives a count where it can: every derived
rank's lists, periods left out and signature equal those of the plain search
(``shortened_lists`` on the count's own action list), and each schedule kind derives some. The
columns the check reads equal ``rank_actions``; an extrapolation that does not hold on the list
is refused; and templates evaluated with derived lists equal the full replay.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from planner.layouts import pipeline_structure as pst
from planner.layouts.pipeline_families import columns, derive, known, record
from planner.layouts.pipeline_memory import PipelineRankProgram, rank_actions
from planner.layouts.pipeline_periods import shortened_lists
from planner.layouts.pipeline_replays import stage_roles
from planner.layouts.pipeline_schedules import ScheduleConstraintError, build_schedule
from planner.layouts.pipeline_structure import Signature, compile_pipeline_structure, rank_lists
from planner.step.structure import structure_of
from tests.test_pipeline_structure import SETTINGS, _arch, _same, _setup

KINDS = [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("interleaved-1f1b", 3),
         ("zb-h1", 1), ("zb-h1", 2), ("zb-h2", 1), ("zb-v", 2), ("dualpipe-v", 2),
         ("dualpipe", 1)]


class _Model:  # rank_lists reads the block count only
    num_layers = 96


def _plain(sched, rank: int, model):
    actions = rank_actions(sched, rank)
    groups, lists = shortened_lists(actions)
    if not groups:
        lists = [(actions, sched.microbatches)]
    role = stage_roles(sched, rank, model).get
    sig = Signature((mb, tuple([(k, role(st), j, f) for k, st, j, f in items]))
                    for items, mb in lists)
    return sig, tuple(g[0].dropped for g in groups), lists


@pytest.fixture(autouse=True)
def _every_count_searched_or_derived(monkeypatch):
    """Interleaved 1F1B below nine rounds take their whole list (``WHOLE_BELOW_ROUNDS``): off
    here, so the derivation, which serves longer lists, is held to the search on the small
    counts these tests can afford."""
    monkeypatch.setattr(pst, "WHOLE_BELOW_ROUNDS", 0)


def _fresh() -> None:
    pst._LISTS.clear()
    pst._KNOWN.clear()


@pytest.mark.parametrize("name,v", KINDS)
def test_derived_lists_equal_the_plain_search(name: str, v: int) -> None:
    derived = 0
    for seed, p in enumerate((2, 4, 8, 16)):
        rng = random.Random(seed * 101 + len(name) + v)
        _fresh()
        top = 16 * p if p < 16 else 6 * p
        ms = [rng.choice([rng.randint(1, top), p * rng.randint(1, top // p)])
              for _ in range(16 if p < 16 else 8)]
        for m in ms:
            try:
                sched = build_schedule(name, p, m, v)
            except ScheduleConstraintError:
                continue
            for rank in range(sched.num_ranks):
                before = pst.COUNTS["derived"]
                rl = rank_lists(sched, rank, _Model)
                if pst.COUNTS["derived"] == before:
                    continue
                derived += 1
                sig, dropped, lists = _plain(sched, rank, _Model)
                assert (rl.signature, rl.dropped) == (sig, dropped), (name, v, p, m, rank)
                assert rl.lists == lists, (name, v, p, m, rank)
    _fresh()
    assert derived >= 3, (name, v, derived)


def rank_columns(name: str, v: int, layouts):
    """Per (p, m) of ``layouts`` the schedule builds, per rank: (p, m, rank, the rank's decoded
    columns, its ``rank_actions`` list)."""
    for p, m in layouts:
        try:
            sched = build_schedule(name, p, m, v)
        except ScheduleConstraintError:
            continue
        for rank in range(sched.num_ranks):
            yield p, m, rank, columns(sched, rank), rank_actions(sched, rank)


@pytest.mark.parametrize("name,v", KINDS)
def test_columns_are_the_rank_actions(name: str, v: int) -> None:
    kinds = {"F": 0, "B": 1, "I": 2, "W": 3}
    for _, _, _, (tok, mb, flag), want in rank_columns(name, v,
                                                       ((2, 6), (4, 8), (4, 13), (8, 24))):
        assert tok.tolist() == [kinds[k] + 4 * st for k, st, _, _ in want]
        assert mb.tolist() == [j for _, _, j, _ in want]
        flags = [f for _, _, _, f in want]
        assert (flag.tolist() if name == "1f1b" else flag) == (flags if flag is not None
                                                                else None)
        assert flag is not None or not any(flags)


def _history(name: str, p: int, v: int, ms, rank: int) -> dict:
    history = {}
    for m in ms:
        sched = build_schedule(name, p, m, v)
        groups, lists = shortened_lists(rank_actions(sched, rank))
        rl = pst.RankLists(Signature(), tuple(g[0].dropped for g in groups), lists)
        record(history, known(m, rl, groups, columns(sched, rank)))
    return history


def test_an_extrapolation_that_does_not_hold_is_refused() -> None:
    history = _history("1f1b", 4, 1, (16, 20), 1)
    sched = build_schedule("1f1b", 4, 28, 1)
    cols = columns(sched, 1)
    got = derive(history, 28, lambda: cols)
    assert got is not None and got[1] == tuple(d + 3 * (d2 - d) for d, d2 in zip(
        history[16].lists.dropped, history[20].lists.dropped))
    sched30 = build_schedule("1f1b", 4, 30, 1)
    groups, lists = shortened_lists(rank_actions(sched30, 1))
    assert derive(history, 30, lambda: columns(sched30, 1))[:2] == (  # between the steps: the same
        history[16].lists, tuple(g[0].dropped for g in groups))
    assert lists == history[16].lists.lists
    sched12 = build_schedule("1f1b", 4, 12, 1)  # below the known counts: the same lists
    groups, lists = shortened_lists(rank_actions(sched12, 1))
    assert derive(history, 12, lambda: columns(sched12, 1))[:2] == (
        history[16].lists, tuple(g[0].dropped for g in groups))
    sched8 = build_schedule("1f1b", 4, 8, 1)  # too few periods left out: refused
    assert derive(history, 8, lambda: columns(sched8, 1)) is None
    tok, mb, flag = cols
    for bad in ((tok[::-1].copy(), mb, flag),  # another list, as long
                (tok, mb + (np.arange(len(mb)) == len(mb) // 2), flag),  # a period not alike
                (tok[:-2], mb[:-2], flag[:-2])):  # another length
        assert derive(history, 28, lambda bad=bad: bad) is None
    assert derive(history, 28, lambda: (tok, mb, None)) is None  # flags expected
    moved = flag.copy()  # a flag inside the left-out periods
    moved[len(flag) // 2] = 2
    assert derive(history, 28, lambda: (tok, mb, moved)) is None


@pytest.mark.parametrize("name,v,p", [("1f1b", 1, 4), ("interleaved-1f1b", 2, 2),
                                      ("zb-h1", 1, 4), ("zb-v", 2, 2)])
def test_templates_on_derived_lists_equal_the_full_replay(name: str, v: int, p: int) -> None:
    """Three searched counts, each rank's template compiled at the first model of its lists;
    then counts derived from them: each derived rank is answered by a template compiled at a
    searched count (a new model, more periods left out), equal to the full replay."""
    rng = random.Random(len(name) * 7 + p)
    _fresh()
    step = p if name == "interleaved-1f1b" else 1
    layers = 2 * p * v
    tpls: dict = {}
    reused = 0
    for i in (0, 1, 2, 3, 5):
        m = 6 * p + i * step
        model, tr = _setup(_arch("llama", True, rng, layers), SETTINGS[0], m, rng)
        dom, names, values = structure_of(model, tr.micro_batch_size, tr.sequence_length)
        sched = build_schedule(name, p, m, v)
        for r in range(sched.num_ranks):
            before = pst.COUNTS["derived"]
            rl = rank_lists(sched, r, model)
            if pst.COUNTS["derived"] == before:
                tpls.setdefault((r, rl.signature), compile_pipeline_structure(
                    model, tr, sched, r, "cuda", names, dom[0], values, rl))
                continue
            reused += 1
            full = PipelineRankProgram(model, tr, sched, r, device="cuda").run_steps()
            got = tpls[r, rl.signature].evaluate((*values, *rl.dropped))
            assert _same(got, full), (m, r)
    assert reused >= sched.num_ranks
    _fresh()
