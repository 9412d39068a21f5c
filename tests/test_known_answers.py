"""Known setups' answers, each equal to the answer computed afresh, to the byte.

- POST /v1/memory's answer memo (planner/routes/memory_answers.py) and setup memo
  (planner/routes/memory.py): the same request again is the same answer; a known setup still
  refuses what its sizes break; the modes that compute answers differently are keyed apart.
- Results built without validation (planner/catalog/result_specs.py: ``unvalidated``) validate to
  themselves and hold builtin values only (their JSON is the validated form's).
- The fused window evaluation (planner/machine/peak_candidates.py: ``fused_best``) equals each
  window's own ``best``; ``combine_peaks`` equals its plain statement.
- Pipelined answers from every rank's template at once (planner/layouts/pipelined.py) equal the
  rank-by-rank path and the replay.
"""

from __future__ import annotations

import random

import pytest
from pydantic import BaseModel

from planner.catalog.errors import PlanningError
from planner.catalog.specs import MemoryRequest, MemoryResult
from planner.layouts import pipelined
from planner.machine import cache
from planner.machine.stepsim import PeakSnap
from planner.routes import memory as pm
from planner.routes import memory_answers
from planner.step import simulate as step_cache
from planner.step.peaks import combine_peaks

GPT2 = {"family": "gpt2", "num_layers": 4, "hidden_size": 64, "num_heads": 4,
        "vocab_size": 500, "max_sequence_length": 512}
LLAMA = {"family": "llama", "num_layers": 4, "hidden_size": 64, "num_heads": 4,
         "num_kv_heads": 2, "ffn_hidden_size": 176, "vocab_size": 500,
         "max_sequence_length": 4096}
SIZES = [(2, 64), (3, 64), (5, 300), (1, 20), (17, 200)]


def _req(model: dict, training: dict | None = None, parallelism: dict | None = None,
         hardware: dict | None = None, b: int = 2, t: int = 64) -> MemoryRequest:
    return MemoryRequest.model_validate({
        "model": model, "training": {**(training or {}), "micro_batch_size": b,
                                     "sequence_length": t},
        **({"parallelism": parallelism} if parallelism else {}),
        **({"hardware": hardware} if hardware else {})})


# (model, training, parallelism, hardware): every way an answer is built
SETUPS = [
    (GPT2, {}, None, None),
    (LLAMA, {"precision": "fp32", "optimizer": "sgd"}, None, None),  # the optimizer step's peak
    (LLAMA, {"activation_checkpointing": {"strategy": "full"}, "loss": {"kind": "chunked"}},
     None, None),
    (GPT2, {"precision": "mixed-bf16"}, {"data_parallel": 3, "zero_stage": 3}, None),
    (LLAMA, {}, {"data_parallel": 2, "zero_stage": 1}, None),
    (GPT2, {"gradient_accumulation_steps": 4}, {"pipeline_parallel": 2}, None),
    (LLAMA, {}, {"tensor_parallel": 2}, None),
    (LLAMA, {"implementation": "megatron"}, None, None),
    ({"num_parameters": 10**9}, {}, None, {"gpu": "h100-80gb"}),
    (LLAMA, {}, None, {"gpu": "h100-80gb"}),
    (LLAMA, {}, None, {"memory_bytes": 3 * 2**20}),  # does not fit: notes and suggestions
]


def _builtin(x, where: str = "result") -> None:
    """Every value inside a result is a builtin (an int where a figure is: no numpy scalar)."""
    if isinstance(x, BaseModel):
        for name in type(x).model_fields:
            _builtin(getattr(x, name), f"{where}.{name}")
    elif isinstance(x, list | tuple):
        for i, v in enumerate(x):
            _builtin(v, f"{where}[{i}]")
    elif isinstance(x, dict):
        for k, v in x.items():
            _builtin(v, f"{where}[{k!r}]")
    else:
        assert type(x) in (int, str, bool, float, type(None)), (where, type(x))


@pytest.mark.parametrize("model,training,parallelism,hardware", SETUPS)
def test_results_built_without_validation_validate_to_themselves(model, training, parallelism,
                                                                 hardware) -> None:
    pm.clear_caches()
    for b, t in SIZES:
        r = pm.estimate_memory(_req(model, training, parallelism, hardware, b, t))
        _builtin(r)
        v = MemoryResult.model_validate(r.model_dump())
        assert v == r
        assert v.model_dump_json() == r.model_dump_json()
        # the constructor given the same fields: the same fields set
        c = MemoryResult(**{k: getattr(r, k) for k in r.model_fields_set})
        assert c == r and c.model_fields_set == r.model_fields_set
        assert c.breakdown.model_fields_set == r.breakdown.model_fields_set


