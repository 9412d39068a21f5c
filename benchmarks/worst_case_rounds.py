"""One request of ``benchmarks/worst_case.py`` timed in interleaved rounds across code trees.

On a shared machine single runs move by up to 2x, so a before/after figure is the median of
rounds that alternate between the trees: each round runs the request once per tree, each run in
a fresh process (cold caches) through the ASGI app, exactly as ``benchmarks/worst_case.py``
measures it (``measure``: wall time of the request, peak RSS over the parent's). A tree is a
checkout or an export of the repository (``git archive <commit> | tar -x -C DIR``); the default
is this one.

    python -m benchmarks.worst_case_rounds --tree /tmp/before --tree . --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import json, logging, resource, tempfile, warnings
logging.disable(logging.CRITICAL); warnings.simplefilter("ignore")
from fastapi.testclient import TestClient  # noqa: F401
from benchmarks.worst_case import hand_picked, measure
from service.app import create_app
from service.settings import Settings
label, limit = {label!r}, {limit!r}
tmp = tempfile.TemporaryDirectory(prefix="memplan-rounds-")
app = create_app(Settings(database_url=f"sqlite:///{{tmp.name}}/jobs.db",
                          estimate_deadline_s=10 * limit))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cand = next(c for c in hand_picked() if c[0] == label)
print(json.dumps(measure(app, *cand, limit_s=limit, base_rss_kib=base)))
"""


def run_once(tree: Path, label: str, limit_s: float) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD.format(label=label, limit=limit_s)],
                         cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="memory 128 layers pp 16 m 128",
                    help="a hand-picked label of benchmarks/worst_case.py")
    ap.add_argument("--tree", action="append", help="a code tree (repeat; default: this one)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--limit-s", type=float, default=60.0)
    args = ap.parse_args(argv)
    trees = [Path(t).resolve() for t in (args.tree or [str(ROOT)])]
    runs: dict[Path, list[dict]] = {t: [] for t in trees}
    for i in range(args.rounds):
        for t in trees:
            row = run_once(t, args.case, args.limit_s)
            runs[t].append(row)
            print(f"round {i + 1}  {t}: {row['seconds']:.3f} s  {row['rss_mib']:.1f} MiB  "
                  f"{row['status']}", flush=True)
    for t in trees:
        secs = [r["seconds"] for r in runs[t] if r["seconds"] is not None]
        rss = [r["rss_mib"] for r in runs[t]]
        print(f"{t}: median {statistics.median(secs):.3f} s over {len(secs)} runs "
              f"({', '.join(f'{s:.2f}' for s in secs)}), median RSS {statistics.median(rss):.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
