"""``training.lora`` for ``training.implementation: "transformers"``: low-rank adapters on the
transformers model, the way the reference step puts them on its own model
(service/validation/step.py ``apply_lora``; Hu et al. 2021, eq. 3):

- every parameter of the model is frozen (embeddings, norms, the output head included);
- in every decoder layer, each ``nn.Linear`` named by ``target_modules`` (q, k, v, o, up, gate,
  down: transformers' ``q_proj`` ... ``down_proj``) is wrapped: y = base(x) + (alpha/r)·(x Aᵀ)Bᵀ
  with A (r, in) and B (out, r) trainable in the base weight's dtype, B zero-initialised;
- with gradient checkpointing, transformers 5.x's ``activation_checkpointing_enable`` itself
  makes the embeddings' output require grad (``enable_input_require_grads``, as for PEFT
  models), so a reentrant checkpoint of a frozen block still returns the adapters' gradients.

The adapters are plain modules (no PEFT dependency); the estimate traces and the validation runs
the same modules (planner/hf/step.py ``build``). Families whose projections are fused or not
``nn.Linear`` (gpt2's Conv1D ``c_attn``, phi3's ``qkv_proj`` / ``gate_up_proj``) and MoE models
(routed experts are fused 3-D parameters, and the expert-parallel composition assumes trained
experts) are refused, naming ``training.lora``; so are quantized or cast frozen weights
(``base_dtype``).
"""

from __future__ import annotations

import math
from typing import Any

from planner.catalog.errors import PlanningError
from planner.catalog.specs import TrainingSpec

NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "up": "up_proj",
         "gate": "gate_proj", "down": "down_proj"}
FIELD = "training.lora.target_modules"


def unsupported(tr: TrainingSpec) -> tuple[str, str] | None:
    """(field, why) for a LoRA setting the transformers step does not run."""
    if tr.lora is not None and tr.lora.base_dtype is not None:
        return ("training.lora.base_dtype", "implementation 'transformers' keeps the frozen "
                "base weights in the precision's parameter dtype: base_dtype must be left out")
    return None


# families whose decoder layers have none of q_proj ... down_proj as separate nn.Linear modules
# (gpt2: Conv1D c_attn, c_proj, c_fc; phi3: fused qkv_proj and gate_up_proj, only o_proj and
# down_proj separate): refused before anything is built
FUSED = {"gpt2": set(NAMES), "phi3": {"q", "k", "v", "up", "gate"}}


def family_refusal(model_type: str, tr: TrainingSpec) -> str | None:
    """Why ``tr.lora``'s targets are not in this family's layers (None: they are, or no LoRA)."""
    if tr.lora is None:
        return None
    missing = [t for t in dict.fromkeys(tr.lora.target_modules)
               if t in FUSED.get(model_type, set())]
    if not missing:
        return None
    return (f"{FIELD}: {', '.join(map(repr, missing))} is not a separate nn.Linear in "
            f"{model_type}'s decoder layers (fused or Conv1D projections); implementation "
            "'transformers' puts adapters on llama-style projections (q, k, v, o, up, gate, down "
            "as q_proj ... down_proj)")


def _layers(model: Any) -> list:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise PlanningError("training.lora: this model's decoder layers are not "
                            "model.model.layers (supported: llama-style families)", FIELD)
    return list(layers)


def apply(model: Any, tr: TrainingSpec) -> None:
    """Freeze the model and wrap the targeted projections of every decoder layer."""
    import torch
    from torch import nn

    lora = tr.lora
    assert lora is not None

    class LoRALinear(nn.Module):
        def __init__(self, base: nn.Linear) -> None:
            super().__init__()
            self.base = base
            w = base.weight
            self.lora_a = nn.Parameter(torch.empty(lora.rank, base.in_features, dtype=w.dtype,
                                                   device=w.device))
            self.lora_b = nn.Parameter(torch.zeros(base.out_features, lora.rank, dtype=w.dtype,
                                                   device=w.device))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            self.scale = lora.alpha / lora.rank

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = nn.functional.linear
            return self.base(x) + f(f(x, self.lora_a), self.lora_b) * self.scale

    for p in model.parameters():
        p.requires_grad_(False)
    for i, layer in enumerate(_layers(model)):
        for short in dict.fromkeys(lora.target_modules):
            found = [(n, m) for n, m in layer.named_modules()
                     if n.rsplit(".", 1)[-1] == NAMES[short] and isinstance(m, nn.Linear)]
            if not found:
                raise PlanningError(
                    f"{FIELD}: {short!r} ({NAMES[short]}, an nn.Linear) is not in decoder layer "
                    f"{i} of this {model.config.model_type} model; implementation "
                    "'transformers' puts adapters on llama-style projections (q, k, v, o, up, "
                    "gate, down as q_proj ... down_proj)", FIELD)
            for name, mod in found:
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                setattr(parent, name.rsplit(".", 1)[-1], LoRALinear(mod))
