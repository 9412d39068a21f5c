"""MoE routing does not move the transformers step's memory: the estimate (a trace, whose fake
router picks what a fake top-k gives) equals real CPU steps whose routers send every token to
the same top-k experts, the most imbalanced routing there is.

transformers 5.x runs these families' experts on the ``grouped_mm`` path: the tokens are sorted by
expert and every expert's projection is one grouped matmul over all b·s·k token-expert pairs, so
each buffer is sized by b·s·k whatever the split between experts, and no token is dropped (the
families' code has no capacity factor). Routers zeroed here before each forward: every logit equal, so top-k takes the
same k experts for every token (asserted from the router's own output). Tolerance: none, every
category of the first and the steady step to the byte."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from planner.catalog.specs import MemoryRequest, TrainingSpec  # noqa: E402
from planner.hf import step as S  # noqa: E402
from planner.routes.memory import estimate_memory  # noqa: E402
from tests.test_hf_estimate import MODELS, _training  # noqa: E402

warnings.filterwarnings("ignore", message=".*deprecated.*")

CASES = [
    ("mixtral", {}),
    ("mixtral", {"precision": "amp-bf16"}),
    ("qwen2_moe", {"optimizer": "sgd", "activation_checkpointing": {"strategy": "full"}}),
    ("qwen2_moe", {"precision": "amp-bf16"}),
]


def _zero_weight(router: torch.nn.Module, _inputs: tuple) -> None:
    router.weight.detach().zero_()


@pytest.mark.parametrize("name, over", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_all_tokens_on_the_same_experts_equal_the_estimate(name, over, monkeypatch):
    cfg, tr = MODELS[name], _training(over)
    k = cfg["num_experts_per_tok"]
    est = estimate_memory(MemoryRequest(model={"hf_config": cfg}, training=tr), device="cpu")
    chosen: list[set[int]] = []  # the experts each router chose (Python ints: no tensor kept)
    build = S.build

    def skewed(*a, **kw):
        model, opt = build(*a, **kw)
        routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
        assert len(routers) == cfg["num_hidden_layers"]
        for r in routers:  # zeroed before every forward (the optimizer steps it), in place
            r.register_forward_pre_hook(_zero_weight)
            r.register_forward_hook(lambda _m, _i, out: chosen.append(set(out[2].view(-1).tolist())))
        experts = type(model.model.layers[0].mlp.experts).__name__
        assert model.config._experts_implementation == "grouped_mm", experts
        return model, opt

    monkeypatch.setattr(S, "build", skewed)
    steps = S.run(cfg, TrainingSpec(**tr), "cpu", traced=False, steps=3)
    # every token of every block and step (and recompute) went to the same k experts
    assert len(chosen) >= 3 * cfg["num_hidden_layers"] and all(len(c) == k for c in chosen)
    steady = max(steps[1:], key=lambda s: s["peak"][0]["total"])
    assert est.breakdown.model_dump() == steady["peak"][0]
    assert est.first_step.model_dump() == steps[0]["peak"][0]
