"""When /v1/memory compiles a setup's template ahead of its largest-micro-batch search
(planner/routes/micro_batch.py: ``compile_ahead_pays``, ``hold_compiles``): only when the
search can ask the template's domain for more sizes than a compile costs in replays. Counted
with ``cache.COUNTS`` (replays and compiles of ``cache.cached``); the answers equal the op-by-op
replay's whatever is compiled."""

from __future__ import annotations

import pytest

from planner.catalog.specs import MemoryRequest
from planner.machine import cache
from planner.routes import memory as M
from planner.routes.micro_batch import compile_ahead_pays, hold_compiles
from planner.step import simulate as step_cache

_MODEL = {"family": "llama", "num_layers": 4, "hidden_size": 256, "num_heads": 4,
          "vocab_size": 32000, "max_sequence_length": 4096}


def _req(b: int, mem: int | None) -> MemoryRequest:
    body = {"model": _MODEL, "training": {"micro_batch_size": b, "sequence_length": 512}}
    if mem is not None:
        body["hardware"] = {"memory_bytes": mem}
    return MemoryRequest.model_validate(body)


def _need(b: int) -> int:
    cache.clear()
    r = M.estimate_memory(_req(b, None), explain=False)
    return r.breakdown.total + r.allocator_reserve_bytes


def _counted(req: MemoryRequest):
    cache.clear()
    before = dict(cache.COUNTS)
    with step_cache.structure_mode("off"):  # the setup's own replays and compiles
        res = M.estimate_memory(req, explain=False)
    return res, {k: cache.COUNTS[k] - before[k] for k in before}


def test_the_rule_counts_the_search_probes() -> None:
    # a misfit at b0 leaves the sizes 2..b0-1 of the domain: b0 - 1 in all, against ~3 replays
    assert [b for b in range(2, 9) if compile_ahead_pays(b)] == [5, 6, 7, 8]
    assert hold_compiles(4, b0_fits=False) == 4
    assert hold_compiles(2, b0_fits=False) == 3
    assert hold_compiles(4, b0_fits=True) is None  # climbing: compiled at the second size
    assert hold_compiles(64, b0_fits=False) is None  # compiled ahead already


@pytest.mark.parametrize("b0", [2, 3, 4])
def test_nothing_compiled_when_a_small_misfit_leaves_few_sizes(b0: int) -> None:
    """Nothing fits (less memory than micro-batch 1 needs): the search probes 2 (below b0) and
    1, all replayed, none compiled, and the answer is the replay's."""
    mem = _need(1) - 1
    res, n = _counted(_req(b0, mem))
    assert res.fit.max_micro_batch_size is None
    assert n["compiles"] == 0, n
    # b0, then 2 (when below b0), then 1: one replay each
    assert n["replays"] == (2 if b0 == 2 else 3), n


def test_a_small_misfit_with_room_below_is_replayed_probe_by_probe() -> None:
    """b0 = 4 does not fit, 3 does: the search asks 4, 2, 3 of the domain, replays all three
    and compiles none (a compile costs about three replays)."""
    mem = _need(3)
    res, n = _counted(_req(4, mem))
    assert res.fit.max_micro_batch_size == 3
    assert n == {"replays": 3, "compiles": 0}, n


def test_a_large_micro_batch_is_compiled_ahead() -> None:
    """b0 = 16 with hardware: compiled at its first sight (one compile, no replay of the domain),
    and the search's sizes are evaluated from the template; without hardware no search
    follows and the estimate is one replay."""
    mem = _need(6)
    res, n = _counted(_req(16, mem))
    assert res.fit.max_micro_batch_size == 6
    assert n == {"replays": 0, "compiles": 1}, n
    _, n = _counted(_req(16, None))
    assert n == {"replays": 1, "compiles": 0}, n


def test_a_small_fitting_micro_batch_is_compiled_at_the_second_size() -> None:
    """b0 = 3 fits: replayed, then the search climbs and the setup is compiled at its second
    size, as any setup is."""
    mem = _need(12)
    res, n = _counted(_req(3, mem))
    assert res.fit.max_micro_batch_size == 12
    assert n == {"replays": 1, "compiles": 1}, n


@pytest.mark.parametrize("b0,fit_at", [(2, 1), (3, 2), (4, 3), (4, 9), (6, 1), (6, 4), (16, 7)])
def test_answers_equal_the_replay(b0: int, fit_at: int) -> None:
    mem = _need(fit_at)
    cache.clear()
    got = M.estimate_memory(_req(b0, mem))
    cache.clear()
    with cache.replay_only():
        want = M.estimate_memory(_req(b0, mem))
    assert got.model_dump_json() == want.model_dump_json()
    assert got.fit.max_micro_batch_size == fit_at
