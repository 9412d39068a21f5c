"""The GPU accuracy campaign keeps working where there is no GPU: its CPU dry run writes every
section's table, every row runs, and it needs nothing the GPU image lacks (the service's web and
database stack)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_campaign import SECTIONS, design, factors

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# Run the campaign with the packages the GPU image has not got made unimportable.
BLOCKED = ("fastapi", "starlette", "sqlalchemy", "uvicorn", "psycopg", "pydantic_settings")
RUNNER = f"""
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("not on the GPU image: " + name)
        return None
sys.meta_path.insert(0, _Block())
from benchmarks.gpu_campaign import main
sys.exit(main(sys.argv[1:]))
"""


def test_design_balances_every_factor():
    facs = factors(["adamw", "sgd-momentum", "adafactor"])
    rows = design(36, facs)
    assert len(rows) == 36
    for name, levels in facs:
        counts = [sum(r[name] == lv for r in rows) for lv in levels]
        assert min(counts) >= 36 // len(levels) - 1 and min(counts) >= 2, (name, counts)
    assert design(36, facs) == rows  # deterministic


def test_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "-c", RUNNER, "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "accuracy-cuda.md").read_text()
    data = json.loads((out / "accuracy-cuda.json").read_text())
    for title in ("## 1. Single device", "## 2. Full size", "## 3. Largest micro-batch",
                  "## 4. CPU offload", "## 5. Step time"):
        assert title in md
    rows = data["rows"]
    failed = [(r["section"], r["label"], r.get("error")) for r in rows if r["status"] == "failed"]
    assert not failed
    for section in SECTIONS:
        assert any(r["section"] == section and r["status"] == "ok" for r in rows), section
    # the only skipped row may be the 8-bit optimizer's, when bitsandbytes is missing
    assert all(r["label"] == "adam-8bit (every row)" for r in rows if r["status"] == "skipped")
    assert data["header"]["torch"] and data["header"]["torch_note"]
    mb = [r for r in rows if r["section"] == "max-micro-batch"]
    assert mb and all(r["verdict"] in ("exact", "too cautious", "too optimistic") for r in mb)


def test_trace_dry_run(tmp_path):
    """benchmarks/gpu_trace.py (the allocator traces behind tests/data/cuda_allocator) runs its
    rows small on the CPU, without the service's stack; a trace needs CUDA, so none is recorded."""
    out = tmp_path / "trace"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runner = RUNNER.replace("benchmarks.gpu_campaign", "benchmarks.gpu_trace")
    proc = subprocess.run([sys.executable, "-c", runner, "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import gzip
    traces = sorted(out.glob("trace-*.json.gz"))
    assert len(traces) == 6
    for t in traces:
        rec = json.loads(gzip.open(t, "rt").read())
        assert rec["error"] is None and rec["result"], (t.name, rec["error"])
    probe = json.loads((out / "sdpa.json").read_text())
    assert len(probe) == 24 and all("forward" in r for r in probe)
