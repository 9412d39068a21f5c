"""A process that printed its answer exits: no thread of the planner is left running while the
interpreter is torn down.

Two causes were seen making a finished ``memplan estimate`` hang or crash at exit on a loaded
machine: OpenBLAS (numpy's) joining a worker thread that missed its wake-up, and the structure
compile thread still inside numpy during teardown. The planner holds OpenBLAS to one thread and
stops and joins its compile thread at exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from planner.machine import deadline
from planner.machine.deadline import BackgroundLimit, WorkLimitExceeded

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads in /proc")
def test_numpy_has_no_blas_worker_thread_under_the_planner():
    proc = _python("import os, planner, numpy\n"
                   "print(len(os.listdir('/proc/self/task')), os.environ['OPENBLAS_NUM_THREADS'])")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "1"]


def test_a_user_setting_of_the_blas_threads_is_kept():
    proc = _python("import os; os.environ['OPENBLAS_NUM_THREADS'] = '3'\n"
                   "import planner; print(os.environ['OPENBLAS_NUM_THREADS'])")
    assert proc.stdout.strip() == "3", proc.stderr


def test_a_background_compile_stops_at_its_next_check_once_the_process_exits(monkeypatch):
    limit = BackgroundLimit(60.0)
    limit.check()
    monkeypatch.setattr(deadline, "_STOPPING", [True])
    with pytest.raises(WorkLimitExceeded, match="exiting"):
        limit.check()


def test_the_compile_thread_is_stopped_and_joined_at_exit():
    # a CLI estimate that queues several compiles (its suggestions' layouts), then the exit hook
    code = """
import atexit, time
import service.cli as cli
from planner.step import structures
try:
    cli.main(['estimate', '--preset', 'llama-3-8b', '--precision', 'bf16', '--optimizer',
              'adamw', '--micro-batch-size', '4', '--sequence-length', '8192',
              '--checkpointing', 'full', '--gpu', 'h100-80gb'])
except SystemExit as e:
    assert e.code == 3, e.code
thread = structures._THREAD
assert thread is not None and thread.is_alive()
start = time.monotonic()
structures._stop()
print('joined', not thread.is_alive(), round(time.monotonic() - start, 3))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split("joined")[-1].split()
    assert words[0] == "True", proc.stdout + proc.stderr
    assert float(words[1]) < 5.0
