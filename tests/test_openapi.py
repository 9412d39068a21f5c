"""The committed contract, openapi/openapi.json, is what the app serves.

Regenerate after changing a route or a model:

    memplan openapi --out openapi/openapi.json
"""

from __future__ import annotations

import json
from pathlib import Path

from service.app import create_app
from service.cli import main
from service.settings import Settings

COMMITTED = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"


def render(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def test_committed_contract_matches_the_app():
    served = render(create_app(Settings(database_url="sqlite://")).openapi())
    assert COMMITTED.read_text() == served, (
        "openapi/openapi.json is stale: run `memplan openapi --out openapi/openapi.json`")


def test_generation_is_deterministic(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["openapi", "--out", str(first)]) == 0
    assert main(["openapi", "--out", str(second)]) == 0
    assert first.read_text() == second.read_text() == COMMITTED.read_text()


def test_every_operation_is_tagged_with_a_unique_readable_id():
    doc = json.loads(COMMITTED.read_text())
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    for item in doc["paths"].values():
        for op in item.values():
            assert op["operationId"].isidentifier() and op["operationId"].islower()
            assert op.get("tags"), op["operationId"]
            assert op.get("description"), op["operationId"]