@pytest.mark.parametrize("model,training,parallelism,hardware", SETUPS)
def test_known_answers_equal_the_replay(model, training, parallelism, hardware) -> None:
    """Every size twice (the second time kept, the third from the memo), against estimates
    replayed afresh with templates off."""
    reqs = [_req(model, training, parallelism, hardware, b, t) for b, t in SIZES]
    pm.clear_caches()
    got = [[pm.estimate_memory(r) for r in reqs] for _ in range(3)]
    pm.clear_caches()
    with step_cache.replay_only():
        want = [pm.estimate_memory(r) for r in reqs]
    for answers in got:
        assert [a.model_dump_json() for a in answers] == [w.model_dump_json() for w in want]


def test_the_same_request_again_is_kept_the_second_time() -> None:
    pm.clear_caches()
    req = _req(LLAMA, {"attention": "eager"}, b=4, t=100)
    first = pm.estimate_memory(req)
    second = pm.estimate_memory(req)
    assert second is not first and second == first  # asked once: computed again
    before = dict(cache.COUNTS)
    assert pm.estimate_memory(req) is second  # kept
    assert pm.estimate_memory(req.model_copy(deep=True)) is second  # an equal request
    assert cache.COUNTS == before
    # another mode computes its own answer
    with step_cache.replay_only():
        replayed = pm.estimate_memory(req)
    assert replayed is not second and replayed == second
    # other options, another answer
    assert pm.estimate_memory(req, explain=False) is not second
    pm.clear_caches()
    assert pm.estimate_memory(req) is not second


def test_a_sweep_keeps_no_answer() -> None:
    """Requests asked once each leave their hashes, not their answers."""
    pm.clear_caches()
    for b in range(2, 40):
        pm.estimate_memory(_req(GPT2, b=b, t=64))
    assert not memory_answers._ANSWERS
    assert len(memory_answers._SEEN) == 38


def test_keys_tell_every_field_apart() -> None:
    """Each single change of the request (or of the call's options) is another key."""
    base = {"model": GPT2, "training": {"micro_batch_size": 2, "sequence_length": 64}}
    changes = [
        {}, {"model": {**GPT2, "num_layers": 5}}, {"model": {"preset": "gpt2"}},
        {"training": {"micro_batch_size": 3, "sequence_length": 64}},
        {"training": {"micro_batch_size": 2, "sequence_length": 65}},
        *({"training": {"micro_batch_size": 2, "sequence_length": 64, **t}} for t in (
            {"precision": "fp32"}, {"optimizer": "sgd"}, {"optimizer_implementation": "fused"},
            {"dropout": 0.1}, {"attention": "eager"}, {"gradient_accumulation_steps": 2},
            {"activation_checkpointing": {"strategy": "full"}},
            {"activation_checkpointing": {"strategy": "every-k", "every_k": 2}},
            {"loss": {"kind": "chunked"}}, {"loss": {"kind": "chunked", "chunks": 4}},
            {"precision_overrides": {"gradients": "fp32"}, "precision": "mixed-bf16"},
            {"implementation": "megatron"})),
        {"parallelism": {"data_parallel": 2}}, {"parallelism": {"zero_stage": 1}},
        {"hardware": {"gpu": "h100-80gb"}}, {"hardware": {"memory_bytes": 2**30}},
        {"hardware": {"gpu": "h100-80gb", "allocator": "replay"}},
    ]
    keys = [memory_answers.answer_key(MemoryRequest.model_validate({**base, **c}), "cuda",
                                      True, False) for c in changes]
    req = MemoryRequest.model_validate(base)
    keys += [memory_answers.answer_key(req, "cpu", True, False),
             memory_answers.answer_key(req, "cuda", False, False),
             memory_answers.answer_key(req, "cuda", True, True)]
    with step_cache.replay_only():
        keys.append(memory_answers.answer_key(req, "cuda", True, False))
    with step_cache.structure_mode("sync"):
        keys.append(memory_answers.answer_key(req, "cuda", True, False))
    assert len(set(keys)) == len(keys)
    lora = _req(LLAMA, {"lora": {"rank": 4}})  # a list inside: not kept
    assert memory_answers.known(memory_answers.answer_key(lora, "cuda", True, False)) == (None, None)


