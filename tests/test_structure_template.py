"""Structure templates (planner/step/structure.py) against the op-by-op replay.

Tolerance: none. One replay with the micro-batch, the sequence length and the model's dimensions
symbolic must give, for every model of the structure (random dimensions, edge values included)
and every size, the peaks ReferenceProgram.run() gives (total, every category, op and phase of
all six peaks), and estimate_memory through it must equal estimate_memory under
``step_cache.replay_only()`` field by field.
"""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from planner.routes import memory as pm
from planner.step import simulate as step_cache
from planner.step import structures
from planner.catalog.presets import resolve_model
from planner.routes.checkpoint_blocks import checkpointed_blocks
from planner.step.program import ReferenceProgram
from planner.catalog.specs import MemoryRequest, ModelSpec, TrainingSpec
from planner.step.structure import compile_structure, structure_of
from planner.machine.symbolic import MPoly, Space, Undecided

FIELDS = ("first", "steady", "forward_peak", "fb_steady", "act_peak", "act_max")

# Settings whose step compiles with every dimension symbolic (one changed at a time).
COMPILING: list[dict] = [
    {},
    *({"precision": p} for p in ("fp32", "amp-fp16", "mixed-bf16", "bf16")),
    *({"optimizer": o} for o in ("sgd", "sgd-momentum", "adagrad", "rmsprop", "adadelta")),
    {"optimizer_implementation": "fused"},
    {"attention": "eager"},
    {"attention": "eager", "precision": "fp32", "dropout": 0.1},
    {"gradient_accumulation_steps": 3},
    {"activation_checkpointing": {"strategy": "full"}},
    {"activation_checkpointing": {"strategy": "selective"}},
    {"activation_checkpointing": {"strategy": "every-k", "every_k": 3}},
    {"activation_checkpointing": {"strategy": "sqrt"}},
    {"activation_checkpointing": {"strategy": "blocks", "blocks": [1, 4]}},
    {"activation_checkpointing": {"strategy": "full"}, "attention": "eager", "dropout": 0.1},
    {"lora": {"rank": 4, "target_modules": ["q", "v"]}},
    {"lora": {"rank": 8, "base_dtype": "int8"}, "activation_checkpointing": {"strategy": "full"}},
    {"precision": "mixed-bf16", "precision_overrides": {"gradients": "fp32"}},
]
# Settings whose step compares unrelated dimensions (the largest parameter, the order of
# per-tensor temporaries): templated per path, with guards.
GUARDED: list[dict] = [
    {"precision": "mixed-fp16"},
    {"optimizer": "lion"},
    {"optimizer_implementation": "for-loop"},
    {"optimizer": "adamw", "optimizer_implementation": "for-loop", "precision": "mixed-fp16"},
    {"optimizer": "adafactor"},
    {"optimizer": "adafactor", "optimizer_implementation": "for-loop"},
]
# Settings whose sizes round (8-bit Adam's blocks, an nf4-quantized size): not polynomials,
# never templated over the dimensions.
UNDECIDED: list[dict] = [
    {"optimizer": "adam-8bit"},
    {"lora": {"rank": 4, "base_dtype": "nf4"}, "precision": "amp-bf16"},
]


def _arch(family: str, rng: random.Random, *, layers: int = 8, kv: bool = True) -> dict:
    """A random architecture whose dimensions are all >= 2 (the general domain) and whose head
    dimension is even (llama's general domain)."""
    nkv = rng.choice([2, 3, 5, 8])
    g = rng.choice([2, 3, 4]) if kv else 1
    hd = 2 * rng.choice([2, 3, 7, 32, 64]) if family == "llama" else rng.choice([2, 5, 64])
    return {"family": family, "num_layers": layers, "hidden_size": nkv * g * hd,
            "num_heads": nkv * g, "num_kv_heads": nkv if family == "llama" else None,
            "ffn_hidden_size": rng.choice([2, 3, rng.randint(4, 30000)]),
            "vocab_size": rng.choice([2, rng.randint(3, 70000)]),
            "max_sequence_length": rng.randint(4096, 70000)}


