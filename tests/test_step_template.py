"""Step templates (planner/step/template.py) against the op-by-op replay they are compiled from.

Tolerance: none. A template's peaks (total, every category, the op and phase at the peak) must
equal ReferenceProgram.run() at every size of its domain, for every setting the replay has; the
replay itself is held byte-exact against the measured step (tests/test_reference_exact.py).
"""

from __future__ import annotations

import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.routes import memory as pm
from planner.routes import memory_reference
from planner.step import simulate as step_cache
from planner.catalog.presets import resolve_model
from planner.routes.checkpoint_blocks import checkpointed_blocks
from planner.step.program import ReferenceProgram
from planner.catalog.specs import MemoryRequest, ModelSpec, TrainingSpec
from planner.machine import cache
from planner.machine.symbolic import Poly, Undecided
from planner.step.template import compile_template, domain_of

GPT2 = {"family": "gpt2", "num_layers": 8, "hidden_size": 64, "num_heads": 4,
        "vocab_size": 500, "max_sequence_length": 4096}
LLAMA = {"family": "llama", "num_layers": 8, "hidden_size": 64, "num_heads": 4,
         "num_kv_heads": 2, "ffn_hidden_size": 176, "vocab_size": 500,
         "max_sequence_length": 4096}
MQA = {**LLAMA, "num_kv_heads": 1}

# One setting changed at a time from the default training spec, on each family.
VARIATIONS: list[dict] = [
    {},
    *({"precision": p} for p in ("fp32", "amp-fp16", "mixed-bf16", "mixed-fp16", "bf16")),
    *({"optimizer": o} for o in ("sgd", "sgd-momentum", "adagrad", "adam-8bit", "adafactor",
                                 "lion", "rmsprop")),
    {"optimizer_implementation": "fused"},
    {"attention": "eager"},
    {"attention": "eager", "precision": "fp32"},
    {"dropout": 0.1},
    {"gradient_accumulation_steps": 3},
    {"activation_checkpointing": {"strategy": "full"}},
    {"activation_checkpointing": {"strategy": "selective"}},
    {"activation_checkpointing": {"strategy": "every-k", "every_k": 3}},
    {"activation_checkpointing": {"strategy": "blocks", "blocks": [1, 4]}},
    {"activation_checkpointing": {"strategy": "full"}, "attention": "eager", "dropout": 0.1},
    {"lora": {"rank": 4, "target_modules": ["q", "v"]}},
    {"lora": {"rank": 4, "target_modules": ["q", "k", "v", "o", "up", "down"],
              "base_dtype": "nf4"}, "precision": "amp-bf16"},
    {"lora": {"rank": 8, "base_dtype": "int8"}, "activation_checkpointing": {"strategy": "full"}},
    {"precision": "mixed-bf16", "precision_overrides": {"gradients": "fp32"}},
]
CASES = [(name, arch, var, dev) for name, arch in (("gpt2", GPT2), ("llama", LLAMA))
         for var in VARIATIONS for dev in ("cuda",)]
CASES += [("gpt2", GPT2, v, "cpu") for v in ({}, {"dropout": 0.1}, {"precision": "bf16"})]
CASES += [("mqa", MQA, v, "cuda") for v in ({}, {"attention": "eager"})]
# mixed-fp16's overflow check as the steady peak (its own window before step 1's states), and
# full checkpointing's recomputed tensors freed as each backward node returns
CASES += [(name, arch, {"precision": "mixed-fp16", "optimizer": "sgd-momentum", **v}, dev)
          for name, arch in (("gpt2", GPT2), ("llama", LLAMA))
          for v, dev in (({}, "cuda"), ({"activation_checkpointing": {"strategy": "full"},
                                         "dropout": 0.1}, "cpu"))]


def _sizes(domain, rng: random.Random) -> list[tuple[int, int]]:
    def pick(fixed):
        return [fixed] * 3 if fixed is not None else [2, 3, rng.randint(4, 64), rng.randint(100, 4096)]
    bs, ts = pick(domain[0]), pick(domain[1])
    return sorted({(b, t) for b in bs for t in ts})


def _same(a, b) -> bool:
    return (a.total, list(a.by_cat), a.op, a.phase) == (b.total, list(b.by_cat), b.op, b.phase)


@pytest.mark.parametrize("name,arch,var,device", CASES,
                         ids=[f"{n}-{dev}-{i}" for i, (n, _, _, dev) in enumerate(CASES)])
