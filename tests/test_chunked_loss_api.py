"""The loss option through the API and the CLI: where a chunked loss is replayed it is
estimated (and the response says which loss), elsewhere a 422 names training.loss.kind.
The figures themselves are held to measurement by tests/test_chunked_loss.py and
tests/test_chunked_loss_ranks.py."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.cli import main

# vocab 4096 on h=64: the loss head dominates, as for Llama 3 (vocab 128,256 on h=4,096)
MODEL = {"family": "llama", "num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2,
         "ffn_hidden_size": 160, "vocab_size": 4096, "max_sequence_length": 256}


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app()) as c:
        yield c


def body(loss: dict | None = None, parallelism: dict | None = None, **training) -> dict:
    tr = {"precision": "bf16", "optimizer": "adamw", "micro_batch_size": 4,
          "sequence_length": 256, "activation_checkpointing": {"strategy": "full"}, **training}
    if loss is not None:
        tr["loss"] = loss
    return {"model": MODEL, "training": tr, "parallelism": parallelism or {}}


def test_each_loss_is_estimated_and_named(client):
    out = {}
    for loss in ({"kind": "standard"}, {"kind": "chunked", "chunks": 8},
                 {"kind": "chunked-linear", "chunks": 8}):
        r = client.post("/v1/memory", json=body(loss))
        assert r.status_code == 200, r.text
        res = r.json()
        named = {a["name"]: a["value"] for a in res["assumptions"]}
        assert named["loss"] == (loss["kind"] if loss["kind"] == "standard"
                                 else f"{loss['kind']}, 8 chunks")
        out[loss["kind"]] = res["activation_peak_bytes"]
    # the default is the standard loss
    assert client.post("/v1/memory", json=body()).json()["activation_peak_bytes"] == out["standard"]
    # what each loss keeps to backward: the logits in two dtypes, then one, then none
    assert out["chunked-linear"] < out["chunked"] < out["standard"]


@pytest.mark.parametrize("extra,parallelism", [
    ({"implementation": "megatron"}, None),
    ({}, {"tensor_parallel": 2}),
    ({}, {"pipeline_parallel": 2}),
    ({}, {"data_parallel": 2, "zero_stage": 3, "offload_parameters": True,
          "offload_optimizer": True}),
])
def test_layouts_not_replayed_are_refused(client, extra, parallelism):
    r = client.post("/v1/memory", json=body({"kind": "chunked", "chunks": 4}, parallelism, **extra))
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["invalid-params"][0]["name"] == "body.training.loss.kind"
    # the standard loss is estimated there as before
    r = client.post("/v1/memory", json=body(None, parallelism, **extra))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("loss,field", [({"kind": "chunked", "chunks": 0}, "chunks"),
                                        ({"kind": "chunked", "chunks": 4097}, "chunks"),
                                        ({"kind": "fused"}, "kind"),
                                        ({"kind": "chunked", "size": 3}, "size")])
def test_bad_loss_fields_are_422(client, loss, field):
    r = client.post("/v1/memory", json=body(loss))
    assert r.status_code == 422
    assert any(p["name"].endswith(f"training.loss.{field}") for p in r.json()["invalid-params"])


def test_zero_route_replays_the_stages_and_leaves_out_offload(client):
    r = client.post("/v1/zero", json=body({"kind": "chunked-linear", "chunks": 4},
                                          {"data_parallel": 4}))
    assert r.status_code == 200, r.text
    res = r.json()
    assert [s["stage"] for s in res["stages"]] == [0, 1, 2, 3]
    assert not any(s["offload_optimizer"] for s in res["stages"])
    assert any("offload variants are left out" in n for n in res["notes"])
    std = client.post("/v1/zero", json=body(None, {"data_parallel": 4})).json()
    assert len(std["stages"]) == 6
    for a, b in zip(res["stages"], std["stages"]):  # the chunked loss's saving on every stage
        assert a["breakdown"]["total"] < b["breakdown"]["total"]


def test_validation_refuses_what_the_estimate_refuses(client):
    r = client.post("/v1/validations", json={**body({"kind": "chunked"}, {"tensor_parallel": 2}),
                                             "steps": 2, "device": "cpu"})
    assert r.status_code == 422, r.text
    assert r.json()["invalid-params"][0]["name"] == "body.training.loss.kind"


def test_cli_loss_flags(capsys, tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"model": MODEL, "training": body()["training"]}))
    assert main(["estimate", str(path), "--json"]) == 0
    std = json.loads(capsys.readouterr().out)
    assert main(["estimate", str(path), "--json", "--loss", "chunked-linear",
                 "--loss-chunks", "16"]) == 0
    lin = json.loads(capsys.readouterr().out)
    assert {a["name"]: a["value"] for a in lin["assumptions"]}["loss"] == "chunked-linear, 16 chunks"
    assert lin["activation_peak_bytes"] < std["activation_peak_bytes"]
    assert main(["estimate", str(path), "--loss", "chunked", "--tensor-parallel", "2"]) == 2
    assert "loss kind 'chunked'" in capsys.readouterr().err


def test_what_fits_offers_the_chunked_loss(client):
    """Llama-3-8B, 4 x 8192 tokens, full checkpointing on an H100 80GB: the standard loss's peak
    (in the loss's backward) does not fit; the note names the chunked-linear loss, whose estimate
    (the same replay as a request with it) fits."""
    setup = {"model": {"preset": "llama-3-8b"},
             "training": {"precision": "bf16", "optimizer": "adamw", "micro_batch_size": 4,
                          "sequence_length": 8192,
                          "activation_checkpointing": {"strategy": "full"}},
             "hardware": {"gpu": "h100-80gb"}}
    std = client.post("/v1/memory", json=setup).json()
    assert not std["fit"]["fits"] and std["peak_phase"].startswith("backward")
    lin = client.post("/v1/memory", json={**setup, "training": {
        **setup["training"], "loss": {"kind": "chunked-linear", "chunks": 8}}}).json()
    assert lin["fit"]["fits"]
    fits = next(n for n in std["notes"] if n.startswith("fits instead"))
    gib = f"{lin['breakdown']['total'] / 2**30:.2f} GiB"
    assert f"loss 'chunked-linear' (8 chunks: head and cross-entropy recomputed per chunk in " \
           f"backward): peak {gib}" in fits