def _same(a, b) -> bool:
    return (a.total, list(a.by_cat), a.op, a.phase) == (b.total, list(b.by_cat), b.op, b.phase)


def _check(tpl, model, tr, device, ck, B, T) -> None:
    _, names, values = structure_of(model, B, T)
    assert names == tpl.names
    trs = tr.model_copy(update={"micro_batch_size": B, "sequence_length": T})
    ref = ReferenceProgram(model, trs, device=device, checkpointed=ck).run()
    got = tpl.evaluate(values)
    for f in FIELDS:
        assert _same(getattr(ref, f), getattr(got, f)), (model, B, T, f)


CASES = [(fam, var, dev) for fam in ("gpt2", "llama") for var in COMPILING for dev in ("cuda",)]
CASES += [(fam, v, "cpu") for fam in ("gpt2", "llama") for v in ({}, {"dropout": 0.1})]


@pytest.mark.parametrize("family,var,device", CASES,
                         ids=[f"{f}-{d}-{i}" for i, (f, _, d) in enumerate(CASES)])
def test_structure_template_equals_replay(family, var, device):
    rng = random.Random(zlib.crc32(f"{family}{var}{device}".encode()))
    model = resolve_model(ModelSpec.model_validate(_arch(family, rng)))
    tr = TrainingSpec.model_validate({**var, "micro_batch_size": 2, "sequence_length": 2})
    ck = checkpointed_blocks(tr, model.num_layers)
    dom, names, _ = structure_of(model, 5, 100)
    tpl = compile_structure(model, tr, device, ck, names, dom[0])
    for _ in range(6):  # other models of the structure, at other sizes
        other = resolve_model(ModelSpec.model_validate(_arch(family, rng)))
        _check(tpl, other, tr, device, ck, rng.choice([2, 3, rng.randint(4, 64)]),
               rng.choice([2, 3, rng.randint(4, 4096)]))


@pytest.mark.parametrize("var", GUARDED + UNDECIDED,
                         ids=[str(i) for i in range(len(GUARDED + UNDECIDED))])
def test_settings_that_decide_on_dimensions_are_not_templated_on_the_whole_domain(var):
    rng = random.Random(7)
    model = resolve_model(ModelSpec.model_validate(_arch("llama", rng)))
    tr = TrainingSpec.model_validate(var)
    dom, names, values = structure_of(model, 4, 64)
    with pytest.raises(Undecided):
        compile_structure(model, tr, "cuda", checkpointed_blocks(tr, 8), names, dom[0])
    if var in UNDECIDED:  # not even at one model
        with pytest.raises(Undecided):
            compile_structure(model, tr, "cuda", checkpointed_blocks(tr, 8), names, dom[0],
                              witness=values)


@pytest.mark.parametrize("var", GUARDED, ids=[str(i) for i in range(len(GUARDED))])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_guarded_templates_equal_the_replay_where_they_hold(family, var):
    """Compiled at a witness (a model of the structure), the decisions the domain leaves open
    become guards: the template admits the witness, and every model it admits gets the
    replay's peaks; models it does not admit are left to another variant or the replay."""
    rng = random.Random(zlib.crc32(f"{family}{var}".encode()))
    model = resolve_model(ModelSpec.model_validate(_arch(family, rng)))
    tr = TrainingSpec.model_validate({**var, "micro_batch_size": 2, "sequence_length": 2})
    ck = checkpointed_blocks(tr, model.num_layers)
    dom, names, values = structure_of(model, 4, 64)
    tpl = compile_structure(model, tr, "cuda", ck, names, dom[0], witness=values)
    assert tpl.admits is not None and tpl.admits(*values)
    _check(tpl, model, tr, "cuda", ck, 4, 64)
    admitted = 0
    for _ in range(12):
        other = resolve_model(ModelSpec.model_validate(_arch(family, rng)))
        B, T = rng.choice([2, rng.randint(3, 64)]), rng.choice([2, rng.randint(3, 4096)])
        if tpl.admits(*structure_of(other, B, T)[2]):
            admitted += 1
            _check(tpl, other, tr, "cuda", ck, B, T)
    assert admitted >= 1


