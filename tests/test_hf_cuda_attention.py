"""The transformers estimate for CUDA against the H200's measurements.

benchmarks/results/accuracy-hf-cuda.md: the real transformers step run on an H200 (torch 2.11,
transformers 5.17), each row's steady-state tensors measured by the storage meter. With fp32
inputs and grouped-query heads CUDA runs SDPA's composite math path, which keeps the score matrix
the CPU's flash kernel does not: the estimate's trace follows CUDA's choice
(planner/hf/cuda_attention.py). These rows are estimated here (torch 2.13, transformers 5.25)
to the measured byte; the 16-bit rows are left out (cuDNN's 16-byte seed per layer, and this
machine's CPU autocast differs from the GPU machine's by tens of KiB on some of them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GQA_FP32 = ["llama fp32 adamw", "llama fp32 sgd full-ckpt", "llama fp32 adamw use_cache off b4 s128",
            "llama fp32 adamw fused accum 2", "mistral fp32 sgd-momentum eager", "qwen2 fp32 adamw",
            "phi3 fp32 adamw"]


def _measured() -> dict[str, int]:
    out = {}
    for line in (ROOT / "benchmarks" / "results" / "accuracy-hf-cuda.md").read_text().splitlines():
        if line.startswith("| ") and "| real |" in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = int(cells[3].replace(",", ""))
    return out


@pytest.mark.parametrize("label", GQA_FP32)
def test_cuda_estimate_equals_the_h200(label: str) -> None:
    pytest.importorskip("transformers")
    from benchmarks.accuracy_hf import REAL
    from planner.catalog.specs import MemoryRequest
    from planner.routes.memory import estimate_memory

    _, model, training = next(r for r in REAL if r[0] == label)
    cuda = estimate_memory(MemoryRequest(model={"hf_config": model}, training=training),
                           device="cuda", explain=False)
    assert cuda.breakdown.total == _measured()[label]
    if label == "llama fp32 adamw":  # the CPU's kernel keeps less: the two are not alike
        cpu = estimate_memory(MemoryRequest(model={"hf_config": model}, training=training),
                              device="cpu", explain=False)
        assert cpu.breakdown.activations < cuda.breakdown.activations


def test_kernel_choice_follows_the_probe() -> None:
    """cuda_kernel's rule against benchmarks/results/sdpa-kernels-cuda.json (the ATen op SDPA
    dispatched to on the H200, inputs requiring grad, causal, no mask)."""
    import torch

    from planner.hf.cuda_attention import cuda_kernel

    probe = json.loads((ROOT / "benchmarks" / "results" / "sdpa-kernels-cuda.json").read_text())
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    seen = 0
    for row in probe:
        q = torch.empty(2, 8, 128, row["head_dim"])
        k = torch.empty(2, 2 if row["gqa"] else 8, 128, row["head_dim"])
        got = cuda_kernel(q, k, row["gqa"], names[row["dtype"]])
        forward = row["forward"]
        want = ("cudnn" if "_scaled_dot_product_cudnn_attention" in forward else
                "efficient" if "_scaled_dot_product_efficient_attention" in forward else "math")
        assert got == want, row
        seen += 1
    assert seen == 24
