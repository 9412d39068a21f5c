"""The contract fuzz at benchmark length: tests/test_contract_schemathesis.py with more examples
per operation and deeper generated models than the test suite uses.

    python benchmarks/contract_fuzz.py [--examples 2000] [--max-layers 64] [-- PYTEST ARGS]

Prints pytest's per-operation durations; exits with pytest's status (0: the contract held).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000,
                        help="generated requests per operation (the suite uses 200)")
    parser.add_argument("--max-layers", type=int, default=64,
                        help="largest num_layers of the steered model specifications (suite: 8)")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest after '--'")
    args = parser.parse_args(argv)
    env = {**os.environ, "MEMPLAN_FUZZ_EXAMPLES": str(args.examples),
           "MEMPLAN_FUZZ_MAX_LAYERS": str(args.max_layers)}
    cmd = [sys.executable, "-m", "pytest", "tests/test_contract_schemathesis.py", "-v",
           "-p", "no:cacheprovider", "--durations=0", "-k", "holds_the_contract",
           *args.pytest_args]
    print(f"{args.examples} examples per operation, models up to {args.max_layers} layers",
          flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
