"""``fit.max_micro_batch_size`` for implementation 'transformers' (planner/routes/hf_micro_batch.py).

- the answer equals the exhaustive search (exponential then binary, one estimate per probe) over
  the same traced estimate, exactly;
- the boundary holds for real: the step of planner/hf/step.py run for real on the CPU (the whole
  model, 3 steps, steady = the highest phase peak of steps 2-3, exact live-tensor accounting) at
  the reported size fits the budget and at the next size does not; tolerance none (bytes);
- where the peak stays on one affine piece the search traces 3 sizes besides the request's;
- MoE with expert_parallel > 1 (composed, with the b-dependent all-to-all buffer) and the CUDA
  allocator reserve: the reported size's /v1/memory peak fits, the next one's does not;
- the work limit: a search that runs out of it answers the peak without max_micro_batch_size and
  says so; a cancelled request stops.
"""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("transformers")

from planner.catalog.specs import MemoryRequest, TrainingSpec  # noqa: E402
from planner.hf import step as S  # noqa: E402
from planner.machine.deadline import WorkLimit, WorkLimitExceeded, work_limit  # noqa: E402
from planner.routes.memory import estimate_memory  # noqa: E402
from planner.routes.micro_batch import largest_fitting_search  # noqa: E402

warnings.filterwarnings("ignore", message=".*deprecated.*")

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 128}
QWEN2_MOE = {"model_type": "qwen2_moe", "hidden_size": 48, "intermediate_size": 80,
             "moe_intermediate_size": 24, "shared_expert_intermediate_size": 40,
             "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "num_experts": 6, "num_experts_per_tok": 2, "decoder_sparse_step": 2,
             "mlp_only_layers": [3], "vocab_size": 101}
MIXTRAL = {"model_type": "mixtral", "hidden_size": 48, "intermediate_size": 80,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 101}


def _training(**over) -> dict:
    return {"precision": "fp32", "optimizer": "adamw", "micro_batch_size": 2,
            "sequence_length": 16, "implementation": "transformers", **over}


def _request(cfg: dict, tr: dict, mem: int | None = None, **par) -> MemoryRequest:
    return MemoryRequest(model={"hf_config": cfg}, training=tr, parallelism=par,
                         **({"hardware": {"memory_bytes": mem}} if mem else {}))


def _peak(cfg: dict, tr: dict, b: int, device: str = "cpu", **par) -> int:
    r = estimate_memory(_request(cfg, {**tr, "micro_batch_size": b}, **par), device=device,
                        explain=False)
    return r.breakdown.total + r.allocator_reserve_bytes


def _measured(cfg: dict, tr: dict, b: int) -> int:
    """The real CPU step's steady peak at micro-batch b (every byte live, exact)."""
    steps = S.run(cfg, TrainingSpec(**{**tr, "micro_batch_size": b}), "cpu", traced=False,
                  steps=3)
    return max(bd["total"] for s in steps[1:] for bd, _ in s["phases"].values())


def _search(cfg: dict, tr: dict, mem: int, device: str = "cpu", **par):
    r = estimate_memory(_request(cfg, tr, mem, **par), device=device)
    a = next(a for a in r.assumptions if a.name == "max_micro_batch_search")
    return r, a


@pytest.mark.parametrize("cfg, tr, times", [
    (LLAMA, _training(), 3.0),
    (LLAMA, _training(precision="amp-bf16", activation_checkpointing={"strategy": "full"}), 2.2),
    (QWEN2_MOE, _training(), 2.5),
], ids=["llama-fp32", "llama-amp-ckpt", "qwen2_moe-fp32"])
def test_the_boundary_fits_for_real_and_the_next_size_does_not(cfg, tr, times):
    # the budget: a multiple of the request's own peak (b = 2, where the optimizer step's peak,
    # flat in b, is the highest: the per-phase bounds still predict the boundary)
    mem = int(times * _peak(cfg, tr, 2))
    r, a = _search(cfg, tr, mem)
    m = r.fit.max_micro_batch_size
    assert m is not None and m > 2
    assert _measured(cfg, tr, m) <= mem < _measured(cfg, tr, m + 1)
    assert a.value == "3 more sizes traced"  # the request's b + 1, the prediction, the next
    assert str(m) in a.note and str(m + 1) in a.note


def test_equal_to_the_exhaustive_search():
    cfg, tr = LLAMA, _training(sequence_length=24)
    p1, p2 = _peak(cfg, tr, 1), _peak(cfg, tr, 2)
    for times in (1.0, 1.1, 1.7, 4.0):
        mem = int(times * p2)
        r, _ = _search(cfg, tr, mem)
        assert r.fit.max_micro_batch_size == largest_fitting_search(
            lambda b: _peak(cfg, tr, b) <= mem)
    # not even one sequence fits: None, as the exhaustive search says
    r, _ = _search(cfg, tr, p1 - 1)
    assert r.fit.max_micro_batch_size is None and not r.fit.fits


