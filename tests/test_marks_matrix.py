"""The recording machine's live bytes at every mark (planner/machine/recording.py): summed per
segment between marks, grouped per distinct polynomial, they equal the cumulative sum over every
log row (``dense_marks_matrix``), over recorded steps of random setups (single device and
data-parallel ranks, every domain)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from planner.catalog.presets import resolve_model
from planner.catalog.specs import MemoryRequest
from planner.layouts.data_parallel import ParallelProgram
from planner.machine.recording import record
from planner.routes.checkpoint_blocks import checkpointed_blocks
from planner.step.program import ReferenceProgram


@pytest.mark.parametrize("seed", range(4))
def test_segment_sums_equal_the_row_by_row_sum(seed: int) -> None:
    rng = random.Random(900 + seed)
    for _ in range(4):
        heads = rng.choice([2, 4])
        body = {"model": {"family": rng.choice(["gpt2", "llama"]),
                          "num_layers": rng.randint(1, 12), "hidden_size": 16 * heads,
                          "num_heads": heads, "vocab_size": 200, "max_sequence_length": 256},
                "training": {"micro_batch_size": 2, "sequence_length": 32,
                             "gradient_accumulation_steps": rng.choice([1, 3]),
                             "precision": rng.choice(["fp32", "amp-bf16", "mixed-bf16"]),
                             "attention": rng.choice(["sdpa", "eager"]),
                             "activation_checkpointing": rng.choice(
                                 [{"strategy": "none"}, {"strategy": "sqrt"},
                                  {"strategy": "every-k", "every_k": 2}])},
                "parallelism": {"data_parallel": rng.choice([2, 3]),
                                "zero_stage": rng.randint(0, 3)}}
        req = MemoryRequest.model_validate(body)
        model, tr = resolve_model(req.model), req.training
        ckpt = checkpointed_blocks(tr, model.num_layers)
        domain = rng.choice([(None, None), (1, None), (None, 1)])
        if rng.random() < 0.5:
            def make(m, sizes):
                return ReferenceProgram(model, tr, device="cuda", checkpointed=ckpt, machine=m,
                                        sizes=sizes)
        else:
            def make(m, sizes):
                return ParallelProgram(model, tr, req.parallelism, rng.randint(0, 1),
                                       device="cuda", checkpointed=ckpt, machine=m, sizes=sizes)
        m, prog = record(make, domain)
        prog.run_windows()
        m._flush()
        assert len(m.log) > 100
        assert np.array_equal(m.marks_matrix(), m.dense_marks_matrix())


@pytest.mark.parametrize("seed", range(6))
def test_a_long_run_of_changes_sums_as_the_change_by_change_sum(seed: int) -> None:
    from planner.machine.recording import add_changes
    from planner.machine.symbolic import MPoly, Poly, Space

    rng = random.Random(seed)
    sp = Space(("a", "b"), (2, 2))
    ncat = 7
    poly_kind = [rng.choice(["int", "poly", "mpoly"]) for _ in range(ncat)]

    def size(cat: int):
        kind = poly_kind[cat] if rng.random() < 0.7 else "int"
        if kind == "int":
            return rng.randint(0, 5000)
        terms = {(rng.randint(0, 2), rng.randint(0, 2)): rng.randint(-9, 9) for _ in range(3)}
        return Poly.make(terms) if kind == "poly" else MPoly({}, sp)._make(terms)

    for n in (0, 5, 16, 40, 300):
        changes = []
        for _ in range(n):
            cat = rng.randrange(ncat)
            changes.append(((cat + 1) * rng.choice([1, -1]), size(cat)))
        start = [rng.randint(0, 10 ** 6) for _ in range(ncat)]
        want = list(start)
        for sc, s in changes:
            want[abs(sc) - 1] = want[abs(sc) - 1] + s if sc > 0 else want[abs(sc) - 1] - s
        got = add_changes(list(start), changes)
        for g, w in zip(got, want):
            assert type(g) is type(w) and (g == w if isinstance(w, int) else g.t == w.t)
