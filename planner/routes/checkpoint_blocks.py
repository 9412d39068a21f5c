"""The blocks an estimate checkpoints: the named strategies' rule (the validation step's own),
memoised per (strategy, k, layers), and how an estimate names them."""

from __future__ import annotations

import functools
import math

from planner.catalog.specs import ActivationCheckpointing, Assumption, ResolvedModel, TrainingSpec

__all__ = ["checkpointed_blocks", "checkpointed_blocks_of", "ckpt_assumption", "frozen_blocks"]


def checkpointed_blocks(tr: TrainingSpec, num_layers: int) -> set[int]:
    """Block indices the reference step wraps in torch.utils.checkpoint for named strategies
    (the same rule as service.validation.step.checkpointed_blocks); an explicit plan
    (``blocks``: strategy 'blocks' or a resolved 'budget') as given."""
    ac = tr.activation_checkpointing
    if ac.blocks is not None:
        return set(ac.blocks)
    if ac.strategy == "full":
        return set(range(num_layers))
    if ac.strategy == "every-k":
        k = ac.every_k or 1
        return {i for i in range(num_layers) if i % k == 0}
    if ac.strategy == "sqrt":  # Chen et al. 2016: one kept block per ~sqrt(n)
        k = max(1, round(math.sqrt(num_layers)))
        return {i for i in range(num_layers) if i % k != k - 1}
    return set()


def checkpointed_blocks_of(tr: TrainingSpec, model: ResolvedModel) -> frozenset[int] | None:
    """The blocks an estimate of ``tr`` checkpoints (None: a budget plan, searched per
    estimate)."""
    ac = tr.activation_checkpointing
    if ac.strategy == "budget" and ac.blocks is None:
        return None
    return frozen_blocks(tr, model.num_layers) if model.architecture_known else frozenset()


def frozen_blocks(tr: TrainingSpec, num_layers: int) -> frozenset[int]:
    """checkpointed_blocks as a frozenset, memoised for the named strategies."""
    ac = tr.activation_checkpointing
    if ac.blocks is not None:
        return frozenset(ac.blocks)
    return named_blocks(ac.strategy, ac.every_k, num_layers)  # plain keys: cheap to compare


@functools.lru_cache(maxsize=1024)
def named_blocks(strategy: str, every_k: int | None, num_layers: int) -> frozenset[int]:
    ac = ActivationCheckpointing(strategy=strategy, every_k=every_k)
    return frozenset(checkpointed_blocks(TrainingSpec(activation_checkpointing=ac), num_layers))


@functools.lru_cache(maxsize=1024)
def ckpt_assumption(ckpt: frozenset[int]) -> Assumption:
    return Assumption(name="checkpointed_blocks", value=_ranges(sorted(ckpt)),
                      note="torch.utils.checkpoint(use_reentrant=False)")


def _ranges(xs: list[int]) -> str:
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)