def test_expert_parallel_and_the_cuda_reserve():
    cfg, tr, par = MIXTRAL, _training(), {"data_parallel": 2, "expert_parallel": 2}
    mem = int(2.6 * _peak(cfg, tr, 2, "cuda", **par))
    r, _ = _search(cfg, tr, mem, "cuda", **par)
    m = r.fit.max_micro_batch_size
    assert m is not None and m > 2
    assert _peak(cfg, tr, m, "cuda", **par) <= mem < _peak(cfg, tr, m + 1, "cuda", **par)


def test_the_work_limit_leaves_the_search_out_and_says_so():
    cfg, tr = LLAMA, _training(sequence_length=20)
    p1 = _peak(cfg, tr, 2)  # the request's own size traced (cached): the answer is immediate
    with work_limit(WorkLimit(0.05)):
        r = estimate_memory(_request(cfg, tr, p1 * 10), device="cpu")
    assert r.breakdown.total == p1 and r.fit.max_micro_batch_size is None
    assert any("work limit" in n and "ask again" in n for n in r.notes)
    limit = WorkLimit(60)
    limit.cancel()
    with work_limit(limit), pytest.raises(WorkLimitExceeded):
        estimate_memory(_request(cfg, {**tr, "sequence_length": 12}, p1 * 10), device="cpu")
    # the service's inline attempt (its first work check moves the estimate to a worker thread)
    # is not a spent limit: the search lets it through
    from service.estimates import _INLINE, _NeedsThread

    with work_limit(_INLINE), pytest.raises(_NeedsThread):
        estimate_memory(_request(cfg, tr, p1 * 9), device="cpu")


def test_the_bounded_search_on_convex_phase_peaks():
    """``largest`` over synthetic phase peaks of the shape the reasoning relies on (each phase a
    maximum of affine, non-decreasing pieces in b, some flat), against every size in turn: the
    same answer, and the sizes asked stay few (at most 2·log2 of the range + 4)."""
    import math
    import random

    from planner.routes.hf_micro_batch import budget_total, largest

    rng = random.Random(7)
    top = 4096
    for _ in range(300):
        pieces = {ph: [(rng.randrange(0, 10**6), rng.choice([0, 0, rng.randrange(1, 5000)]))
                       for _ in range(rng.randrange(1, 4))] for ph in ("f", "b", "o")}

        def peaks(b: int, pieces=pieces) -> dict[str, int]:
            return {ph: max(c + s * b for c, s in ps) for ph, ps in pieces.items()}

        T = rng.randrange(0, 2 * 10**7)
        want = max((b for b in range(1, top + 1) if max(peaks(b).values()) <= T), default=None)
        asked: list[int] = []
        start = rng.randrange(1, 64)

        def ask(b: int, asked=asked, peaks=peaks) -> dict[str, int]:
            asked.append(b)
            return peaks(b)

        assert largest(ask, T, start, peaks(start), max_batch=top) == want
        assert len(asked) == len(set(asked)) <= 2 * math.log2(top) + 4
        if want is not None and want < top:  # the boundary was asked, both sides
            assert want + 1 in asked and (want in asked or want == start)
    # T: the largest peak that fits with the allocator reserve (5% on CUDA, none on the CPU)
    assert budget_total(1000, "cpu") == 1000
    t = budget_total(10**9, "cuda")
    assert t + int(t * 0.05) <= 10**9 < t + 1 + int((t + 1) * 0.05)


def test_the_premise_each_phase_peak_is_convex_from_two_on():
    """The bounds' premise, on the traced step (equal to the real one, tests/test_hf_estimate.py):
    each phase's peak has non-negative second differences over b = 2..5 (op changes included,
    e.g. a checkpointed backward's peak moving); b = 1 is the exception the search avoids (a
    size-1 batch keeps a layout contiguous: the first difference exceeds the next)."""
    from planner.hf import estimate as E

    mistral = {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 96,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 128}
    seen_exception = False
    for cfg, over in ((mistral, {"precision": "bf16", "activation_checkpointing":
                                 {"strategy": "full"}}), (mistral, {}), (MIXTRAL, {})):
        v = {b: {n: p.breakdown["total"] for n, p in E.estimate(
            cfg, TrainingSpec(**_training(micro_batch_size=b, sequence_length=64, **over)))
            .steady_phases.items()} for b in range(1, 6)}
        for n in v[1]:
            d = [v[b + 1][n] - v[b][n] for b in range(1, 5)]
            assert all(x >= 0 for x in d)  # non-decreasing
            assert d[1] <= d[2] <= d[3], (n, d)  # convex from b = 2
            seen_exception |= d[0] > d[1]
    assert seen_exception
