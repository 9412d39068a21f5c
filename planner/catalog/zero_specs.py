"""POST /v1/zero's result: one setup over its ZeRO stages (and offload), side by side."""

from __future__ import annotations

from pydantic import Field

from planner.catalog.specs import Breakdown, Fit, ResolvedModel, _Frozen

__all__ = ["ZeroResult", "ZeroStage"]


class ZeroStage(_Frozen):
    stage: int
    offload_optimizer: bool = False
    implementation: str
    communication_bytes_per_step: int = Field(
        ..., description="Bytes each rank sends per step for gradients/parameters.")
    breakdown: Breakdown
    fit: Fit | None = None


class ZeroResult(_Frozen):
    model: ResolvedModel
    stages: list[ZeroStage]
    notes: list[str] = Field(default_factory=list)