def test_template_equals_replay(name, arch, var, device):
    rng = random.Random(zlib.crc32(f"{name}{var}{device}".encode()))
    model = resolve_model(ModelSpec.model_validate(arch))
    compiled = 0
    for domain in ((None, None), (1, None), (None, 1), (1, 1)):
        tr = TrainingSpec.model_validate({**var, "micro_batch_size": 2, "sequence_length": 2})
        ck = checkpointed_blocks(tr, model.num_layers)
        try:
            tpl = compile_template(model, tr, device, ck, domain)
        except Undecided:
            continue
        compiled += 1
        for b, t in _sizes(domain, rng):
            assert tpl.covers(b, t) and domain_of(b, t) == domain
            trs = tr.model_copy(update={"micro_batch_size": b, "sequence_length": t})
            ref = ReferenceProgram(model, trs, device=device, checkpointed=ck).run()
            got = tpl.evaluate(b, t)
            for f in ("first", "steady", "forward_peak", "fb_steady", "act_peak", "act_max"):
                assert _same(getattr(ref, f), getattr(got, f)), (domain, b, t, f)
            # the steady peak's total and instant alone (what the fused-kernel note reads)
            assert tpl.steady(b, t) == (ref.steady.total, ref.steady.op, ref.steady.phase)
    # The batch-of-one domains may depend on broadcasts; the general one always compiles here.
    assert compiled >= 1


def test_poly_decides_only_what_holds_everywhere():
    b, t = Poly({(1, 0): 1}), Poly({(0, 1): 1})  # b, t >= 0
    assert b * t + 1 > 0 and not (b * t + 1 <= 0)
    assert b + t >= 0 and (b + 2) != 1
    assert (b * 2 - b) == b
    for undecided in (lambda: b > t, lambda: b == 0, lambda: bool(b - t), lambda: int(b),
                      lambda: (b + 1) // 2, lambda: max(b, t)):
        with pytest.raises(Undecided):
            undecided()


def test_estimates_compile_a_template_on_the_second_size_and_agree():
    """Through estimate_memory: the first size is replayed, the second compiles the setup's
    template, and every later size (never replayed) equals a fresh replay's estimate."""
    pm.clear_caches()

    def req(b: int, t: int) -> MemoryRequest:
        return MemoryRequest.model_validate({"model": LLAMA, "training": {
            "micro_batch_size": b, "sequence_length": t, "attention": "eager"}})
    pm.estimate_memory(req(2, 64))
    assert not cache._TEMPLATES
    pm.estimate_memory(req(3, 64))
    assert [t for t in cache._TEMPLATES.values() if t is not None]
    via_template = [pm.estimate_memory(req(b, t)) for b, t in ((5, 100), (17, 2000), (2, 2))]
    pm.clear_caches()
    with step_cache.replay_only():
        for r, (b, t) in zip(via_template, ((5, 100), (17, 2000), (2, 2))):
            assert r == pm.estimate_memory(req(b, t))
    assert not cache._TEMPLATES


# Random architectures and settings: the template equals the replay wherever it compiles, and it
# compiles for every one of them (no size-dependent decision in the reference step).
_SETTINGS = st.fixed_dictionaries({
    "precision": st.sampled_from(["fp32", "amp-bf16", "amp-fp16", "mixed-bf16", "mixed-fp16",
                                  "bf16"]),
    "optimizer": st.sampled_from(["adamw", "sgd", "adam-8bit", "adafactor", "lion"]),
    "attention": st.sampled_from(["sdpa", "eager"]),
    "dropout": st.sampled_from([0.0, 0.1]),
    "gradient_accumulation_steps": st.sampled_from([1, 2]),
    "activation_checkpointing": st.sampled_from([
        {"strategy": "none"}, {"strategy": "full"}, {"strategy": "selective"},
        {"strategy": "every-k", "every_k": 2}]),
})


@st.composite
def _archs(draw):
    family = draw(st.sampled_from(["gpt2", "llama"]))
    nh = draw(st.sampled_from([1, 2, 4, 6]))
    hd = draw(st.sampled_from([4, 8, 16]))
    arch = {"family": family, "num_layers": draw(st.integers(1, 10)), "hidden_size": nh * hd,
            "num_heads": nh, "vocab_size": draw(st.integers(8, 700)),
            "max_sequence_length": 1 << 16}
    if family == "llama":
        arch["num_kv_heads"] = draw(st.sampled_from([k for k in (1, 2, 3, 6) if nh % k == 0]))
        arch["ffn_hidden_size"] = draw(st.integers(4, 300))
    else:
        arch["ffn_hidden_size"] = draw(st.integers(4, 300))
        arch["tie_embeddings"] = draw(st.booleans())
    return arch


@settings(max_examples=60, deadline=None, derandomize=True)
@given(arch=_archs(), var=_SETTINGS, device=st.sampled_from(["cuda", "cpu"]),
       sizes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 3000)), min_size=1,
                      max_size=3))
