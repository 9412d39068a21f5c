"""Capacity planning: sweep cluster sizes, print the fastest layout that fits at each.

    python examples/plan_sweep.py                      # Llama-3-8B on 8..64 H100s
    python examples/plan_sweep.py --preset llama-2-70b --gpu a100-80gb --min-gpus 32 \\
        --max-gpus 256 --global-batch 512 --sequence-length 4096

One POST /v1/plan request (a cluster range) run in process; --url posts it to a running
service instead. For each cluster size: the fastest layout, its per-device peak (POST
/v1/memory's number for that layout), step time, tokens/s, MFU, days to train --train-tokens,
and how large the search was.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def request(args: argparse.Namespace) -> dict:
    return {
        "model": {"preset": args.preset},
        "training": {"global_batch_sequences": args.global_batch,
                     "sequence_length": args.sequence_length,
                     "max_micro_batch_size": args.max_micro_batch,
                     "train_tokens": args.train_tokens},
        "cluster": {"gpu": args.gpu, "min_gpus": args.min_gpus, "max_gpus": args.max_gpus},
        "constraints": {"top_k": 1},
    }


def plan(body: dict, url: str | None) -> dict:
    if url:
        import httpx
        r = httpx.post(f"{url.rstrip('/')}/v1/plan", json=body, timeout=600)
        r.raise_for_status()
        return r.json()
    from planner.catalog.plan_specs import PlanRequest
    from planner.routes.plan_search import plan as search
    return json.loads(search(PlanRequest.model_validate(body)).model_dump_json())


def table(result: dict) -> str:
    head = ["GPUs", "layout", "peak GiB", "step s", "tokens/s", "MFU", "days", "searched",
            "evaluated"]
    rows = []
    for c in result["clusters"]:
        s = c["search"]
        if not c["layouts"]:
            rows.append([str(c["num_gpus"]), "nothing fits", "-", "-", "-", "-", "-",
                         str(s["space_size"]), str(s["evaluated"])])
            continue
        x = c["layouts"][0]
        lay = (f"dp{x['data_parallel']} tp{x['tensor_parallel']} pp{x['pipeline_parallel']}"
               f"{' v' + str(x['virtual_pipeline_stages']) if x['virtual_pipeline_stages'] > 1 else ''}"
               f" z{x['zero_stage']} {x['activation_checkpointing']} "
               f"b{x['micro_batch_size']}x{x['gradient_accumulation_steps']}")
        days = x["time_to_train_s"] / 86400 if x["time_to_train_s"] else float("nan")
        rows.append([str(c["num_gpus"]), lay, f"{x['peak_bytes'] / 2**30:.1f}",
                     f"{x['time']['step_s']:.2f}", f"{x['tokens_per_s']:,.0f}",
                     f"{x['model_flops_utilization']:.1%}", f"{days:,.1f}",
                     str(s["space_size"]), str(s["evaluated"])])
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w[i]) if i == 1 else c.rjust(w[i])  # noqa: E731
                               for i, c in enumerate(r))
    return "\n".join([line(head), "  ".join("-" * n for n in w), *map(line, rows)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--gpu", default="h100-80gb")
    p.add_argument("--min-gpus", type=int, default=8)
    p.add_argument("--max-gpus", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=256, help="sequences per step")
    p.add_argument("--sequence-length", type=int, default=8192)
    p.add_argument("--max-micro-batch", type=int, default=2)
    p.add_argument("--train-tokens", type=int, default=10**12)
    p.add_argument("--url", help="a memplan service to post to (default: in process)")
    args = p.parse_args(argv)
    result = plan(request(args), args.url)
    print(f"{args.preset} on {args.gpu}, {args.global_batch} x {args.sequence_length} tokens "
          f"per step, {args.train_tokens:.3g} tokens to train")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
