"""Launching a rank program under torchrun for a validation job.

The ranks run in a new process group (``start_new_session``) so that a timeout, a cancelled job or
a dying worker kills every rank with one signal; each rank program reads the request from a JSON
file, reports its step in a progress file and rank 0 writes the gathered result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from planner.catalog.specs import ValidationRequest
from planner.catalog.validation_specs import Progress

ROOT = Path(__file__).resolve().parents[2]


def torchrun(module: str, nproc: int, req: ValidationRequest, timeout_s: float,
             args: Callable[[Path, Path], list[str]], total_steps: int,
             progress: Callable[[Progress], None] | None = None, what: str = "ranks") -> Any:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m MODULE ARGS``;
    ``args(spec_path, out_path)`` gives the module's arguments. Returns the parsed output file."""
    with tempfile.TemporaryDirectory(prefix="memplan-ranks-") as tmp:
        spec, out, prog = Path(tmp, "spec.json"), Path(tmp, "out.json"), Path(tmp, "progress.json")
        spec.write_text(req.model_dump_json())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), "-m", module, *args(spec, out)]
        env = {**os.environ, "MEMPLAN_PROGRESS": str(prog),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        env.setdefault("OMP_NUM_THREADS", "1")
        with open(Path(tmp, "log.txt"), "w+") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            deadline = time.monotonic() + timeout_s
            last = 0
            try:
                while proc.poll() is None:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the {nproc} {what} did not finish within {timeout_s:g} s")
                    if progress is not None and prog.exists():
                        try:
                            step = json.loads(prog.read_text())["step"]
                        except (ValueError, KeyError):
                            step = last
                        if step != last:
                            last = step
                            progress(Progress(phase="running", step=step, total_steps=total_steps))
                    time.sleep(0.1)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            if proc.returncode != 0 or not out.exists():
                log.seek(0)
                tail = log.read()[-3000:]
                raise RuntimeError(f"torchrun with {nproc} {what} exited with code "
                                   f"{proc.returncode}: {tail}")
        return json.loads(out.read_text())
