"""Estimates answered on the event loop (service/estimates.py): a setup whose estimate made no
replay and little CPU on a worker thread is answered inline afterwards, equal to the byte to the
full op-by-op replay; an inline estimate that reaches a replay moves to a thread under the real
limits; the estimate slots bound inline estimates too."""

from __future__ import annotations

import json
import random
import tempfile
import threading
import time

import anyio
import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient

from planner.routes import memory as pm
from planner.step import simulate as step_cache
from planner.machine.deadline import check
from planner.catalog.specs import MemoryRequest
from service import estimates
from service.app import create_app
from service.estimates import EstimateSlots, run_estimate, setup_key
from service.security import hash_token
from service.settings import Settings


def _client(**settings) -> TestClient:
    tmp = tempfile.mkdtemp(prefix="memplan-fast-")
    return TestClient(create_app(Settings(database_url=f"sqlite:///{tmp}/jobs.db", **settings)),
                      raise_server_exceptions=False)


@pytest.fixture
def thread_runs(monkeypatch) -> list[int]:
    """Counts the estimates handed to a worker thread."""
    runs: list[int] = []
    real = estimates.anyio.to_thread.run_sync

    async def counted(*args, **kwargs):
        runs.append(1)
        return await real(*args, **kwargs)

    monkeypatch.setattr(estimates.anyio.to_thread, "run_sync", counted)
    return runs


def _body(setup: dict, b: int, t: int) -> dict:
    return {**setup, "training": {**setup["training"], "micro_batch_size": b,
                                  "sequence_length": t}}


def _replayed(body: dict) -> bytes:
    """The oracle: the estimate from the full op-by-op replay, serialised."""
    with step_cache.replay_only():
        return pm.estimate_memory(MemoryRequest.model_validate(body)).model_dump_json().encode()


SETUPS = [{"model": {"family": "llama", "num_layers": 3, "hidden_size": 64, "num_heads": 4,
                     "vocab_size": 256},
           "training": {"precision": precision, "optimizer": optimizer,
                        "activation_checkpointing": {"strategy": ckpt}}}
          for precision in ("fp32", "amp-bf16", "mixed-bf16")
          for optimizer in ("adamw", "sgd")
          for ckpt in ("none", "full")]


def test_a_known_setup_is_answered_inline_equal_to_the_replay(thread_runs) -> None:
    rng = random.Random(20261203)
    pm.clear_caches()
    with _client() as client:
        slots = client.app.state.estimates
        for setup in rng.sample(SETUPS, 4):
            # first size: replayed; second: the template is compiled; third: a template
            # evaluation on a thread, which marks the setup fast
            for b, t in ((2, 32), (3, 48), (4, 40)):
                assert client.post("/v1/memory", json=_body(setup, b, t)).status_code == 200
            key = setup_key("memory", MemoryRequest.model_validate(_body(setup, 5, 50)))
            assert key in slots.fast
            # new sizes: inline, except where a note's variant of the setup is replayed (the
            # inline attempt stops at the replay's first check and a thread answers)
            sizes = [(rng.randint(2, 64), rng.randint(2, 512)) for _ in range(6)]
            before = len(thread_runs)
            answers = [client.post("/v1/memory", json=_body(setup, b, t)) for b, t in sizes]
            assert len(thread_runs) - before < len(sizes)
            for r, (b, t) in zip(answers, sizes):
                assert r.status_code == 200, r.text
                assert r.content == _replayed(_body(setup, b, t)), (setup, b, t)
            # every one of them again, now all known: all inline, the same bytes
            client.post("/v1/memory", json=_body(setup, *sizes[0]))
            assert key in slots.fast
            before = len(thread_runs)
            again = [client.post("/v1/memory", json=_body(setup, b, t)) for b, t in sizes]
            assert len(thread_runs) == before
            assert [r.content for r in again] == [r.content for r in answers]
            assert slots.limiter.borrowed_tokens == 0


