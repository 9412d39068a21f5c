"""The serving process's garbage-collector settings (planner/machine/collector.py).

Checked in fresh interpreters (the settings are process-wide): ``tune()`` freezes what is alive
and raises the youngest generation's threshold, leaves a disabled collector's threshold alone,
and ``memplan serve`` applies it once the app is built (uvicorn's run replaced by a probe)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tune_freezes_and_raises_the_young_threshold() -> None:
    got = _run("import gc, json\n"
               "from planner.machine import collector\n"
               "before = gc.get_threshold()\n"
               "collector.tune()\n"
               "print(json.dumps({'before': before, 'after': gc.get_threshold(),\n"
               "                  'frozen': gc.get_freeze_count()}))")
    assert got["after"][0] == max(got["before"][0], 10_000)
    assert got["after"][1:] == got["before"][1:]
    assert got["frozen"] > 0


def test_a_disabled_threshold_stays_disabled() -> None:
    got = _run("import gc, json\n"
               "from planner.machine import collector\n"
               "gc.set_threshold(0)\n"
               "collector.tune()\n"
               "print(json.dumps({'after': gc.get_threshold()}))")
    assert got["after"][0] == 0


def test_serve_tunes_the_collector_after_building_the_app(tmp_path) -> None:
    db = tmp_path / "jobs.db"
    got = _run("import gc, json, uvicorn\n"
               "seen = {}\n"
               "def probe(app, **kw):\n"
               "    seen['threshold'] = gc.get_threshold()[0]\n"
               "    seen['frozen'] = gc.get_freeze_count()\n"
               "uvicorn.run = probe\n"
               "from service.cli import main\n"
               f"main(['serve', '--no-worker', '--database-url', 'sqlite:///{db}'])\n"
               "print(json.dumps(seen))")
    assert got["threshold"] >= 10_000 and got["frozen"] > 0


def test_the_estimate_and_plan_commands_tune_the_collector(tmp_path) -> None:
    for cmd in ("estimate", "plan"):
        got = _run("import gc, json, sys\n"
                   "from service import cli, plan_cli\n"
                   "from planner.routes import memory, plan_search\n"
                   "seen = {}\n"
                   "def probe(*a, **k):\n"
                   "    seen['threshold'] = gc.get_threshold()[0]\n"
                   "    raise SystemExit(0)\n"
                   "memory.estimate_memory = probe\n"
                   "plan_search.plan = probe\n"
                   "cli.load_spec = probe\n"
                   f"try:\n    cli.main(['{cmd}', 'spec.json'])\n"
                   "except SystemExit:\n    pass\n"
                   "print(json.dumps(seen))")
        assert got["threshold"] >= 10_000, cmd


def test_tune_acts_once_per_process() -> None:
    got = _run("import gc, json\n"
               "from planner.machine import collector\n"
               "collector.tune()\n"
               "gc.set_threshold(700, 10, 10)\n"
               "collector.tune()\n"
               "print(json.dumps({'after': gc.get_threshold()}))")
    assert got["after"] == [700, 10, 10]


def test_tune_keeps_large_freed_blocks_on_the_heap() -> None:
    """With glibc (this project's Linux), ``tune()`` sets the C heap too
    (planner/machine/heap.py): arrays of a few megabytes made and dropped in turn (as a large
    request's are) reuse the heap's pages instead of taking fresh ones from the kernel, so they
    take far fewer page faults than in an interpreter left as it is; elsewhere ``tune()`` leaves
    the heap alone."""
    code = ("import json, resource, sys\n"
            "import numpy as np\n"
            "from planner.machine import collector, heap\n"
            "if {tune}: collector.tune()\n"
            "def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "f0 = faults()\n"
            "for _ in range(5):\n"
            "    a = np.ones(3_000_000); b = np.ones(4_000_000); c = a[:2_000_000] + 1\n"
            "    del a; d = np.cumsum(b); del b, c, d\n"
            "print(json.dumps({{'faults': faults() - f0, 'tuned': heap._TUNED[0],\n"
            "                  'linux': sys.platform.startswith('linux')}}))")
    left, tuned = _run(code.format(tune=False)), _run(code.format(tune=True))
    assert left["tuned"] is None  # (not asked)
    if not tuned["linux"]:
        assert tuned["tuned"] is False
        return
    assert tuned["tuned"] is True
    assert tuned["faults"] < left["faults"] / 2  # (measured: about 2,400 against 9,800)
