"""The MoE split of a per-device estimate: the routed experts' model states and the rest."""

from __future__ import annotations

from pydantic import Field

from planner.catalog.frozen import _Frozen


class MoEStates(_Frozen):
    """Model-state bytes on one device at the steady optimizer-window peak (every parameter,
    gradient and optimizer state live), split into the routed experts' (E/ep of each sparse
    block's experts) and the dense rest (attention, embeddings, norms, routers, shared
    experts), which every expert-parallel rank holds whole."""

    num_experts: int = Field(..., description="Routed experts per sparse block.")
    experts_per_device: int = Field(..., description="num_experts / expert_parallel.")
    expert_parallel: int
    expert_parameters: int
    expert_gradients: int
    expert_optimizer_states: int
    dense_parameters: int
    dense_gradients: int
    dense_optimizer_states: int
    dispatch_buffer_bytes: int = Field(
        ..., description="One sparse block's all-to-all receive buffer, b·s·k·h·a, added to "
        "the forward and backward peaks' temporaries when expert_parallel > 1 (0 otherwise).")
