"""Fixtures shared by the job-store, API and worker tests."""

from __future__ import annotations

import pytest

from tests.jobtargets import database_url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """Every job-store test runs on both backends (PostgreSQL required in CI)."""
    yield from database_url(request.param, tmp_path)