def test_a_known_setup_still_refuses_what_its_sizes_break() -> None:
    """The setup memo skips the rules a setup passed; the sequence length's rule still runs,
    with the message a request never seen gets."""
    too_long = _req(GPT2, b=2, t=513)
    pm.clear_caches()
    with pytest.raises(PlanningError) as cold:
        pm.estimate_memory(too_long)
    pm.estimate_memory(_req(GPT2, b=2, t=512))
    pm.estimate_memory(_req(GPT2, b=3, t=512))
    with pytest.raises(PlanningError) as known:
        pm.estimate_memory(too_long)
    assert (known.value.detail, known.value.field) == (cold.value.detail, cold.value.field)
    # a setup that breaks a rule is never kept: the same refusal every time
    bad = _req(GPT2, {"activation_checkpointing": {"strategy": "every-k"}})
    for _ in range(3):
        with pytest.raises(PlanningError, match="every_k"):
            pm.estimate_memory(bad)


def _plain_combine(fb_peaks, step_peaks, states, amp_scaler):
    """combine_peaks as first written: first of the highest of each list."""
    def first_highest(ps):
        best = ps[0]
        for p in ps[1:]:
            if p.total > best.total:
                best = p
        return best

    def plus(p, s, scaler=0):
        by = list(p.by_cat)
        by[2] += s
        by[4] += scaler
        return PeakSnap(p.total + s + scaler, by, p.op, p.phase)
    fwdbwd = first_highest(fb_peaks)
    first = first_highest([fwdbwd, *step_peaks])
    scaler = 8 if amp_scaler and fwdbwd.phase == "forward" else 0
    shifted = plus(fwdbwd, states, scaler)
    steady = first_highest([shifted, *(plus(p, states) for p in step_peaks[:-1]), step_peaks[-1]])
    return first, steady, fwdbwd, shifted


def test_combine_peaks_equals_its_plain_statement() -> None:
    rng = random.Random(5)

    def snap(k: int) -> PeakSnap:
        by = [rng.choice([0, 1, 2, 5]) * 100 for _ in range(5)]
        return PeakSnap(sum(by), by, f"op{k}", rng.choice(["forward", "backward", "optimizer"]))
    for _ in range(2000):
        fb = [snap(k) for k in range(rng.randint(1, 3))]
        step = [snap(10 + k) for k in range(rng.randint(1, 3))]
        states, amp = rng.choice([0, 300]), rng.random() < 0.5
        got = combine_peaks(fb, step, None, states=states, amp_scaler=amp)
        want = _plain_combine(fb, step, states, amp)
        for g, w in zip((got.first, got.steady, got.forward_peak, got.fb_steady), want):
            assert g == w
        # the same snapshot where the plain form picks an input as it is
        assert got.forward_peak is want[2] and got.first is want[0]


def test_fused_windows_equal_each_window() -> None:
    rng = random.Random(7)
    pm.clear_caches()
    with step_cache.structure_mode("off"):
        for model, training, parallelism, _ in SETUPS[:6]:
            for b, t in ((2, 64), (3, 64), (2, 65)):
                pm.estimate_memory(_req(model, training, parallelism, None, b, t))
    tpls = [t for t in cache._TEMPLATES.values() if t is not None]
    assert len(tpls) >= 6
    for tpl in tpls:
        groups = [tpl.fb, tpl.step, [tpl.act_max]] if hasattr(tpl, "fb") else [tpl.windows]
        for _ in range(100):
            b, t = rng.randint(0, 4096), rng.randint(0, 1 << 20)
            assert tpl._windows(b, t) == [[c.best(b, t) for c in g] for g in groups]


@pytest.mark.parametrize("schedule,p,v", [("1f1b", 4, 1), ("interleaved-1f1b", 2, 2),
                                          ("zb-h1", 2, 1)])
