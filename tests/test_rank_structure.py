"""Structure templates of data-parallel ranks (planner/step/rank_structure.py) against the
op-by-op replay.

Tolerance: none. A rank's structure template, compiled once at one model (and rank class),
must give every model of the structure it admits the peaks the concrete replay gives (total,
every category, op and phase of all six peaks) under DDP and FSDP2 ZeRO-2/3, for rank 0 (every
piece full), the last rank and a rank holding a partial piece; estimate_memory through it must
equal estimate_memory under ``replay_only()`` with structures off, field by field.
"""

from __future__ import annotations

import random
import zlib

import pytest

from planner.catalog.presets import resolve_model
from planner.catalog.specs import MemoryRequest, ModelSpec, ParallelSpec, TrainingSpec
from planner.layouts.data_parallel import ParallelProgram
from planner.layouts.parallel_ranks import empty_shard_rule, unsupported_reason
from planner.machine import cache
from planner.routes import memory as pm
from planner.routes.checkpoint_blocks import checkpointed_blocks
from planner.step import simulate as step_cache
from planner.step import structures
from planner.step.rank_structure import EMPTY, PARTIAL, shard_rows_of
from planner.step.structure import structure_of

# a rank's template leaves the activation-and-temporaries peak out (nothing reads a rank's):
# reading it raises (``_left_out``), where the replay has it
FIELDS = ("first", "steady", "forward_peak", "fb_steady", "act_max")


def _act_left_out(got) -> None:
    with pytest.raises(LookupError, match="leaves the activation-and-temporaries peak out"):
        got.act_peak

SETTINGS: list[dict] = [
    {},
    {"precision": "mixed-bf16"},
    {"precision": "fp32", "optimizer": "sgd-momentum"},
    {"precision": "bf16", "attention": "eager", "dropout": 0.1},
    {"gradient_accumulation_steps": 2},
    {"activation_checkpointing": {"strategy": "full"}},
    {"activation_checkpointing": {"strategy": "every-k", "every_k": 2}},
    {"optimizer_implementation": "fused"},
    {"lora": {"rank": 4, "target_modules": ["q", "v"]}},
    {"precision": "mixed-fp16"},
    {"optimizer": "adafactor"},
]


def _arch(family: str, rng: random.Random, layers: int = 4) -> dict:
    """A random model of the general domain (every size >= 2, llama's head dimension even),
    first dimensions mostly not divisible by the world size (partial and empty pieces)."""
    nkv = rng.choice([2, 3, 5])
    g = rng.choice([2, 3])
    hd = 2 * rng.choice([2, 3, 8, 32]) if family == "llama" else rng.choice([2, 5, 64])
    return {"family": family, "num_layers": layers, "hidden_size": nkv * g * hd,
            "num_heads": nkv * g, "num_kv_heads": nkv if family == "llama" else None,
            "ffn_hidden_size": rng.choice([2, 3, rng.randint(4, 3000)]),
            "vocab_size": rng.choice([2, 5, rng.randint(6, 60000)]),
            "max_sequence_length": rng.randint(2, 5000)}


def _same(a, b) -> bool:
    return (a.total, list(a.by_cat), a.op, a.phase) == (b.total, list(b.by_cat), b.op, b.phase)


def _replayed(model, tr, par, rank, ck):
    """The concrete replay through ``simulate`` (templates and structures off)."""
    cache._SIM_CACHE.clear()
    with step_cache.replay_only(), step_cache.structure_mode("off"):
        return step_cache.simulate(model, tr, "cuda", ck, par, rank, program=ParallelProgram)


def _ranks(model, tr, par, names, half, values, ck) -> list[int]:
    """Rank 0, the last rank, and a rank holding a partial piece of some first dimension."""
    n = par.data_parallel
    ranks = [0, n - 1]
    if par.zero_stage >= 2:
        sh = shard_rows_of(model, tr, "cuda", ck, names, half, par)
        for r in range(1, n - 1):
            if PARTIAL in sh.extend(values, r)[0]:
                ranks.append(r)
                break
    return ranks


CASES = [(fam, z, n, i) for fam in ("gpt2", "llama") for z, n in ((0, 4), (3, 3), (3, 8))
         for i in range(len(SETTINGS))]
CASES += [(fam, 2, 5, i) for fam in ("gpt2", "llama") for i in (0, 5)]


@pytest.mark.parametrize("family,zero,n,setting", CASES,
                         ids=[f"{f}-z{z}-n{n}-{i}" for f, z, n, i in CASES])
