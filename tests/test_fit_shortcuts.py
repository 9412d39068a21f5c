"""The shortcuts of POST /v1/memory's fit against the straightforward answers, over random setups.

- ``largest_fitting`` seeded with the estimate's own micro-batch (``known``), probing 2 before 1
  (planner/routes/micro_batch.py) equals the exponential + binary search, and never replays b = 1
  when a larger size fits.
- ``fit.max_micro_batch_size`` of an estimate (its template compiled at first sight,
  ``cache.compile_first``) equals ``_max_micro_batch_search``, one replayed estimate per probe,
  and the whole response equals the one replayed op by op with templates off; a compiled
  structure still answers a never-seen model first (no compile of the setup's own).
- A pipelined setup's fit search stops a probe at its first rank over the memory
  (``stop_above``), that rank's need standing in, with the same answer.
- Suggestions skip the candidates whose model states alone overflow
  (planner/routes/plan_suggest.py: ``states_overflow``) and stop a pipelined candidate at its
  first rank that cannot fit (planner/layouts/pipelined.py: ``stop_above``): the bound is at
  most the peak, a stopped estimate is one whose full answer does not fit, and the suggestions
  are the ones found estimating every candidate in full.
- Suggestions skip the ZeRO stages, more data-parallel ranks and the fused kernel when the
  request's own activations overflow, and stop doubling the ranks at a candidate whose
  activations do (``keeps_activations``): the highest live activation bytes are the same under
  every stage, rank count, kernel and offload, and at most the peak.
"""

from __future__ import annotations

import random

import pytest

from planner.catalog.errors import PlanningError
from planner.catalog.presets import allocator_reserve, resolve_model
from planner.catalog.specs import MemoryRequest
from planner.machine import cache
from planner.routes import memory as M
from planner.routes.checkpoint_blocks import checkpointed_blocks
from planner.layouts.pipelined import Overflows, stop_above
from planner.routes.micro_batch import largest_fitting, largest_fitting_search
from planner.routes.plan_suggest import keeps_activations, state_lower_bound, suggestions


def test_largest_fitting_with_known_probes_equals_search() -> None:
    """Monotone step functions (maxima of affine pieces, as the peak is), random budgets and
    random sizes already known: the same answer as the plain search; b = 1 asked only when
    nothing larger fits."""
    rng = random.Random(14)
    for _ in range(3000):
        pieces = [(rng.randint(0, 50), rng.randint(0, 1000)) for _ in range(rng.randint(1, 3))]
        max_batch = rng.choice([1, 2, 3, 17, 1000, 65536])

        def f(b: int) -> int:
            return max(a * b + c for a, c in pieces)

        mem = rng.randint(0, f(min(max_batch, 2000)) + 100)
        known = {b: f(b) for b in rng.sample(range(1, 3000), rng.randint(0, 2))}
        asked: list[int] = []

        def need(b: int) -> int:
            asked.append(b)
            return f(b)

        got = largest_fitting(need, mem, max_batch, known=known)
        want = largest_fitting_search(lambda b: f(b) <= mem, max_batch)
        assert got == want, (pieces, max_batch, mem, known, got, want)
        if want is not None and want >= 2:
            assert 1 not in asked, (pieces, max_batch, mem, known)


def _random_setup(rng: random.Random) -> MemoryRequest | None:
    layers = rng.choice([4, 6, 8])
    pp = rng.choice([1, 1, 2])
    dp = rng.choice([1, 1, 2, 4])
    ck = rng.choice([{"strategy": "none"}, {"strategy": "full"}, {"strategy": "sqrt"},
                     {"strategy": "every-k", "every_k": 2}])
    body = {
        "model": {"family": rng.choice(["gpt2", "llama"]), "num_layers": layers,
                  "hidden_size": rng.choice([128, 256]), "num_heads": 4,
                  "vocab_size": rng.choice([1000, 4096]), "max_sequence_length": 4096},
        "training": {"micro_batch_size": rng.choice([1, 2, 3, 8]),
                     "sequence_length": rng.choice([128, 512]),
                     "gradient_accumulation_steps": rng.choice([1, 4]) if pp > 1 else 1,
                     "precision": rng.choice(["fp32", "amp-bf16", "bf16"]),
                     "optimizer": rng.choice(["adamw", "sgd"]),
                     "activation_checkpointing": ck if pp == 1 else {"strategy": "none"}},
        "parallelism": {"pipeline_parallel": pp, "data_parallel": dp,
                        "zero_stage": rng.choice([0, 1, 2, 3]) if dp > 1 else 0},
    }
    try:
        return MemoryRequest.model_validate(body)
    except ValueError:
        return None