def test_mpoly_decides_only_what_holds_everywhere():
    sp = Space(("V", "f"), (2, 2))
    V, f = sp.var(0), sp.var(1)  # V, f >= 2
    assert V * f > V and V * f - 2 * V >= 0 and V - 2 >= 0 and (V * f) // 1 == V * f
    assert not (V * f - 4 < 0) and V + 1 != 2
    assert (6 * V * V * f) // (3 * V) == 2 * V * f
    for undecided in (lambda: V > f, lambda: V == f, lambda: V * f - 5 >= 0, lambda: int(V),
                      lambda: (V + 1) // 2, lambda: max(V, f), lambda: bool(V - f),
                      lambda: (V * f) // (2 * V), lambda: (V * f) // (V + f)):
        with pytest.raises(Undecided):
            undecided()
    assert isinstance(V * f - f * V + 3, int) and isinstance(V + 0, MPoly)
    w = Space(("V", "f"), (2, 2), witness=(10, 3))  # undecided comparisons answered at V=10, f=3
    V, f = w.var(0), w.var(1)
    assert V > f and not (V * f == 30 * f) and max(V, f) is V
    assert sorted(sign for _, sign in w.guards.values()) == [-1, -1, 1]  # f - V in max


# ---- random architectures through the estimate service path ---------------------------------
_SETTINGS = st.fixed_dictionaries({
    "precision": st.sampled_from(["fp32", "amp-bf16", "amp-fp16", "mixed-bf16", "mixed-fp16",
                                  "bf16"]),
    "optimizer": st.sampled_from(["adamw", "adam", "sgd", "sgd-momentum", "adagrad", "rmsprop",
                                  "adafactor", "lion"]),
    "optimizer_implementation": st.sampled_from(["foreach", "foreach", "fused", "for-loop"]),
    "attention": st.sampled_from(["sdpa", "eager"]),
    "dropout": st.sampled_from([0.0, 0.1]),
    "gradient_accumulation_steps": st.sampled_from([1, 2, 3]),
    "activation_checkpointing": st.sampled_from([
        {"strategy": "none"}, {"strategy": "full"}, {"strategy": "selective"},
        {"strategy": "every-k", "every_k": 2}, {"strategy": "sqrt"}]),
    "lora": st.sampled_from([None, {"rank": 4, "target_modules": ["q", "v"]},
                             {"rank": 2, "target_modules": ["k", "o", "down"],
                              "base_dtype": "int8"}]),
})


@st.composite
def _models(draw):
    """Edge dimensions included: one head, one key/value head (MQA), nkv == nh, head dim 1, 2
    or odd, an MLP width or vocabulary of 1 or 2."""
    family = draw(st.sampled_from(["gpt2", "llama"]))
    nkv = draw(st.sampled_from([1, 2, 3, 4]))
    g = draw(st.sampled_from([1, 2, 3]))
    hd = draw(st.sampled_from([1, 2, 3, 4, 6, 16]))
    return {"family": family, "num_layers": draw(st.sampled_from([1, 3, 8, 12])),
            "hidden_size": nkv * g * hd, "num_heads": nkv * g,
            "num_kv_heads": nkv if family == "llama" or draw(st.booleans()) else None,
            "ffn_hidden_size": draw(st.sampled_from([1, 2, 5, 300])),
            "vocab_size": draw(st.sampled_from([1, 2, 7, 1000])),
            "max_sequence_length": 4096,
            **({"tie_embeddings": draw(st.booleans())} if family == "gpt2" else {})}


def _resized(arch: dict, rng: random.Random) -> dict:
    """Another model of the same structure: every dimension of at least 2 redrawn (sizes of 1
    and the head dimension's parity kept)."""
    def redraw(v: int, even: bool = False) -> int:
        if v == 1:
            return 1
        x = rng.choice([2, 3, rng.randint(4, 200)])
        return 2 * x if even else x
    nh = arch["num_heads"]
    nkv = arch["num_kv_heads"] or nh
    hd = arch["hidden_size"] // nh
    llama_even = arch["family"] == "llama" and hd % 2 == 0
    nkv2, g2 = redraw(nkv), redraw(nh // nkv)
    hd2 = 2 * redraw(hd // 2) if llama_even else redraw(hd)
    return {**arch, "hidden_size": nkv2 * g2 * hd2, "num_heads": nkv2 * g2,
            "num_kv_heads": None if arch["num_kv_heads"] is None else nkv2,
            "ffn_hidden_size": redraw(arch["ffn_hidden_size"]),
            "vocab_size": redraw(arch["vocab_size"])}


@settings(max_examples=40, deadline=None, derandomize=True)
@given(arch=_models(), var=_SETTINGS, device=st.sampled_from(["cuda", "cpu"]),
       sizes=st.lists(st.tuples(st.sampled_from([1, 2, 3, 9]), st.sampled_from([1, 2, 5, 700])),
                      min_size=2, max_size=3), seed=st.integers(0, 1 << 30))
def test_estimates_of_new_models_equal_the_replay(arch, var, device, sizes, seed):
    """The first model of a structure compiles it ("sync": in the request); every later model
    of that structure, never seen, is estimated from it and equals the replayed estimate."""
    rng = random.Random(seed)
    reqs = []
    for k, (b, t) in enumerate(sizes):
        a = arch if k == 0 else _resized(arch, rng)
        try:
            reqs.append(MemoryRequest.model_validate({"model": a, "training": {
                **var, "micro_batch_size": b, "sequence_length": t}}))
        except ValidationError:  # an option the optimizer lacks, gpt2 without a gate
            assume(False)
    pm.clear_caches()
    with step_cache.structure_mode("sync"):
        got = [pm.estimate_memory(r, device) for r in reqs]
    pm.clear_caches()
    with step_cache.replay_only():
        want = [pm.estimate_memory(r, device) for r in reqs]
    assert got == want


def test_a_never_seen_model_of_a_known_structure_is_evaluated():
    """Background mode: the first estimates replay and queue the compiles (the request's
    structure, and the fused-optimizer variant an optimizer-phase peak is compared with); once
    they are done, models never seen are answered from the structures' templates (no replay)
    and equal the replay."""
    rng = random.Random(3)
    base = {"training": {"micro_batch_size": 4, "sequence_length": 256}}
    archs = [_arch("llama", rng) for _ in range(6)]
    pm.clear_caches()
    for a in archs[:2]:
        pm.estimate_memory(MemoryRequest.model_validate({"model": a, **base}))
        step_cache.wait_for_structures()
    assert [v for v in structures._STRUCTURES.values() if v.templates]
    calls = []
    real = ReferenceProgram.run
    try:
        ReferenceProgram.run = lambda self: calls.append(1) or real(self)
        got = [pm.estimate_memory(MemoryRequest.model_validate({"model": a, **base}))
               for a in archs[2:]]
    finally:
        ReferenceProgram.run = real
    assert not calls
    pm.clear_caches()
    with step_cache.replay_only():
        assert got == [pm.estimate_memory(MemoryRequest.model_validate({"model": a, **base}))
                       for a in archs[2:]]


def test_long_irregular_steps_are_not_compiled():
    """A step simulated block by block (an irregular checkpoint plan) beyond the block bound is
    not templated over the dimensions (not even queued: nothing is recorded for it): its
    estimates stay replays, equal to replay_only()."""
    rng = random.Random(11)
    arch = {**_arch("gpt2", rng), "num_layers": structures._STRUCTURE_MAX_BLOCKS + 2}
    req = MemoryRequest.model_validate({"model": arch, "training": {
        "micro_batch_size": 2, "sequence_length": 64,
        "activation_checkpointing": {"strategy": "blocks", "blocks": [0, 3, 4, 11]}}})
    pm.clear_caches()
    with step_cache.structure_mode("sync"):
        got = pm.estimate_memory(req)
    assert structures._simulated_blocks(frozenset({0, 3, 4, 11}), arch["num_layers"]) \
        > structures._STRUCTURE_MAX_BLOCKS
    assert not structures._STRUCTURES
    pm.clear_caches()
    with step_cache.replay_only():
        assert got == pm.estimate_memory(req)


def test_largest_micro_batch_of_a_new_model_from_the_structure():
    """With hardware, the largest fitting micro-batch of a never-seen model is probed on the
    structure's template (both batch domains compiled) and equals the replayed search."""
    rng = random.Random(5)
    archs = [_arch("llama", rng) for _ in range(4)]

    def req(a: dict) -> MemoryRequest:
        return MemoryRequest.model_validate({"model": a, "hardware": {"gpu": "h100-80gb"},
                                             "training": {"micro_batch_size": 2,
                                                          "sequence_length": 512}})
    pm.clear_caches()
    with step_cache.structure_mode("sync"):
        got = [pm.estimate_memory(req(a)) for a in archs]
    assert sum(len(v.templates) for v in structures._STRUCTURES.values()) >= 2
    pm.clear_caches()
    with step_cache.replay_only():
        assert got == [pm.estimate_memory(req(a)) for a in archs]


def _dense_natural(m, sp):
    """``structure._natural`` the long way: one row per log entry, a cumulative sum over all of
    them, the marks' rows picked out."""
    from planner.machine.stepsim import CATEGORIES
    from planner.machine.symbolic import MPoly
    zero = (0,) * sp.n
    col = {zero: 0}
    d = {}
    for e, (sc, size) in enumerate(m.log):
        terms = size.t.items() if isinstance(size, MPoly) else ((zero, size),) if size else ()
        for k, c in terms:
            j = col.setdefault(k, len(col))
            d[(e + 1, j, abs(sc) - 1)] = d.get((e + 1, j, abs(sc) - 1), 0) + (c if sc > 0 else -c)
    dense = np.zeros((len(m.log) + 1, len(CATEGORIES), len(col)), dtype=np.int64)
    for (e, j, cat), v in d.items():
        dense[e, cat, j] += v
    at = [mk[0] for mk in m.marks]
    return np.cumsum(dense, axis=0)[at], list(col)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mark_rows_equal_the_cumulative_sum_over_every_log_entry(family, monkeypatch):
    import planner.step.structure as structure
    real, seen = structure._natural, []

    def checked(m, sp):
        full, exps = real(m, sp)
        want, wexps = _dense_natural(m, sp)
        assert exps == wexps and np.array_equal(full, want)
        seen.append(len(m.marks))
        return full, exps
    monkeypatch.setattr(structure, "_natural", checked)
    rng = random.Random(zlib.crc32(family.encode()) + 7)
    for var in ({}, {"activation_checkpointing": {"strategy": "every-k", "every_k": 2}}):
        model = resolve_model(ModelSpec.model_validate(_arch(family, rng)))
        tr = TrainingSpec.model_validate({**var, "micro_batch_size": 2, "sequence_length": 2})
        dom, names, _ = structure_of(model, 5, 100)
        compile_structure(model, tr, "cuda", checkpointed_blocks(tr, model.num_layers), names,
                          dom[0])
    assert len(seen) == 2 and min(seen) > 10
