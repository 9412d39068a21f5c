#!/usr/bin/env bash
# The GPU accuracy campaign (benchmarks/gpu_campaign.py) on a machine without pydantic.
#
#   benchmarks/gpu_campaign.sh download        # where a package index is reachable: wheels -> .whl/
#   bash benchmarks/gpu_campaign.sh device [ARGS]   # on the GPU machine, from the repository root
#
# "download" fetches the planner's pure-Python dependencies (pydantic and what it needs, pinned as
# in requirements-dev.txt) as CPython 3.12 manylinux wheels into .whl/ (ignored by git, ~3 MiB).
# "device" installs them into /tmp/site without an index and runs the campaign; ARGS go to the
# script (--quick, --sections ...). Tables land in $OUT (default ./gpu-campaign-out).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  download)
    rm -rf .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl \
      pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
      typing-extensions==4.16.0
    du -sh .whl
    ;;
  device|trace|hf)
    script=benchmarks/gpu_campaign.py
    [ "$1" = trace ] && script=benchmarks/gpu_trace.py
    [ "$1" = hf ] && script=benchmarks/accuracy_hf.py
    shift
    # pip when the image has it; else unpack the wheels (plain zip files, nothing to build)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl \
      || python3 -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('/tmp/site') for w in glob.glob('.whl/*.whl')]"
    export PYTHONPATH="/tmp/site:$PWD"
    exec python3 "$script" "$@"
    ;;
  *)
    echo "usage: $0 download | device [--quick] [--sections a,b] | trace | hf [--device cuda --quick]" >&2
    exit 2
    ;;
esac