def test_an_inline_estimate_that_needs_a_replay_moves_to_a_thread(thread_runs) -> None:
    setup = SETUPS[0]
    pm.clear_caches()
    with _client() as client:
        slots = client.app.state.estimates
        for b in (2, 3, 4):
            client.post("/v1/memory", json=_body(setup, b, 32))
        key = setup_key("memory", MemoryRequest.model_validate(_body(setup, 6, 32)))
        assert key in slots.fast
        pm.clear_caches()  # the template is gone: the next estimate replays
        before = len(thread_runs)
        r = client.post("/v1/memory", json=_body(setup, 6, 32))
        assert r.status_code == 200, r.text
        assert len(thread_runs) == before + 1 and key not in slots.fast
        assert r.content == _replayed(_body(setup, 6, 32))


class _Request:
    """What run_estimate reads of a request: the app's slots, and a client that stays."""

    def __init__(self, slots: EstimateSlots) -> None:
        self.app = type("App", (), {"state": type("State", (), {"estimates": slots})()})()

    async def is_disconnected(self) -> bool:
        return False


def test_a_replay_reached_inline_runs_under_the_work_limit_on_a_thread() -> None:
    slots = EstimateSlots(max_concurrent=1, queue_s=1.0, deadline_s=0.05)
    slots.mark_fast("setup")
    loop_thread = threading.get_ident()
    entered: list[int] = []

    def replays_forever() -> None:
        entered.append(threading.get_ident())
        while True:
            check()
            time.sleep(0.001)

    async def main() -> None:
        with pytest.raises(HTTPException) as info:
            await run_estimate(_Request(slots), replays_forever, "setup")  # type: ignore[arg-type]
        assert info.value.status_code == 503 and "work limit" in info.value.detail

    anyio.run(main)
    # stopped at its first check on the event loop, then run (and stopped) on a worker thread
    assert entered[0] == loop_thread and len(entered) == 2 and entered[1] != loop_thread
    assert "setup" not in slots.fast and slots.limiter.borrowed_tokens == 0


def test_marks_follow_the_cpu_an_estimate_takes() -> None:
    slots = EstimateSlots(max_concurrent=2, queue_s=1.0, deadline_s=10.0)
    where: list[int] = []

    def quick() -> int:
        where.append(threading.get_ident())
        return 7

    def busy() -> int:
        where.append(threading.get_ident())
        end = time.thread_time() + 5 * estimates.INLINE_CPU_S
        while time.thread_time() < end:
            pass
        return 8

    async def main() -> None:
        req = _Request(slots)
        assert await run_estimate(req, quick, "quick") == 7  # type: ignore[arg-type]
        assert "quick" in slots.fast and where[-1] != threading.get_ident()  # thread, marked
        assert await run_estimate(req, quick, "quick") == 7  # type: ignore[arg-type]
        assert where[-1] == threading.get_ident()  # inline
        assert await run_estimate(req, busy, "busy") == 8  # type: ignore[arg-type]
        assert "busy" not in slots.fast  # too much CPU to be marked
        slots.mark_fast("busy")
        assert await run_estimate(req, busy, "busy") == 8  # type: ignore[arg-type]
        assert where[-1] == threading.get_ident() and "busy" not in slots.fast  # unmarked
        assert await run_estimate(req, quick, None) == 7  # type: ignore[arg-type]
        assert where[-1] != threading.get_ident()  # no setup named: always a thread

    anyio.run(main)
    assert slots.limiter.borrowed_tokens == 0


def test_busy_slots_hold_back_a_fast_setup_too() -> None:
    setup = SETUPS[1]
    with _client(max_concurrent_estimates=1, estimate_queue_s=0.05) as client:
        for b in (2, 3, 4):
            client.post("/v1/memory", json=_body(setup, b, 32))
        assert setup_key("memory", MemoryRequest.model_validate(_body(setup, 5, 32))) \
            in client.app.state.estimates.fast
        limiter = client.app.state.estimates.limiter
        client.portal.call(limiter.acquire_on_behalf_of, "a running estimate")
        try:
            r = client.post("/v1/memory", json=_body(setup, 5, 32))
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert client.get("/healthz").status_code == 200
        finally:
            client.portal.call(limiter.release_on_behalf_of, "a running estimate")
        assert client.post("/v1/memory", json=_body(setup, 5, 32)).status_code == 200