def test_pipelined_ranks_at_once_equal_rank_by_rank(schedule, p, v, monkeypatch) -> None:
    def req(b: int, t: int) -> MemoryRequest:
        return _req(LLAMA, {"gradient_accumulation_steps": 8},
                    {"pipeline_parallel": p, "virtual_pipeline_stages": v,
                     "pipeline_schedule": schedule}, None, b, t)
    sizes = [(2, 64), (3, 64), (5, 300), (9, 1000), (4, 77)]
    pm.clear_caches()
    with step_cache.structure_mode("off"):
        got = [pm.estimate_memory(r) for r in map(lambda s: req(*s), sizes)]
        assert pipelined._RANKS  # the last sizes came from every rank's template at once
        pm.clear_caches()
        monkeypatch.setattr(pipelined, "_compiled_ranks", lambda *a: None)
        ranked = [pm.estimate_memory(r) for r in map(lambda s: req(*s), sizes)]
    monkeypatch.undo()
    pm.clear_caches()
    with step_cache.replay_only():
        want = [pm.estimate_memory(r) for r in map(lambda s: req(*s), sizes)]
    assert [g.model_dump_json() for g in got] == [r.model_dump_json() for r in ranked] \
        == [w.model_dump_json() for w in want]


def test_the_fused_note_of_a_known_setup_equals_the_full_estimates() -> None:
    """Sizes whose peak falls in the optimizer step carry the fused-kernel note; for a known
    setup its figures come from the variant's template kept with the setup
    (planner/routes/fused_variant.py), equal to the notes of estimates replayed afresh."""
    training = {"precision": "mixed-bf16"}
    sizes = [(1, 20), (2, 16), (1, 32), (2, 24), (3, 8), (1, 40), (2, 20), (1, 12)]
    reqs = [_req(LLAMA, training, None, None, b, t) for b, t in sizes]
    pm.clear_caches()
    got = [[pm.estimate_memory(r) for r in reqs] for _ in range(2)]
    kept = [k for s in pm._SETUPS.values() for k in s[3] if isinstance(k, tuple) and k[0] == "fused"]
    assert kept, "no fused template kept with the setup"
    pm.clear_caches()
    with step_cache.replay_only():
        want = [pm.estimate_memory(r) for r in reqs]
    assert sum(any("'fused' would peak" in n for n in w.notes) for w in want) >= 4
    for answers in got:
        assert [a.model_dump_json() for a in answers] == [w.model_dump_json() for w in want]


@pytest.mark.parametrize("parallelism", [None, {"data_parallel": 3, "zero_stage": 3},
                                         {"data_parallel": 2}, {"data_parallel": 4,
                                                                "zero_stage": 2}])
def test_known_answers_from_one_template_equal_the_general_path(parallelism, monkeypatch) -> None:
    """A known setup answered from one template (one device, or data-parallel rank 0) asked
    without hardware is answered by ``memory_known.step_answer`` (the setup's assumptions
    built once): over random settings, devices and sizes, equal to the answers replayed
    afresh, fields set included; asked with hardware, it goes the general way."""
    from planner.routes import memory_known

    taken = []
    real = memory_known.step_answer
    monkeypatch.setattr(pm, "step_answer", lambda *a: taken.append(1) or real(*a))
    rng = random.Random(7)
    options = {"precision": ["fp32", "amp-bf16", "mixed-bf16", "bf16"],
               "optimizer": ["adamw", "sgd", "adagrad", "rmsprop"],
               "optimizer_implementation": ["foreach", "for-loop", "fused"],
               "activation_checkpointing": [{"strategy": "none"}, {"strategy": "full"},
                                            {"strategy": "every-k", "every_k": 2}],
               "loss": [{"kind": "standard"}, {"kind": "chunked"}]}
    for _ in range(12):
        training = {k: rng.choice(v) for k, v in options.items()}
        model, device = rng.choice([GPT2, LLAMA]), rng.choice(["cuda", "cpu"])
        sizes = [(rng.randint(1, 9), rng.randint(8, 300)) for _ in range(5)]
        try:
            reqs = [_req(model, training, parallelism, None, b, t)
                    for b, t in [(2, 16), (3, 16), *sizes]]
        except ValueError:  # a combination the rules refuse (a fused kernel torch lacks)
            continue
        pm.clear_caches()
        got = [pm.estimate_memory(r, device) for r in reqs]
        pm.clear_caches()
        with step_cache.replay_only():
            want = [pm.estimate_memory(r, device) for r in reqs]
        assert [g.model_dump_json() for g in got] == [w.model_dump_json() for w in want]
        assert [g.model_fields_set for g in got] == [w.model_fields_set for w in want]
    assert len(taken) >= 25
    n = len(taken)
    pm.clear_caches()
    for b in (2, 3, 4):
        pm.estimate_memory(_req(GPT2, {}, parallelism, {"gpu": "h100-80gb"}, b, 64))
    assert len(taken) == n