def test_template_equals_replay_on_random_setups(arch, var, device, sizes):
    model = resolve_model(ModelSpec.model_validate(arch))
    tr0 = TrainingSpec.model_validate(var)
    ck = checkpointed_blocks(tr0, model.num_layers)
    templates: dict = {}
    for b, t in sizes:
        domain = domain_of(b, t)
        if domain not in templates:
            templates[domain] = compile_template(model, tr0, device, ck, domain)
        trs = tr0.model_copy(update={"micro_batch_size": b, "sequence_length": t})
        ref = ReferenceProgram(model, trs, device=device, checkpointed=ck).run()
        got = templates[domain].evaluate(b, t)
        for f in ("first", "steady", "forward_peak", "fb_steady", "act_peak", "act_max"):
            assert _same(getattr(ref, f), getattr(got, f)), (b, t, f)
        steady = (ref.steady.total, ref.steady.op, ref.steady.phase)
        assert templates[domain].steady(b, t) == steady, (b, t)


def test_largest_micro_batch_from_the_template_equals_the_search():
    """_max_micro_batch probes the compiled template directly (no response built); its answer
    equals the plain exponential + binary search over fresh replays, for budgets around the
    peaks of several batch sizes."""
    req = MemoryRequest.model_validate({"model": GPT2, "training": {
        "micro_batch_size": 1, "sequence_length": 300, "attention": "eager"}})
    model = resolve_model(req.model)
    pm.clear_caches()
    for b, t in ((1, 300), (1, 301), (2, 300), (3, 300)):  # both domains compiled
        pm.estimate_memory(req.model_copy(update={"training": req.training.model_copy(
            update={"micro_batch_size": b, "sequence_length": t})}))
    assert sum(t is not None for t in cache._TEMPLATES.values()) == 2
    need = memory_reference._template_need(req, model, "cuda", frozenset())
    budgets = [need(b) + d for b in (1, 7, 40, 333) for d in (-1, 0, 1)]
    via_template = [pm._max_micro_batch(req, model, "cuda", set(), m) for m in budgets]
    pm.clear_caches()
    with step_cache.replay_only():
        searched = [pm._max_micro_batch_search(req, model, "cuda", set(), m) for m in budgets]
    assert not cache._TEMPLATES
    assert via_template == searched
    assert searched[:3] == [None, 1, 1] and searched[-3:] == [332, 333, 333]


DP_CASES = [
    ({"data_parallel": 2}, {}),
    ({"data_parallel": 2}, {"precision": "amp-fp16", "attention": "eager"}),
    ({"data_parallel": 3, "zero_stage": 1}, {"precision": "mixed-bf16"}),
    ({"data_parallel": 3, "zero_stage": 1}, {"lora": {"rank": 4}}),
    ({"data_parallel": 2, "zero_stage": 2}, {"activation_checkpointing": {"strategy": "full"}}),
    ({"data_parallel": 4, "zero_stage": 3}, {"precision": "mixed-fp16", "dropout": 0.1}),
    ({"data_parallel": 4, "zero_stage": 3}, {"lora": {"rank": 4},
                                             "activation_checkpointing": {"strategy": "every-k",
                                                                          "every_k": 3}}),
]