def test_rank_structure_equals_replay(family, zero, n, setting):
    """Random models of one structure, each at its worst, last and a partial rank: estimated
    from the rank's structure template (compiled at the first model of each rank class, sync)
    and equal to the concrete replay; at least one estimate is a model other than the one its
    template was compiled at (but under Adafactor, whose guards on the order of its per-tensor
    factors rarely hold for two random models)."""
    var = SETTINGS[setting]
    rng = random.Random(zlib.crc32(f"{family}{zero}{n}{setting}".encode()))
    par = ParallelSpec(data_parallel=n, zero_stage=zero)
    base = TrainingSpec.model_validate({**var, "micro_batch_size": 2, "sequence_length": 2})
    if unsupported_reason(base, par) is not None:
        pytest.skip("outside the multi-rank replay")
    ck = frozenset(checkpointed_blocks(base, 4))
    structures._clear()
    evaluated = reused = 0
    compiled: set = set()
    models = 0
    for _ in range(40):  # Adafactor refuses a rank with an empty piece: those are redrawn
        arch = _arch(family, rng)
        if var.get("optimizer") == "adafactor":
            arch |= {"ffn_hidden_size": rng.randint(64, 4000), "vocab_size": rng.randint(64, 9000),
                     "max_sequence_length": rng.randint(64, 5000)}
        model = resolve_model(ModelSpec.model_validate(arch))
        if empty_shard_rule(model, base, par) is not None:
            continue
        models += 1
        if models > 4:
            break
        tr = base.model_copy(update={"micro_batch_size": rng.choice([2, 3, rng.randint(4, 9)]),
                                     "sequence_length": rng.choice([2, rng.randint(3, 700)])})
        dom, names, values = structure_of(model, tr.micro_batch_size, tr.sequence_length)
        for rank in _ranks(model, tr, par, names, dom[0], values, ck):
            skey = cache.setup_key(model, tr, "cuda", ck, par, rank)
            key = structures._structure_key(skey, model, tr, dom)
            known = structures._STRUCTURES.get(key)
            before = len(known.templates) if known is not None else 0
            with step_cache.structure_mode("sync"):
                got = structures.estimate(skey, model, tr, "cuda", ck, par, rank,
                                          ParallelProgram)
            assert got is not None, (model, rank)  # the template's evaluation, not a replay
            want = _replayed(model, tr, par, rank, ck)
            for f in FIELDS:
                assert _same(getattr(got, f), getattr(want, f)), (model, tr, rank, f)
            _act_left_out(got)
            evaluated += 1
            classes = structures._STRUCTURES[key].shards.extend(values, rank)[0]
            if len(structures._STRUCTURES[key].templates) == before:
                reused += 1  # answered by a template compiled at another model or rank
            compiled.add(classes)
    assert evaluated >= 3
    if var.get("optimizer") != "adafactor":  # its per-tensor factors' order: a variant a model
        assert reused >= 1


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fsdp_rank_classes_cover_full_partial_and_empty(family):
    """The last ranks of a world larger than a first dimension's rows hold no piece of it; the
    rank templates of those classes equal the replay too."""
    rng = random.Random(17)
    arch = {**_arch(family, rng), "vocab_size": 13, "ffn_hidden_size": 7}  # 2 rows per rank
    model = resolve_model(ModelSpec.model_validate(arch))
    par = ParallelSpec(data_parallel=8, zero_stage=3)
    tr = TrainingSpec.model_validate({"micro_batch_size": 2, "sequence_length": 16})
    dom, names, values = structure_of(model, 2, 16)
    seen = set()
    structures._clear()
    for rank in range(8):
        skey = cache.setup_key(model, tr, "cuda", frozenset(), par, rank)
        with step_cache.structure_mode("sync"):
            got = structures.estimate(skey, model, tr, "cuda", frozenset(), par, rank,
                                      ParallelProgram)
        want = _replayed(model, tr, par, rank, frozenset())
        for f in FIELDS:
            assert _same(getattr(got, f), getattr(want, f)), (rank, f)
        _act_left_out(got)
        key = structures._structure_key(skey, model, tr, dom)
        seen.update(structures._STRUCTURES[key].shards.extend(values, rank)[0])
    assert {PARTIAL, EMPTY} <= seen


@pytest.mark.parametrize("seed", range(6))
def test_estimates_of_new_models_under_data_parallelism_equal_the_replay(seed):
    """estimate_memory of never-seen models under DDP and ZeRO-3 (sync structure compiles)
    equals estimate_memory under replay_only() with structures off, field by field."""
    rng = random.Random(seed)
    family = rng.choice(["gpt2", "llama"])
    var = rng.choice(SETTINGS[:9])
    par = {"data_parallel": rng.choice([2, 4, 8, 64]), "zero_stage": rng.choice([0, 3])}
    reqs = [MemoryRequest.model_validate({
        "model": _arch(family, rng, layers=6) | {"max_sequence_length": rng.randint(512, 5000)},
        "training": {**var, "micro_batch_size": rng.randint(2, 8),
                     "sequence_length": rng.choice([64, 512])},
        "parallelism": par}) for _ in range(4)]
    pm.clear_caches()
    with step_cache.structure_mode("sync"):
        got = [pm.estimate_memory(r) for r in reqs]
    # a rank's structure (the parallel spec second to last in its key) was compiled
    assert any(v.templates for k, v in structures._STRUCTURES.items() if k[-2] is not None)
    pm.clear_caches()
    with step_cache.replay_only(), step_cache.structure_mode("off"):
        want = [pm.estimate_memory(r) for r in reqs]
    assert got == want


def test_a_never_seen_model_under_zero3_is_evaluated_after_a_background_compile():
    """Background mode: the first ZeRO-3 estimate of a structure replays and queues the rank's
    compile; once it is done, never-seen models of the structure are answered from it (no
    replay at all) and equal the replay."""
    from planner.step.program import ReferenceProgram

    rng = random.Random(23)
    par = {"data_parallel": 8, "zero_stage": 3}

    def req(a):
        return MemoryRequest.model_validate({"model": a | {"max_sequence_length": 4096},
                                             "training": {"micro_batch_size": 4,
                                                          "sequence_length": 256},
                                             "parallelism": par})
    archs = [_arch("llama", rng) for _ in range(6)]
    pm.clear_caches()
    for a in archs[:2]:
        pm.estimate_memory(req(a))
        step_cache.wait_for_structures()
    assert any(v.templates for k, v in structures._STRUCTURES.items() if k[-2] is not None)
    calls = []
    real = ReferenceProgram.run
    try:
        ReferenceProgram.run = lambda self: calls.append(1) or real(self)
        got = [pm.estimate_memory(req(a)) for a in archs[2:]]
    finally:
        ReferenceProgram.run = real
    assert not calls
    pm.clear_caches()
    with step_cache.replay_only(), step_cache.structure_mode("off"):
        assert got == [pm.estimate_memory(req(a)) for a in archs[2:]]
