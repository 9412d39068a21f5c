"""Fixtures shared by the job-store, API and worker tests."""

from __future__ import annotations

import pytest

from tests.jobtargets import database_url

# Every collected test must report a result and have a node id of its own (tests/result_count.py).
pytest_plugins = ["tests.result_count"]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """Every job-store test runs on both backends (PostgreSQL required in CI)."""
    yield from database_url(request.param, tmp_path)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Each Schemathesis operation test gets its own node id, ``test_x[POST /v1/memory]``.

    Schemathesis 4.32 names an operation's item ``test_x[POST /v1/memory]`` but passes
    ``originalname="test_x"``, from which pytest 9.2 builds a Function's node id: every operation
    got the id ``...::test_x``, and pytest-xdist ran one test per id. Ids that already carry the
    operation (other pytest or Schemathesis versions) are left alone.
    """
    for item in items:
        label = getattr(item, "operation_label", None)
        if label and item.name == f"{item.originalname}[{label}]" \
                and item.nodeid == f"{item.parent.nodeid}::{item.originalname}":
            item._id = item.parent.id.child(item.originalname).with_params(label)