@pytest.mark.parametrize("par,var", DP_CASES, ids=[str(i) for i in range(len(DP_CASES))])
@pytest.mark.parametrize("arch", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_data_parallel_rank_template_equals_its_replay(arch, par, var):
    """Every data-parallel rank (DDP, ZeroRedundancyOptimizer's uneven shards, FSDP2) compiles
    into a template equal to its replay (planner/layouts/data_parallel.py)."""
    from planner.layouts.data_parallel import ParallelProgram
    from planner.catalog.specs import ParallelSpec

    model = resolve_model(ModelSpec.model_validate(arch))
    ps = ParallelSpec.model_validate(par)
    tr = TrainingSpec.model_validate(var)
    ck = checkpointed_blocks(tr, model.num_layers)
    rng = random.Random(zlib.crc32(f"{arch}{par}{var}".encode()))
    for rank in range(ps.data_parallel):
        for domain in ((None, None), (1, None)):
            tpl = compile_template(model, tr, "cuda", ck, domain, lambda m, sizes: ParallelProgram(
                model, tr, ps, rank, checkpointed=ck, machine=m, sizes=sizes))
            for b, t in _sizes(domain, rng)[:4]:
                trs = tr.model_copy(update={"micro_batch_size": b, "sequence_length": t})
                ref = ParallelProgram(model, trs, ps, rank, checkpointed=ck).run()
                got = tpl.evaluate(b, t)
                for f in ("first", "steady", "forward_peak", "fb_steady", "act_peak", "act_max"):
                    assert _same(getattr(ref, f), getattr(got, f)), (rank, b, t, f)


def test_data_parallel_estimates_through_templates_equal_the_replay():
    pm.clear_caches()

    def req(b: int, t: int, z: int) -> MemoryRequest:
        return MemoryRequest.model_validate({"model": LLAMA, "training": {
            "micro_batch_size": b, "sequence_length": t},
            "parallelism": {"data_parallel": 3, "zero_stage": z}})
    sizes = ((2, 64), (3, 64), (5, 100), (17, 2000), (2, 2))
    got = [pm.estimate_memory(req(b, t, z)) for z in range(4) for b, t in sizes]
    assert len([t for t in cache._TEMPLATES.values() if t is not None]) >= 4
    pm.clear_caches()
    with step_cache.replay_only():
        want = [pm.estimate_memory(req(b, t, z)) for z in range(4) for b, t in sizes]
    assert got == want


def test_concurrent_estimates_agree_with_the_replay():
    """The service runs estimates in a thread pool: templates compiled and read from several
    threads at once still give the replay's answers."""
    from concurrent.futures import ThreadPoolExecutor

    pm.clear_caches()
    setups = [{"precision": p, "attention": a} for p in ("fp32", "amp-bf16") for a in ("sdpa", "eager")]
    reqs = [MemoryRequest.model_validate({"model": LLAMA, "training": {
        **setups[k % len(setups)], "micro_batch_size": 1 + k % 7, "sequence_length": 16 + 37 * k}})
        for k in range(80)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(pm.estimate_memory, reqs))
    assert [t for t in cache._TEMPLATES.values() if t is not None]
    pm.clear_caches()
    with step_cache.replay_only():
        want = [pm.estimate_memory(r) for r in reqs]
    assert got == want


@pytest.mark.parametrize("schedule,p,v", [("gpipe", 4, 1), ("1f1b", 2, 1), ("interleaved-1f1b", 2, 2),
                                          ("zb-h1", 2, 1), ("zb-v", 2, 2), ("dualpipe-v", 2, 2)])
@pytest.mark.parametrize("arch,var", [(GPT2, {}), (LLAMA, {"precision": "fp32",
                                                          "attention": "eager"})],
                         ids=["gpt2", "llama-eager"])
def test_pipeline_estimates_through_rank_templates_equal_the_replay(schedule, p, v, arch, var):
    """Pipelined estimates (every rank replayed, planner/layouts/pipeline_memory.py): once a setup's
    ranks are compiled, new sizes come from their templates and equal the replay. (Rank
    structure templates off: one compiled in the background meanwhile would answer the later
    sizes instead, and fewer per-setup templates would be compiled.)"""
    def req(b: int, t: int) -> MemoryRequest:
        return MemoryRequest.model_validate({"model": arch, "training": {
            **var, "micro_batch_size": b, "sequence_length": t, "gradient_accumulation_steps": 4},
            "parallelism": {"pipeline_parallel": p, "virtual_pipeline_stages": v,
                            "pipeline_schedule": schedule}})
    sizes = [(2, 64), (3, 64), (5, 300), (9, 1000), (1, 20), (1, 21), (1, 500)]
    pm.clear_caches()
    with step_cache.structure_mode("off"):
        got = [pm.estimate_memory(req(b, t)) for b, t in sizes]
    assert sum(t is not None for t in cache._TEMPLATES.values()) == 2 * p
    pm.clear_caches()
    with step_cache.replay_only():
        want = [pm.estimate_memory(req(b, t)) for b, t in sizes]
    assert got == want


def test_steady_alone_counts_the_grad_scaler_of_a_forward_peak():
    """amp-fp16 (GradScaler) whose steady peak is step 1's forward peak with the optimizer
    states and the scaler's 8 bytes live: ``steady`` alone equals the replay's there too."""
    arch = {**LLAMA, "num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 4,
            "vocab_size": 500}
    model = resolve_model(ModelSpec.model_validate(arch))
    tr = TrainingSpec.model_validate({"precision": "amp-fp16", "optimizer": "sgd",
                                      "activation_checkpointing": {"strategy": "full"},
                                      "micro_batch_size": 2, "sequence_length": 2})
    ck = checkpointed_blocks(tr, model.num_layers)
    tpl = compile_template(model, tr, "cuda", ck, (None, None))
    trs = tr.model_copy(update={"micro_batch_size": 2, "sequence_length": 64})
    ref = ReferenceProgram(model, trs, device="cuda", checkpointed=ck).run()
    assert ref.steady.phase == "forward" and tpl.combine["amp_scaler"]
    assert tpl.steady(2, 64) == (ref.steady.total, ref.steady.op, ref.steady.phase)
