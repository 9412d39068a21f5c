"""Per-rank pipeline memory (planner.pipeline_memory) against real pipelined steps.

Each case runs the pipelined reference step on 2 ranks (torchrun, gloo on CPU) through
``run_validation`` and compares every rank's steady-state peak with the planner's replay of that
rank. Tolerance: 2% of the measured total per rank. Model states (parameters, gradients,
optimizer states) are exact on every rank; GPipe and the last stage of 1F1B and ZB-H1 are exact
in every category. What is left on the first stage of 1F1B and ZB-H1 (one or two stage outputs,
16 KiB each here) is a sent activation that torch's point-to-point bookkeeping keeps referenced
after its backward, which the replay does not model.
"""

from __future__ import annotations

import pytest

from planner.memory import estimate_memory
from planner.specs import MemoryRequest, ValidationRequest
from service.validation.runner import run_validation

pytest.importorskip("torch.distributed.pipelining")

TOLERANCE = 0.02
MODEL_STATES = ("parameters", "gradients", "optimizer_states")
CATEGORIES = (*MODEL_STATES, "activations", "temporaries", "total")


def tiny(family: str) -> dict:
    m = {"family": family, "num_layers": 4, "hidden_size": 64, "num_heads": 4, "vocab_size": 128,
         "max_sequence_length": 32, "tie_embeddings": False}
    if family == "llama":
        m |= {"num_kv_heads": 2, "ffn_hidden_size": 160}
    return m


def body(schedule: str, family: str) -> dict:
    return {"model": tiny(family),
            "training": {"precision": "fp32", "optimizer": "adamw", "micro_batch_size": 2,
                         "sequence_length": 32, "gradient_accumulation_steps": 4},
            "parallelism": {"pipeline_parallel": 2, "pipeline_schedule": schedule},
            "device": "cpu", "steps": 3, "timeout_s": 120}


# (schedule, ranks exact in every category)
CASES = [("gpipe", {0, 1}), ("1f1b", {1}), ("zb-h1", {1})]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("schedule,exact", CASES)
def test_every_rank_against_its_replay(schedule: str, exact: set[int], family: str) -> None:
    res = run_validation(ValidationRequest.model_validate(body(schedule, family)))
    assert res.ranks is not None and [r.rank for r in res.ranks] == [0, 1]
    for r in res.ranks:
        err = (r.estimate.total - r.measured.total) / r.measured.total
        print(f"{schedule} {family} rank {r.rank}: estimate {r.estimate.total} B, measured "
              f"{r.measured.total} B ({err:+.2%})")
        assert abs(err) <= TOLERANCE, (r.rank, r.estimate, r.measured)
        for c in MODEL_STATES:
            assert getattr(r.estimate, c) == getattr(r.measured, c), (r.rank, c)
        if r.rank in exact:
            assert r.estimate == r.measured, r.rank
    # the top-level comparison is the planner's worst rank against the measured worst rank
    worst_est = max(res.ranks, key=lambda r: (r.estimate.total, -r.rank))
    assert res.estimate == worst_est.estimate
    assert res.measured == max(res.ranks, key=lambda r: (r.measured.total, -r.rank)).measured
    assert "replay of every pipeline rank" in res.pipeline.memory_note


def test_estimate_names_the_bottleneck_rank() -> None:
    """POST /v1/memory with pipeline_parallel > 1: the worst rank's replay, every rank's figure
    in the notes. Under GPipe the last stage peaks (every micro-batch's logits and loss-side
    tensors), under 1F1B the first (most micro-batches in flight)."""
    seen = {}
    for schedule in ("gpipe", "1f1b", "zb-h1"):
        b = body(schedule, "gpt2")
        req = MemoryRequest.model_validate({k: b[k] for k in ("model", "training", "parallelism")})
        res = estimate_memory(req, device="cpu")
        worst = {a.name: a.value for a in res.assumptions}["worst_rank"]
        seen[schedule] = int(worst)
        assert any(n.startswith("per-rank steady-state peaks: rank 0 (stages 0)") for n in res.notes)
        assert res.breakdown.total == sum(getattr(res.breakdown, c) for c in CATEGORIES[:-1])
    assert seen == {"gpipe": 1, "1f1b": 0, "zb-h1": 1}