def _setups(n: int, seed: int) -> list[MemoryRequest]:
    rng = random.Random(seed)
    out: list[MemoryRequest] = []
    while len(out) < n:
        req = _random_setup(rng)
        if req is None:
            continue
        try:
            M.estimate_memory(req, explain=False)
        except (ValueError, PlanningError):
            continue
        out.append(req)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_fit_equals_search_and_replay(seed: int) -> None:
    """Budgets around the setup's own need (nothing fits, exactly its size, more): the
    estimate's fit equals one replayed estimate per probe, and its whole response equals the
    op-by-op replay's (templates off, caches cleared)."""
    rng = random.Random(100 + seed)
    for req in _setups(6, seed):
        model = resolve_model(req.model)
        blocks = checkpointed_blocks(req.training, model.num_layers)
        plain = M.estimate_memory(req, explain=False)
        need = plain.breakdown.total + allocator_reserve(plain.breakdown.total, "cuda")
        for mem in (need - 1, need, need + rng.randint(1, need), 5 * need):
            cache.clear()
            hw = MemoryRequest.model_validate({**req.model_dump(),
                                               "hardware": {"memory_bytes": mem}})
            got = M.estimate_memory(hw)
            want = M._max_micro_batch_search(req, model, "cuda", blocks, mem)
            assert got.fit.max_micro_batch_size == want, (req, mem)
            cache.clear()
            with cache.replay_only():
                replayed = M.estimate_memory(hw)
            assert got.model_dump_json() == replayed.model_dump_json(), (req, mem)


