"""Per-rank pipeline memory (planner.layouts.pipeline_memory) against real pipelined steps.

Each case runs the pipelined reference step on 2 ranks (torchrun, gloo on CPU) through
``run_validation`` and compares every rank's steady-state peak with the planner's replay of that
rank: equal to the byte in every category, on every rank. That includes what torch's
point-to-point bookkeeping keeps referenced: Schedule1F1B's ``output``/``fwd_sends`` variables and
its warm-up ``send_work``, and ``_PipelineScheduleRuntime``'s ``send_ops`` (every sent activation
and input gradient until the action loop ends) for the interleaved and zero-bubble schedules;
for the V-shaped ones (zb-v, dualpipe-v) the hand-off between the two stages on the last rank
(set_local_fwd_input / set_local_bwd_input), whose tensors stay as receive buffers until the
next step replaces them.
"""

from __future__ import annotations

import pytest

from planner.routes.memory import estimate_memory
from planner.catalog.specs import MemoryRequest, ValidationRequest
from service.validation.runner import run_validation

pytest.importorskip("torch.distributed.pipelining")

MODEL_STATES = ("parameters", "gradients", "optimizer_states")
CATEGORIES = (*MODEL_STATES, "activations", "temporaries", "total")


def tiny(family: str) -> dict:
    m = {"family": family, "num_layers": 4, "hidden_size": 64, "num_heads": 4, "vocab_size": 128,
         "max_sequence_length": 32, "tie_embeddings": False}
    if family == "llama":
        m |= {"num_kv_heads": 2, "ffn_hidden_size": 160}
    return m


def body(schedule: str, family: str, virtual_stages: int = 1, optimizer: str = "adamw") -> dict:
    return {"model": tiny(family),
            "training": {"precision": "fp32", "optimizer": optimizer, "micro_batch_size": 2,
                         "sequence_length": 32, "gradient_accumulation_steps": 4},
            "parallelism": {"pipeline_parallel": 2, "pipeline_schedule": schedule,
                            "virtual_pipeline_stages": virtual_stages},
            "device": "cpu", "steps": 3, "timeout_s": 120}


# (schedule, virtual stages, family)
CASES = [(s, 1, f) for s in ("gpipe", "1f1b", "zb-h1") for f in ("gpt2", "llama")] + [
    ("interleaved-1f1b", 2, "gpt2"), ("interleaved-1f1b", 2, "llama"), ("zb-h1", 2, "llama"),
    ("zb-v", 2, "gpt2"), ("dualpipe-v", 2, "llama")]


# an optimizer whose states exist from its construction (torch.optim.Adagrad): built per rank
# over that rank's stages only (an estimate of it raised AttributeError before)
@pytest.mark.parametrize("schedule,v,family,optimizer", [(*c, "adamw") for c in CASES] + [
    ("1f1b", 1, "gpt2", "adagrad")])
def test_every_rank_against_its_replay(schedule: str, v: int, family: str, optimizer: str) -> None:
    res = run_validation(ValidationRequest.model_validate(body(schedule, family, v, optimizer)))
    assert res.ranks is not None and [r.rank for r in res.ranks] == [0, 1]
    for r in res.ranks:
        print(f"{schedule} v={v} {family} rank {r.rank}: estimate {r.estimate.total} B, "
              f"measured {r.measured.total} B")
        assert r.estimate == r.measured, (r.rank, r.estimate, r.measured)
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
