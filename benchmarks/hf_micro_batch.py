"""The cost of ``fit.max_micro_batch_size`` for implementation 'transformers' on full-size models.

Each row runs in a fresh process (cold trace cache, transformers imported first, not timed): the
request without ``hardware`` (its own size traced: three proxies, or the whole model), then the
same request with ``hardware`` (the search, planner/routes/hf_micro_batch.py, traces only the
sizes it adds: the request's is cached). Printed: the search's seconds, the sizes it traced and
its answer; and, for comparison, how many sizes the straightforward exponential + binary search
(planner/routes/micro_batch.py ``largest_fitting_search``) would have traced for the same answer
(counted on the known answer, not run: each of its sizes costs a trace too). The answer's
boundary is checked in the same process: the reported size's peak fits, the next one's does not.

    python -m benchmarks.hf_micro_batch [--out benchmarks/results/hf-micro-batch-cpu.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks.accuracy_hf import TRACED

GPU = "h100-80gb"

_RUN = """
import sys, time, warnings, json
warnings.filterwarnings("ignore")
import transformers  # noqa: F401
from planner.catalog.specs import MemoryRequest
from planner.routes.memory import estimate_memory
from planner.routes.micro_batch import largest_fitting_search
req = MemoryRequest.model_validate_json(sys.argv[1])
t0 = time.perf_counter()
bare = estimate_memory(req.model_copy(update={"hardware": None}), device="cuda")
t1 = time.perf_counter()
res = estimate_memory(req, device="cuda")
t2 = time.perf_counter()
m = res.fit.max_micro_batch_size
a = next(a for a in res.assumptions if a.name == "max_micro_batch_search")
def need(b):
    r = estimate_memory(req.model_copy(update={"hardware": None, "training":
        req.training.model_copy(update={"micro_batch_size": b})}), device="cuda")
    return r.breakdown.total + r.allocator_reserve_bytes
ok = m is None or (need(m) <= res.fit.memory_bytes < need(m + 1))
asked = []
if m is not None:
    largest_fitting_search(lambda b: asked.append(b) or b <= m)
print(json.dumps([bare.breakdown.total, t1 - t0, t2 - t1, m, a.value, a.note.split(";")[0], ok,
                  len(set(asked) - {req.training.micro_batch_size}), res.notes]))
"""


def rows() -> list[str]:
    from planner.catalog.specs import MemoryRequest

    out = [f"| config ({GPU}) | peak GB | own size s | search s | sizes traced | "
           "max_micro_batch_size | boundary checked | exhaustive search would trace |",
           "|---|---:|---:|---:|---|---:|---|---:|"]
    for label, preset, tr in TRACED:
        body = MemoryRequest(model={"preset": preset}, training=tr,
                             hardware={"gpu": GPU}).model_dump_json()
        res = subprocess.run([sys.executable, "-c", _RUN, body], capture_output=True,
                             text=True, check=True)
        peak, first, search, m, value, sizes, ok, exhaustive, notes = json.loads(
            res.stdout.strip().splitlines()[-1])
        out.append(f"| {label} | {peak / 1e9:.1f} | {first:.1f} | {search:.1f} | {value} "
                   f"({sizes.split(': ')[-1]}) | {m} | {'yes' if ok else 'NO'} | "
                   f"{exhaustive if m is not None else 'n/a'} |")
        for n in notes:
            if n.startswith("max_micro_batch_size"):
                out[-1] += f" note: {n}"
        print(out[-1], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    args = ap.parse_args(argv)
    import platform

    import torch
    import transformers

    head = ["# max_micro_batch_size for implementation 'transformers': search cost", "",
            f"torch {torch.__version__}, transformers {transformers.__version__}, Python "
            f"{platform.python_version()}, {platform.machine()}; estimates for CUDA (5% "
            "allocator reserve), traced on the CPU; seconds of wall time on a shared 2-core "
            "machine; 'own size s': the request without hardware, cold; 'search s': the same "
            "request with hardware afterwards (the added sizes only). Before this search the "
            "answer had no max_micro_batch_size for implementation 'transformers'.", ""]
    table = rows()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(head + table) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
