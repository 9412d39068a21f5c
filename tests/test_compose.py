"""docker-compose.yml and Dockerfile: valid Compose, and every name in them exists in memplan.

No Docker engine is needed. The file is checked against the Compose specification's JSON schema
(the one shipped with an installed Compose implementation) and with ``docker compose config`` /
``docker-compose config`` when one of those is installed; the checks of what the file says (env
variables are settings, commands parse, healthchecks hit real routes) always run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.cli import build_parser
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _interpolate(value: str) -> str:
    """${VAR:-default} -> default (what Compose substitutes with VAR unset)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


# The Compose Specification schema (Apache-2.0), kept beside the tests so the check runs
# everywhere, Docker or not.
SCHEMA = Path(__file__).parent / "data" / "compose_spec.json"


def test_file_is_valid_against_the_compose_spec_schema(compose):
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    # The spec's "$schema" names draft 2019-09 (with a trailing '#' jsonschema does not look up).
    validator = jsonschema.Draft201909Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    # The schema is strict enough to catch a wrong file: a misspelt key fails it.
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["helthcheck"] = broken["services"]["api"].pop("healthcheck")
    assert list(validator.iter_errors(broken))


def test_compose_cli_accepts_the_file():
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, text=True)
        if probe.returncode != 0:
            continue
        r = subprocess.run([*cmd, "-f", str(COMPOSE), "config", "-q"], capture_output=True,
                           text=True, cwd=ROOT, timeout=60,
                           env={k: v for k, v in os.environ.items() if not k.startswith("MEMPLAN")})
        assert r.returncode == 0, r.stderr
        return
    pytest.skip("neither `docker compose` nor `docker-compose` is installed")


def test_services_have_healthchecks_and_start_in_order(compose):
    services = compose["services"]
    assert set(services) == {"api", "postgres", "worker"}
    for name, service in services.items():
        test = service["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), name
    assert services["api"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # The API's healthcheck asks /readyz, which checks the database.
    from service.app import create_app

    paths = create_app(Settings()).openapi()["paths"]
    assert "/readyz" in paths and "/metrics" in paths
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])


def test_worker_reserves_gpus(compose):
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)


def test_environment_names_real_settings_and_a_shared_postgres(compose):
    fields = {f"MEMPLAN_{name.upper()}" for name in Settings.model_fields}
    for name in ("api", "worker"):
        env = compose["services"][name]["environment"]
        for key in env:
            if key.startswith("MEMPLAN_"):
                assert key in fields, f"{name}: {key} is not a setting"
        values = {k: _interpolate(str(v)) for k, v in env.items() if k.startswith("MEMPLAN_")}
        settings = Settings.from_env(values)  # the values as Compose passes them are accepted
        assert settings.database_url.startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in settings.database_url
        assert settings.api_tokens == ()  # unset: open, as documented
    pg = compose["services"]["postgres"]["environment"]
    url = _interpolate(compose["services"]["api"]["environment"]["MEMPLAN_DATABASE_URL"])
    assert url.endswith(f"/{pg['POSTGRES_DB']}")
    assert f"//{pg['POSTGRES_USER']}:{_interpolate(pg['POSTGRES_PASSWORD'])}@" in url


def test_commands_are_memplan_commands(compose):
    parser = build_parser()
    for name in ("api", "worker"):
        command = compose["services"][name]["command"]
        assert command[0] == "memplan"
        parser.parse_args(command[1:])  # exits (fails the test) on an unknown option
    api = compose["services"]["api"]
    port = api["command"][api["command"].index("--port") + 1]
    assert api["ports"] == [f"{port}:{port}"]


def test_dockerfile_copies_what_exists_and_runs_memplan():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    copies = [shlex.split(line)[1:-1] for line in lines if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for source in sources:
            if "*" not in source:
                assert (ROOT / source).exists(), source
    for package in ("planner", "service"):
        assert [package] in copies
    (cmd,) = [json.loads(line[4:]) for line in lines if line.startswith("CMD ")]
    assert cmd[0] == "memplan"
    build_parser().parse_args(cmd[1:])