def test_a_setup_key_leaves_out_the_sizes_and_nothing_else() -> None:
    def key(training: dict) -> object:
        return setup_key("memory", MemoryRequest.model_validate(
            {"model": {"preset": "gpt2"}, "training": training}))

    base = {"micro_batch_size": 4, "sequence_length": 512}
    assert key(base) == key({"micro_batch_size": 9, "sequence_length": 100})
    assert key(base) != key({**base, "micro_batch_size": 1})  # a size domain of its own
    assert key(base) != key({**base, "precision": "fp32"})
    listed = {**base, "activation_checkpointing": {"strategy": "blocks", "blocks": [1, 2]}}
    hash(key(listed))  # a list inside: keyed by JSON
    assert key(listed) == key({**listed, "sequence_length": 64})
    assert key(listed) != key({**listed, "activation_checkpointing": {"strategy": "blocks",
                                                                      "blocks": [1, 3]}})


# ---- the fast lane (service/estimates.py: EstimateFastLane) ------------------------------------
def _warm(client: TestClient, setup: dict, headers: dict | None = None) -> None:
    for b in (2, 3, 4):  # replayed, compiled, then marked
        r = client.post("/v1/memory", json=_body(setup, b, 32), headers=headers or {})
        assert r.status_code == 200, r.text
    # marking takes an answer within INLINE_CPU_S of thread CPU: on a loaded machine one may
    # take longer (the cache-cold first evaluation), so ask again, a bounded number of times
    key = setup_key("memory", MemoryRequest.model_validate(_body(setup, 4, 32)))
    for _ in range(20):
        if key in client.app.state.estimates.fast:
            break
        client.post("/v1/memory", json=_body(setup, 4, 32), headers=headers or {})


def _count(client: TestClient, status: str) -> int:
    prefix = ('memplan_http_request_duration_seconds_count{method="POST",route="/v1/memory",'
              f'status="{status}"}} ')
    lines = [x for x in client.get("/metrics").text.splitlines() if x.startswith(prefix)]
    return int(lines[0][len(prefix):]) if lines else 0


def test_the_fast_lane_answers_as_the_route_does(thread_runs) -> None:
    setup = SETUPS[2]
    with _client() as client, _client() as fresh:
        _warm(client, setup)
        before, runs = _count(client, "200"), len(thread_runs)
        lane = client.post("/v1/memory", json=_body(setup, 6, 40))
        assert len(thread_runs) == runs  # answered inline
        route = fresh.post("/v1/memory", json=_body(setup, 6, 40))  # no marks: a thread
        assert len(thread_runs) == runs + 1
        assert lane.status_code == route.status_code == 200
        assert lane.content == route.content == _replayed(_body(setup, 6, 40))
        lane_headers = {k: v for k, v in lane.headers.items() if k != "x-request-id"}
        assert lane_headers == {k: v for k, v in route.headers.items() if k != "x-request-id"}
        assert lane.headers["x-request-id"]
        # measured under the route's template
        assert _count(client, "200") == before + 1 + 1  # this answer and the fresh app's


def test_the_fast_lane_answers_zero_as_the_route_does() -> None:
    body = _body(SETUPS[3], 4, 32)
    with _client() as client:
        route = client.post("/v1/zero", json=body)
        client.app.state.estimates.mark_fast(setup_key("zero", MemoryRequest.model_validate(body)))
        lane = client.post("/v1/zero", json=body)
        assert lane.status_code == route.status_code == 200
        assert lane.content == route.content


