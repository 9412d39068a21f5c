"""The ``cuda`` estimate against the reference step measured on a GPU, byte for byte.

Golden data: benchmarks/results/accuracy-cuda.json, the GPU accuracy campaign
(benchmarks/gpu_campaign.py) run on one NVIDIA H200 with torch 2.11 (CUDA 13). Every ``ok`` row
of its single-device and full-size sections holds the storage meter's per-category peak of the
steady-state step (``meter_breakdown``, service/validation/meter.py on CUDA); the request is
rebuilt from the row's label and factors as the campaign built it, and
``estimate_memory(device="cuda")`` must equal the meter in every category.

One exception, stated exactly: the meter counts every storage, host ones too, and the foreach
(and for-loop) implementations of Adam(W) and Adafactor keep each parameter's ``step`` counter as
a 0-dim fp32 tensor on the host (torch.optim: not capturable, not fused). The estimate describes
device memory and leaves them out, so the meter's optimizer states are 4 bytes per trainable
parameter tensor higher: 588 B for llama-medium (147 tensors), 784 B for gpt2 (196), 1,552 B for
gpt2-medium (388), 300 B for llama-small (75), 3,088 B for gpt2-xl (772), 1,164 B for
llama-2-7b (291).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_campaign import CATS, DEVICE_MODELS, DEVICE_SIZES, FULL_SIZE, _t
from planner.catalog.presets import resolve_model
from planner.catalog.specs import ValidationRequest
from planner.routes.memory import estimate_memory
from service.validation.model import Transformer

ROOT = Path(__file__).resolve().parents[1]
DATA = json.loads((ROOT / "benchmarks/results/accuracy-cuda.json").read_text())
SECTIONS = ("single-device", "full-size")
ROWS = [r for r in DATA["rows"] if r["section"] in SECTIONS and r["status"] == "ok"]
HOST_STEP_OPTIMIZERS = {"adam", "adamw", "adafactor"}  # 'step' on the host, foreach/for-loop
STEP_SCALAR_BYTES = 4  # torch.tensor(0.0): fp32, 0-dim


def _request(row: dict) -> ValidationRequest:
    if row["section"] == "single-device":
        f = row["factors"]
        b, s = DEVICE_SIZES[f["size"]]
        model = DEVICE_MODELS[(f["family"], f["size"])]
        training = _t(f["precision"], f["optimizer"], b, s, f["checkpointing"],
                      attention=f["attention"], dropout=f["dropout"])
    else:
        (model, training), = [(m, t) for label, m, t, _, _ in FULL_SIZE if label == row["label"]]
    return ValidationRequest(model=model, training=training, mode="real", steps=3, device="cuda")


def _host_step_bytes(req: ValidationRequest) -> int:
    tr = req.training
    if tr.optimizer not in HOST_STEP_OPTIMIZERS or tr.optimizer_implementation == "fused":
        return 0
    with torch.device("meta"):
        model = Transformer(resolve_model(req.model), attention=tr.attention, dropout=tr.dropout)
    return STEP_SCALAR_BYTES * sum(1 for p in model.parameters() if p.requires_grad)


def test_rows_are_there():
    assert len(ROWS) >= 36 and {r["section"] for r in ROWS} == set(SECTIONS)
    assert DATA["header"]["torch"].startswith("2.11") and "H200" in DATA["header"]["device"]


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['section']}:{r['label']}" for r in ROWS])
def test_cuda_estimate_equals_measured(row):
    req = _request(row)
    est = estimate_memory(req, device="cuda").breakdown.model_dump()
    meter = dict(row["meter_breakdown"])
    host = _host_step_bytes(req)
    assert meter["optimizer_states"] - row["est_breakdown"]["optimizer_states"] in (0, host)
    meter["optimizer_states"] -= host
    meter["total"] -= host
    assert {c: est[c] for c in (*CATS, "total")} == {c: meter[c] for c in (*CATS, "total")}