@pytest.mark.parametrize("schedule,v", [("1f1b", 1), ("zb-v", 2), ("dualpipe-v", 2)])
def test_a_pipelined_fit_search_stops_at_a_rank_over_and_equals_search(
        schedule: str, v: int, monkeypatch) -> None:
    """A pipelined setup's fit search estimates a size inside ``stop_above``: a probe stops at
    its first rank over the memory, whose need stands in (at most the setup's, over the
    memory). The answer equals one full estimate per probe, for budgets around the setup's
    own need, and some probe stops early."""
    body = {"model": {"family": "llama", "num_layers": 8, "hidden_size": 128, "num_heads": 4,
                      "vocab_size": 1000, "max_sequence_length": 4096},
            "training": {"micro_batch_size": 8, "sequence_length": 256,
                         "gradient_accumulation_steps": 8},
            "parallelism": {"pipeline_parallel": 2, "pipeline_schedule": schedule}}
    if v > 1:
        body["parallelism"]["virtual_pipeline_stages"] = v
    req = MemoryRequest.model_validate(body)
    model = resolve_model(req.model)
    plain = M.estimate_memory(req, explain=False)
    need = plain.breakdown.total + allocator_reserve(plain.breakdown.total, "cuda")
    stopped = []
    real = M.Overflows.__init__

    def counting(self, rank, need):
        stopped.append(rank)
        real(self, rank, need)
    monkeypatch.setattr(M.Overflows, "__init__", counting)
    for mem in (need // 9, need // 3, need - 1, need, 3 * need):
        cache.clear()
        hw = MemoryRequest.model_validate({**req.model_dump(), "hardware": {"memory_bytes": mem}})
        got = M.estimate_memory(hw).fit.max_micro_batch_size
        assert got == M._max_micro_batch_search(req, model, "cuda", set(), mem), (schedule, mem)
    assert stopped, schedule


def _estimate_or_none(q: MemoryRequest):
    """A suggestion candidate's estimate (None when the changed setup is not a valid one)."""
    try:
        return M.estimate_memory(q, explain=False)
    except (ValueError, PlanningError):
        return None


@pytest.mark.parametrize("seed", [2, 3])
def test_state_bound_below_peak_and_suggestions_unchanged(seed: int) -> None:
    """The bound is at most the peak of every setup; with budgets between the bound and the
    peak (what the pruning decides on), the pruned suggestions are the unpruned ones."""
    rng = random.Random(200 + seed)
    for req in _setups(6, seed):
        model = resolve_model(req.model)
        r = M.estimate_memory(req, explain=False)
        bound = state_lower_bound(model, req.training, req.parallelism)
        assert bound is not None and bound <= r.breakdown.total, req
        act = r.activation_peak_bytes
        mems = [bound, (bound + r.breakdown.total) // 2, r.breakdown.total - 1]
        if act is not None:  # around the activations' own bound
            mems += [act, act + allocator_reserve(act, "cuda") - 1,
                     (act + r.breakdown.total) // 2]
        for mem in mems:
            if mem < 1:
                continue
            cache.clear()
            mb = rng.choice([None, 1])
            pruned = suggestions(req, mem, mb, _estimate_or_none, model, "cuda", activations=act)
            every = suggestions(req, mem, mb, _estimate_or_none, model, "cuda", prune=False)
            assert pruned == every, (req, mem)


def test_stop_above_only_stops_what_does_not_fit() -> None:
    """Pipelined setups under budgets around their need: the estimate inside ``stop_above``
    raises exactly when the full answer's need is over the budget, else it is the full
    answer."""
    rng = random.Random(300)
    reqs = [r for r in _setups(12, 4) if r.parallelism.pipeline_parallel > 1][:4]
    assert reqs
    for req in reqs:
        full = M.estimate_memory(req, explain=False)
        need = full.breakdown.total + full.allocator_reserve_bytes
        for mem in (need // 2, need - 1, need, need + rng.randint(1, need)):
            cache.clear()
            try:
                with stop_above(mem):
                    got = M.estimate_memory(req, explain=False)
            except Overflows:
                assert need > mem, (req, mem)
                continue
            assert got.model_dump_json() == full.model_dump_json(), (req, mem)


def test_a_compiled_structure_answers_before_a_compile_of_the_setup(monkeypatch) -> None:
    """With hardware and a micro-batch above 1 (a search follows), a never-seen model of a
    compiled structure is answered by the structure's template, not by a compile of its own
    setup, and equals the op-by-op replay."""
    from planner.step import simulate as step_cache

    def req(hidden: int) -> MemoryRequest:
        return MemoryRequest.model_validate({
            "model": {"family": "llama", "num_layers": 6, "hidden_size": hidden,
                      "num_heads": hidden // 64, "vocab_size": 32000,
                      "max_sequence_length": 4096},
            "training": {"micro_batch_size": 4, "sequence_length": 512},
            "hardware": {"gpu": "l4-24gb"}})

    cache.clear()
    with step_cache.structure_mode("sync"):
        M.estimate_memory(req(512))
        M.estimate_memory(req(768))
        compiles: list = []
        real = cache.compile_once
        monkeypatch.setattr(cache, "compile_once", lambda *a: compiles.append(a) or real(*a))
        got = [M.estimate_memory(req(h)) for h in (1024, 1536)]
    assert compiles == []
    monkeypatch.undo()
    for h, r in zip((1024, 1536), got):
        cache.clear()
        with cache.replay_only():
            assert r.model_dump_json() == M.estimate_memory(req(h)).model_dump_json(), h


def _activation_setup(rng: random.Random) -> dict:
    return {
        "model": {"family": rng.choice(["gpt2", "llama"]), "num_layers": rng.randint(1, 4),
                  "hidden_size": rng.choice([64, 96, 128]), "num_heads": rng.choice([2, 4]),
                  "vocab_size": rng.choice([100, 257, 512]), "max_sequence_length": 256},
        "training": {"micro_batch_size": rng.randint(1, 4),
                     "sequence_length": rng.choice([16, 33, 64]),
                     "precision": rng.choice(["fp32", "amp-bf16", "mixed-bf16", "bf16",
                                              "amp-fp16"]),
                     "activation_checkpointing": {"strategy": rng.choice(
                         ["none", "full", "selective", "sqrt"])},
                     "optimizer": rng.choice(["adamw", "adam", "sgd"]),
                     "attention": rng.choice(["sdpa", "eager"]),
                     "dropout": rng.choice([0.0, 0.1]),
                     "loss": {"kind": rng.choice(["standard", "standard", "chunked",
                                                  "chunked-linear"]), "chunks": 4},
                     **({"lora": {"rank": 4}} if rng.random() < 0.3 else {})},
        "parallelism": {},
    }


@pytest.mark.parametrize("seed", [0, 1])
def test_activations_are_the_same_under_every_stage_rank_count_and_kernel(seed: int) -> None:
    """What ``keeps_activations`` promises the suggestions: one pipeline and tensor rank, the
    reference step's highest live activation bytes are equal under ZeRO stages 0-3 (offload
    too), 1 to 4096 data-parallel ranks and either optimizer kernel, and at most each peak."""
    rng = random.Random(300 + seed)
    checked = 0
    while checked < 4:
        body = _activation_setup(rng)
        seen: dict[tuple, int] = {}
        for d in (1, 2, 3, 8, 4096):
            for z in range(4):
                for kernel in ("foreach", "fused"):
                    for off in (False, True) if z >= 2 else (False,):
                        q = {**body, "training": {**body["training"],
                                                  "optimizer_implementation": kernel},
                             "parallelism": {"data_parallel": d, "zero_stage": z,
                                             "offload_optimizer": off}}
                        try:
                            req = MemoryRequest.model_validate(q)
                            r = M.estimate_memory(req, explain=False)
                        except (ValueError, PlanningError):
                            continue
                        assert keeps_activations(req.training, req.parallelism)
                        assert r.activation_peak_bytes is not None, q
                        assert r.activation_peak_bytes <= r.breakdown.total, q
                        seen[(d, z, kernel, off)] = r.activation_peak_bytes
        if len(seen) < 10:
            continue
        checked += 1
        assert len(set(seen.values())) == 1, (body, seen)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_checkpoint_plan_with_a_zero_stage_is_skipped_only_when_its_activations_overflow(
        seed: int, monkeypatch) -> None:
    """When no single change fits, a checkpoint plan with a ZeRO stage is estimated unless the
    plan alone had activations that overflow. Budgets at such a pair's own need and around the
    plan's activations: the pruned suggestions are the unpruned ones, and the pairs are found
    (more ranks left out here, as they would fit first; setups without a 16-bit or fused-kernel
    change to suggest)."""
    monkeypatch.setattr("planner.routes.plan_suggest.MAX_EXTRA_RANKS_DOUBLINGS", 0)
    rng = random.Random(400 + seed)
    found = 0
    for _ in range(6):
        body = _activation_setup(rng)
        body["training"].update(activation_checkpointing={"strategy": "none"},
                                loss={"kind": "standard"}, micro_batch_size=rng.randint(2, 4),
                                precision=rng.choice(["fp32", "bf16"]),
                                optimizer_implementation="fused")
        body["training"].pop("lora", None)
        body["parallelism"] = {"data_parallel": rng.choice([2, 4]),
                               "zero_stage": rng.choice([0, 1])}
        req = MemoryRequest.model_validate(body)
        model = resolve_model(req.model)

        own = _estimate_or_none(req)
        for plan in ("full", "sqrt"):
            ck = {"activation_checkpointing": {"strategy": plan}}
            alone = _estimate_or_none(MemoryRequest.model_validate(
                {**body, "training": {**body["training"], **ck}}))
            pair = _estimate_or_none(MemoryRequest.model_validate(
                {**body, "training": {**body["training"], **ck},
                 "parallelism": {**body["parallelism"], "zero_stage": 3}}))
            act = alone.activation_peak_bytes
            for mem in (pair.breakdown.total + pair.allocator_reserve_bytes,
                        act + allocator_reserve(act, "cuda") - 1,
                        act + allocator_reserve(act, "cuda")):
                pruned = suggestions(req, mem, None, _estimate_or_none, model, "cuda",
                                     activations=own.activation_peak_bytes)
                every = suggestions(req, mem, None, _estimate_or_none, model, "cuda", prune=False)
                assert pruned == every, (body, plan, mem)
                found += any(" and zero_stage" in s.change for s in every)
    assert found, "no budget reached a checkpoint plan with a ZeRO stage"


@pytest.mark.parametrize("seed", [0, 1])
def test_fsdp_padded_gather_bound_below_peak_and_suggestions_unchanged(seed: int) -> None:
    """ZeRO-2 and ZeRO-3 over rank counts that do not divide the parameters' first dimensions (up to
    thousands of ranks, where FSDP2's padded all-gather outputs outgrow everything else): the
    bound with the padding is at most the peak, exceeds the one without it, and the pruned
    suggestions are the unpruned ones for budgets between the bound and the peak."""
    from planner.layouts.sharding import fsdp_gather_floor
    rng = random.Random(400 + seed)
    padded = 0
    for _ in range(4):
        body = {"model": {"family": rng.choice(["gpt2", "llama"]), "num_layers": rng.choice([2, 4]),
                          "hidden_size": rng.choice([64, 128]), "num_heads": 4,
                          "vocab_size": rng.choice([500, 1000]), "max_sequence_length": 512},
                "training": {"micro_batch_size": rng.choice([1, 2]),
                             "sequence_length": rng.choice([64, 128]),
                             "precision": rng.choice(["fp32", "amp-bf16", "mixed-bf16", "bf16"]),
                             "optimizer": rng.choice(["adamw", "sgd"]),
                             "activation_checkpointing": {"strategy": rng.choice(["none", "full"])}},
                "parallelism": {"data_parallel": rng.choice([3, 96, 4096]),
                                "zero_stage": rng.choice([2, 3])}}
        req = MemoryRequest.model_validate(body)
        model = resolve_model(req.model)
        cache.clear()
        r = M.estimate_memory(req, explain=False)
        bound = state_lower_bound(model, req.training, req.parallelism)
        assert bound is not None and bound <= r.breakdown.total, body
        pad = fsdp_gather_floor(model, req.training, req.parallelism)
        padded += pad > 0
        for mem in (bound - 1, bound, (bound + r.breakdown.total) // 2):
            cache.clear()
            pruned = suggestions(req, mem, None, _estimate_or_none, model, "cuda",
                                 activations=r.activation_peak_bytes)
            every = suggestions(req, mem, None, _estimate_or_none, model, "cuda", prune=False)
            assert pruned == every, (body, mem)
    assert padded, "no setup padded its all-gathers"