def test_the_lane_validates_to_the_model_the_route_validates() -> None:
    """Parts a body leaves out whose defaults a factory builds are the lane's one instance of
    each, flat parts asked before the instance validated then (Lane.validate): the model is
    equal, dumps to the same JSON and gets the same answer as the route's model_validate of the
    same body."""
    lane = estimates.Lane("/v1/memory", MemoryRequest, lambda r: r, "memory")
    bodies = [{"model": {"preset": "gpt2"}},
              {"model": {"preset": "gpt2"}, "training": {"micro_batch_size": 3}},
              {"model": {"preset": "gpt2"}, "training": {"loss": {"kind": "chunked"}},
               "parallelism": {"data_parallel": 2}, "hardware": {"gpu": "h100-80gb"}},
              {"model": {"preset": "gpt2"}, "training": {
                  "activation_checkpointing": {"strategy": "every-k", "every_k": 2}}},
              {"model": {"preset": "gpt2"}, "parallelism": {}, "training": {}},
              {"model": {"preset": "gpt2", "num_layers": None}, "parallelism": {
                  "data_parallel": True}},  # (a boolean is not the integer it equals)
              *(_body(setup, b, 32) for setup in SETUPS for b in (2, 3))]
    defaults = {name: shared.default for name, shared in lane.defaults.items()}
    in_training = {name: shared.default for name, shared in
                   lane.defaults["training"].nested.items()}
    first_seen: dict[str, object] = {}
    for body in bodies:
        try:
            plain = MemoryRequest.model_validate(body)
        except ValueError:
            with pytest.raises(ValueError):
                lane.validate(json.loads(json.dumps(body)))
            continue
        shared = lane.validate(json.loads(json.dumps(body)))
        assert shared == plain
        assert shared.model_dump_json(by_alias=True) == plain.model_dump_json(by_alias=True)
        assert pm.estimate_memory(shared) == pm.estimate_memory(plain)
        if "parallelism" not in body:
            assert shared.parallelism is defaults["parallelism"]
        if "training" in body and "loss" not in body["training"]:
            assert shared.training.loss is in_training["loss"]
        model = first_seen.setdefault(json.dumps(body["model"]), shared.model)
        assert shared.model is model  # one instance for one part
    assert len({id(m) for m in first_seen.values()}) == len(first_seen)
    with pytest.raises(ValueError):  # a refusal is the model's own
        lane.validate({"model": {"preset": "gpt2"}, "training": {"micro_batch_size": 0}})


_REFUSALS = [
    ((b'{"model": {"family": "llama", "num_layers": 3, "hidden_size": 64, "num_heads": 4, '
      b'"vocab_size": 256}, "training": {"precision": "fp32", "micro_batch_size": 2, '
      b'"micro_batch_size": 3, "sequence_length": 32}}'), "application/json"),  # duplicate key
    (json.dumps(_body(SETUPS[0], 0, 32)).encode(), "application/json"),  # out of range
    (json.dumps({**_body(SETUPS[0], 2, 32), "model": {"preset": "no-such-model"}}).encode(),
     "application/json"),
    (json.dumps(_body(SETUPS[0], 2, 32)).encode(), "text/plain"),
    (b"", "application/json"),
    (b'{"model": ', "application/json"),
    (json.dumps(_body(SETUPS[0], 2, 32)).encode()[:-1] + b', "extra": 1}', "application/json"),
]


@pytest.mark.parametrize("content,ctype", _REFUSALS)
def test_the_fast_lane_leaves_every_other_request_to_the_route(content, ctype) -> None:
    with _client() as client, _client() as fresh:
        _warm(client, SETUPS[0])
        assert setup_key("memory", MemoryRequest.model_validate(_body(SETUPS[0], 5, 32))) \
            in client.app.state.estimates.fast
        lane = client.post("/v1/memory", content=content, headers={"content-type": ctype})
        route = fresh.post("/v1/memory", content=content, headers={"content-type": ctype})
        assert lane.status_code == route.status_code, (lane.text, route.text)
        assert lane.content == route.content
        assert lane.headers["content-type"] == route.headers["content-type"]


def test_protected_estimate_routes_still_want_a_token() -> None:
    with _client(protect_estimates=True, api_tokens=(hash_token("secret"),)) as client:
        auth = {"authorization": "Bearer secret"}
        _warm(client, SETUPS[1], auth)
        assert client.post("/v1/memory", json=_body(SETUPS[1], 5, 32)).status_code == 401
        assert client.post("/v1/memory", json=_body(SETUPS[1], 5, 32),
                           headers=auth).status_code == 200
