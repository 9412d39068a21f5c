"""tests/result_count.py: a run fails when tests share a node id or a collected test reports nothing.

Each case runs pytest on a small generated test directory, in one process and on two xdist
workers with ``--dist loadfile`` (the test command's scheduling).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Items built the way pytest >= 9.2 names a parametrized Function from ``originalname`` and its
# callspec: "t[a]" and "t[b]" both get the node id of "t", as Schemathesis 4.32's items did.
DUPLICATES = {
    "conftest.py": """
        import pytest

        def pytest_pycollect_makeitem(collector, name, obj):
            if name == "test_labelled":
                return [pytest.Function.from_parent(collector, name=f"{name}[{label}]",
                                                    originalname=name, callobj=obj)
                        for label in ("a", "b")]
    """,
    "test_dup.py": """
        def test_labelled():
            pass

        def test_plain():
            pass
    """,
}

# Every outcome once, and one test whose result is swallowed when DROP is set.
OUTCOMES = {
    "conftest.py": """
        import os
        import pytest

        @pytest.hookimpl(tryfirst=True)
        def pytest_runtest_protocol(item, nextitem):
            if os.environ.get("DROP") and item.name == "test_dropped":
                return True  # ran nothing and reported nothing

        @pytest.fixture
        def broken_setup():
            raise RuntimeError("setup")

        @pytest.fixture
        def broken_teardown():
            yield
            raise RuntimeError("teardown")
    """,
    "test_a.py": """
        import pytest

        def test_passes():
            pass

        def test_fails():
            assert False

        def test_skipped():
            pytest.skip("no")

        @pytest.mark.xfail(strict=False)
        def test_xfailed():
            assert False

        @pytest.mark.xfail(strict=False)
        def test_xpassed():
            pass

        def test_setup_error(broken_setup):
            pass

        def test_teardown_error(broken_teardown):
            pass

        @pytest.mark.parametrize("n", [1, 2])
        def test_param(n):
            pass
    """,
    "test_b.py": """
        def test_dropped():
            pass

        def test_other():
            pass
    """,
}


def run_pytest(tmp_path: Path, files: dict[str, str], workers: str, *args: str,
               **env: str) -> subprocess.CompletedProcess:
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # keep this repository's ini out
    # Only this plugin and xdist: loading every installed plugin takes seconds per run.
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", **env}
    for name in ("PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT"):
        environ.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "xdist",
         "-p", "tests.result_count", "-n", workers, "--dist", "loadfile", *args],
        check=False, cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=120)


WORKERS = pytest.mark.parametrize("workers", ["0", "2"])


@WORKERS
def test_shared_node_ids_stop_the_run(tmp_path, workers):
    r = run_pytest(tmp_path, DUPLICATES, workers)
    out = r.stdout + r.stderr
    assert r.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "1 node id(s) are shared by several collected tests" in out, out
    assert "  test_dup.py::test_labelled" in out, out
    assert "passed" not in out, out  # refused before anything ran


@WORKERS
def test_a_dropped_result_fails_the_run(tmp_path, workers):
    # 11 tests, 1 deselected; of the 10 left, test_dropped reports nothing. The other nine are
    # counted once each, whatever their outcome (a passed test with a failed teardown included).
    r = run_pytest(tmp_path, OUTCOMES, workers, "-k", "not test_other", DROP="1")
    out = r.stdout + r.stderr
    assert r.returncode == pytest.ExitCode.TESTS_FAILED, out
    summary = out.replace(" 1 deselected,", "")  # xdist's controller does not count deselections
    assert "1 failed, 4 passed, 1 skipped, 1 xfailed, 1 xpassed, 2 errors" in summary, out
    assert "10 tests were collected but 9 reported a result" in out, out


def test_a_complete_run_passes_the_count(tmp_path):
    r = run_pytest(tmp_path, OUTCOMES, "0")
    out = r.stdout + r.stderr
    assert r.returncode == pytest.ExitCode.TESTS_FAILED, out  # the failure and errors; not the count
    assert "1 failed, 6 passed, 1 skipped, 1 xfailed, 1 xpassed, 2 errors" in out, out
    assert "reported a result" not in out, out


def test_a_run_stopped_early_is_not_counted(tmp_path):
    r = run_pytest(tmp_path, OUTCOMES, "0", "-x")
    out = r.stdout + r.stderr
    assert r.returncode == pytest.ExitCode.TESTS_FAILED, out
    assert "stopping after 1 failures" in out, out
    assert "reported a result" not in out, out
