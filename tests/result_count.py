"""Every collected test reports a result, and no two tests share a node id (a pytest plugin).

pytest-xdist schedules tests and matches their results by node id: two tests with the same id run
as one and the other is silently dropped, and a result that never comes back leaves the run short
without failing it. This plugin makes both fail the run:

- at collection, node ids that occur more than once stop the run, naming them (in one process,
  and on the xdist controller from the ids a worker collected);
- at the end, the number of tests that reported an outcome (passed, failed, skipped, xfailed,
  xpassed or error; each test once) must equal the number collected, or the exit status is 1.

The count is not checked when the run stopped early (``-x``, ``--maxfail``, an interruption).
Registered by ``tests/conftest.py``; ``-p tests.result_count`` loads it elsewhere.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import pytest

_SHOWN = 20  # ids named in a message at most


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def duplicate_ids(nodeids: Iterable[str]) -> list[str]:
    """The node ids that occur more than once, in collection order."""
    return [nodeid for nodeid, n in Counter(nodeids).items() if n > 1]


def _fail_on_duplicates(nodeids: Sequence[str]) -> None:
    dups = duplicate_ids(nodeids)
    if not dups:
        return
    named = "\n  ".join(dups[:_SHOWN]) + ("\n  ..." if len(dups) > _SHOWN else "")
    pytest.exit(f"{len(dups)} node id(s) are shared by several collected tests; only one test of "
                f"each would run under pytest-xdist, so the collection is refused:\n  {named}",
                returncode=pytest.ExitCode.INTERRUPTED)


class ResultCount:
    def __init__(self) -> None:
        self.reported: set[str] = set()
        self.message: str | None = None

    # ---- collection ----------------------------------------------------------------------------
    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if not _is_xdist_worker(session.config):  # a worker's ids are checked by the controller
            _fail_on_duplicates([item.nodeid for item in session.items])

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids: Sequence[str]) -> None:
        _fail_on_duplicates(ids)

    # ---- results -------------------------------------------------------------------------------
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # A test's outcome is its call, or a setup that did not pass (error or skip); a failed
        # teardown after a passed call is an error of a test already counted. xdist's report for
        # the test a crashed worker was running is a failure too.
        if report.when == "call" or not report.passed:
            self.reported.add(report.nodeid)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        config = session.config
        if _is_xdist_worker(config) or config.option.collectonly:
            return
        if exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
            return
        if session.shouldfail or session.shouldstop:
            return
        collected = session.testscollected  # after deselection; on the controller, as sent
        if len(self.reported) == collected:
            return
        self.message = (f"{collected} tests were collected but {len(self.reported)} reported a "
                        f"result; every collected test must report exactly one")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.message:
            terminalreporter.write_sep("=", "result count", red=True, bold=True)
            terminalreporter.write_line(self.message, red=True)


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("memplan-result-count"):
        config.pluginmanager.register(ResultCount(), "memplan-result-count")
