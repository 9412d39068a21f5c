"""A client generated from openapi/openapi.json drives a live server end to end.

``openapi-python-client`` generates the client into a temporary directory (it is not committed),
``memplan serve`` runs on a free port with a temporary SQLite job store and its embedded worker,
and the generated functions are called as a user of the contract would call them.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tests.jobtargets import terminate

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT / "openapi" / "openapi.json"
TINY = {"family": "gpt2", "num_layers": 1, "hidden_size": 32, "num_heads": 2, "vocab_size": 64}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Generate the client package and import it."""
    out = tmp_path_factory.mktemp("client")
    bin_dir = str(Path(sys.executable).parent)  # its post-generation hook runs `ruff`
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(CONTRACT),
         "--meta", "none", "--output-path", str(out / "memplan_client")],
        cwd=out, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Warning" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    sys.path.insert(0, str(out))
    try:
        pkg = importlib.import_module("memplan_client")
        importlib.import_module("memplan_client.models")  # tests use pkg.models whatever ran first
        yield pkg
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m.split(".")[0] == "memplan_client"]:
            del sys.modules[name]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`memplan serve` (API + embedded worker) on a free port; yields its base URL."""
    tmp = tmp_path_factory.mktemp("server")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEMPLAN_DATABASE_URL": f"sqlite:///{tmp}/j.db",
           "MEMPLAN_WORKER_DEVICE": "cpu:1:16GiB", "MEMPLAN_POLL_S": "0.1"}
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("server did not start:\n" + (tmp / "server.log").read_text())
        time.sleep(0.2)
    yield base
    terminate(proc)
    log.close()


@pytest.fixture(scope="module")
def client(generated, server):
    with generated.Client(base_url=server, raise_on_unexpected_status=True, timeout=60) as c:
        yield c


def api(generated, name: str):
    return importlib.import_module(f"memplan_client.api.{name}")


def test_operation_names_read_well(generated):
    """Modules are the OpenAPI tags, functions the operationIds: verbs on resources."""
    expected = {
        "catalog": {"list_models", "list_gpus"},
        "memory": {"estimate_memory", "compare_zero_stages"},
        "checkpointing": {"plan_checkpointing"},
        "pipeline": {"plan_pipeline"},
        "plan": {"plan_cluster"},
        "validations": {"create_validation", "get_validation", "list_validations",
                        "cancel_validation"},
        "health": {"healthz", "readyz"},
    }
    for tag, operations in expected.items():
        for op in operations:
            module = api(generated, f"{tag}.{op}")
            assert callable(module.sync) and callable(module.sync_detailed), (tag, op)


def test_catalogs(generated, client):
    models = api(generated, "catalog.list_models").sync(client=client)
    gpus = api(generated, "catalog.list_gpus").sync(client=client)
    names = {m.name for m in models}
    assert "gpt2" in names and all(m.num_parameters > 0 for m in models)
    assert gpus and all(g.memory_bytes > 0 for g in gpus)


def test_memory_and_zero(generated, client):
    M = generated.models
    request = M.MemoryRequest.from_dict({"model": {"preset": "gpt2"},
                                         "training": {"precision": "mixed-bf16"},
                                         "hardware": {"gpu": "h100-80gb"}})
    result = api(generated, "memory.estimate_memory").sync(client=client, body=request)
    assert isinstance(result, M.MemoryResult), result
    bd = result.breakdown
    assert bd.total == (bd.parameters + bd.gradients + bd.optimizer_states + bd.activations
                        + bd.temporaries)
    assert result.fit.fits and result.fit.max_micro_batch_size >= 1

    zero = api(generated, "memory.compare_zero_stages").sync(client=client, body=M.MemoryRequest.
                                                              from_dict({"model": {"preset": "gpt2"},
                                                                         "parallelism": {"data_parallel": 8}}))
    assert isinstance(zero, M.ZeroResult), zero
    stages = [s.stage for s in zero.stages]
    assert {0, 1, 2, 3} <= set(stages)
    by_stage = {s.stage: s.breakdown for s in zero.stages if not s.offload_optimizer}
    assert by_stage[3].parameters < by_stage[0].parameters


def test_plan_cluster(generated, client):
    M = generated.models
    request = M.PlanRequest.from_dict({
        "model": {"preset": "gpt2"},
        "training": {"global_batch_sequences": 16, "sequence_length": 1024,
                     "max_micro_batch_size": 2, "train_tokens": 10**9},
        "cluster": {"gpu": "l4-24gb", "num_gpus": 4, "gpus_per_node": 4},
        "constraints": {"top_k": 3}})
    result = api(generated, "plan.plan_cluster").sync(client=client, body=request)
    assert isinstance(result, M.PlanResult), result
    cluster = result.clusters[0]
    assert cluster.num_gpus == 4 and 1 <= len(cluster.layouts) <= 3
    best = cluster.layouts[0]
    assert best.fits and best.tokens_per_s > 0 and best.time_to_train_s > 0
    assert cluster.search.space_size >= cluster.search.evaluated > 0


def test_invalid_input_comes_back_as_a_problem(generated, client):
    M = generated.models
    body = M.MemoryRequest.from_dict({"model": {**TINY, "num_heads": 3}})
    response = api(generated, "memory.estimate_memory").sync_detailed(client=client, body=body)
    assert response.status_code == 422
    problem = response.parsed
    assert isinstance(problem, M.Problem)
    assert problem.status == 422 and problem.detail and problem.type_
    assert problem.invalid_params[0].name == "body.model"


def test_checkpointing(generated, client):
    M = generated.models
    request = M.CheckpointRequest.from_dict({"model": {"preset": "gpt2"}, "strategy": "sqrt"})
    result = api(generated, "checkpointing.plan_checkpointing").sync(client=client, body=request)
    assert isinstance(result, M.CheckpointResult), result
    assert result.to_dict()


def test_pipeline_json_and_svg(generated, client):
    M = generated.models
    module = api(generated, "pipeline.plan_pipeline")
    request = M.PipelineRequest.from_dict({"schedule": "1f1b", "stages": 4, "microbatches": 8})
    result = module.sync(client=client, body=request)
    assert isinstance(result, M.PipelineResult), result
    assert result.stages == 4 and 0 < result.bubble_fraction < 1
    assert len(result.timeline) == 4 * 8 * 2
    # The generated parser reads JSON only: the picture is fetched with the generated request
    # (operation URL, body, Accept header) and read as bytes.
    kwargs = module._get_kwargs(body=request, accept="image/svg+xml")
    r = client.get_httpx_client().request(**kwargs)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("image/svg+xml")
    assert r.text.lstrip().startswith("<svg") or "<svg" in r.text[:200]


def test_validation_job_runs_to_completion(generated, client):
    M = generated.models
    V = "validations."
    request = M.ValidationRequest.from_dict({
        "model": TINY, "training": {"precision": "fp32", "sequence_length": 16},
        "mode": "real", "steps": 2, "device": "cpu"})
    job = api(generated, V + "create_validation").sync(client=client, body=request)
    assert isinstance(job, M.ValidationJob), job
    assert isinstance(job.status, M.ValidationJobStatus)
    get = api(generated, V + "get_validation")
    deadline = time.monotonic() + 120
    while job.status.value in ("queued", "running"):
        assert time.monotonic() < deadline, f"job still {job.status} after 120 s"
        time.sleep(0.25)
        job = get.sync(client=client, job_id=job.id)
    assert job.status == M.ValidationJobStatus.SUCCEEDED, job.error
    result = job.result
    assert result.measured.total > 0 and result.estimate.total > 0
    assert result.relative_error.total is not None

    page = api(generated, V + "list_validations").sync(client=client)
    assert job.id in [j.id for j in page.items]
    # A finished job cannot be cancelled: a documented 409 problem.
    response = api(generated, V + "cancel_validation").sync_detailed(client=client, job_id=job.id)
    assert response.status_code == 409 and isinstance(response.parsed, M.Problem)
