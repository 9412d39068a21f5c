"""The web page at / in a real headless Chromium (Debian's, under Playwright) against a real
server (SQLite job store, embedded worker): the numbers it draws are the API's answer to the same
request (the Plan view's layouts, front and rejected counts are POST /v1/plan's; the suggestions
shown for a setup that does not fit are POST /v1/memory's), an invalid field shows the API's own
message next to that field, a link reproduces the page, and a validation job is submitted and
followed to its result. A model given as a Hugging Face config.json (a file read by the page, or
pasted JSON) is estimated and validated with implementation 'transformers' and travels in the
link; a refused config shows the API's message next to it, text that is not JSON the page's own.

Outside CI these tests are skipped when chromium or Playwright is missing (scripts/setup.sh
installs both); in CI they fail instead."""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from tests.webpage import ROOT, chromium, require_browser, server

CATEGORIES = ["parameters", "gradients", "optimizer_states", "activations", "temporaries", "total"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    require_browser()
    with server(tmp_path_factory.mktemp("web")) as url:
        yield url


@pytest.fixture(scope="module")
def browser(base):
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser):
    p = browser.new_page(viewport={"width": 1366, "height": 768})
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    yield p
    p.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def _ready(page, view: str) -> None:
    page.wait_for_function(f"document.body.dataset.ready === '{view}' && "
                           "!document.body.hasAttribute('aria-busy')", timeout=60_000)


def _request_in_url(page) -> dict:
    return json.loads(parse_qs(urlsplit(page.url).fragment)["req"][0])


def _digits(text: str) -> int:
    return int(re.sub(r"[^0-9-]", "", text))


def _cells(page, view: str) -> dict[str, tuple[int, int]]:
    """data-field -> (data-value, the exact figure shown) for every number cell of a view."""
    out = {}
    for cell in page.locator(f"#panel-{view} td[data-value]").all():
        out[cell.get_attribute("data-field")] = (int(cell.get_attribute("data-value")),
                                                 _digits(cell.locator(".exact").inner_text()))
    return out


def test_breakdown_draws_the_apis_numbers_and_a_link_reproduces_it(base, browser, page):
    page.goto(base)
    _ready(page, "breakdown")
    page.fill("#f-model-preset", "gpt2-large")
    page.select_option("#f-training-precision", "mixed-bf16")
    page.fill("#f-training-micro_batch_size", "6")
    page.fill("#f-training-sequence_length", "512")
    page.fill("#f-hardware-gpu", "h100-80gb")
    page.click("#estimate")
    page.wait_for_function("location.hash.includes('gpt2-large')")
    _ready(page, "breakdown")
    request = _request_in_url(page)
    assert request == {"model": {"preset": "gpt2-large"},
                       "training": {"precision": "mixed-bf16", "micro_batch_size": 6,
                                    "sequence_length": 512},
                       "hardware": {"gpu": "h100-80gb"}}
    answer = httpx.post(f"{base}/v1/memory", json=request).json()
    expected = {f"{k}.{c}": answer[k][c] for k in ("breakdown", "forward_backward_peak", "first_step")
                for c in CATEGORIES if answer.get(k)}
    expected |= {"allocator_reserve_bytes": answer["allocator_reserve_bytes"],
                 "activation_peak_bytes": answer["activation_peak_bytes"],
                 "fit.memory_bytes": answer["fit"]["memory_bytes"],
                 "fit.headroom_bytes": answer["fit"]["headroom_bytes"]}
    drawn = _cells(page, "breakdown")
    assert {k: v for k, (v, _) in drawn.items()} == expected
    assert all(value == shown for value, shown in drawn.values())
    # The bars: the steady-state peak's segments and the GPU's capacity line.
    bar = page.locator("#panel-breakdown svg.chart").first
    segs = {r.get_attribute("data-key"): int(r.get_attribute("data-bytes"))
            for r in bar.locator("rect[data-key]").all()[:6]}
    assert segs == {**{c: answer["breakdown"][c] for c in CATEGORIES[:-1]},
                    "allocator reserve": answer["allocator_reserve_bytes"]}
    assert int(bar.locator("line[data-key=capacity]").get_attribute("data-bytes")) \
        == answer["fit"]["memory_bytes"]
    assert page.locator("dd[data-field=peak_phase]").inner_text() == answer["peak_phase"]
    assert page.locator("dd[data-field='fit.max_micro_batch_size']").inner_text() \
        == str(answer["fit"]["max_micro_batch_size"])
    # The same link in a fresh page draws the same numbers.
    again = browser.new_page(viewport={"width": 1366, "height": 768})
    again.goto(page.url)
    _ready(again, "breakdown")
    assert again.input_value("#f-model-preset") == "gpt2-large"
    assert _cells(again, "breakdown") == drawn
    again.close()


def _schema(doc: dict, component: str, path: str) -> dict:
    """The OpenAPI schema of a dotted field path (Optional's non-null branch, $refs followed)."""
    def deref(node: dict) -> dict:
        while "$ref" in node:
            node = doc["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
        alts = [a for a in node.get("anyOf", []) if a.get("type") != "null"]
        return {**node, **deref(alts[0])} if len(alts) == 1 else node

    node = deref({"$ref": f"#/components/schemas/{component}"})
    for key in path.split("."):
        node = deref(node["properties"][key])
    return node


def _num(v: float) -> str:
    """A bound as the page writes it: powers of two from 2^32 up as 2^k."""
    if v >= 2**32 and float(v).is_integer() and int(v) & (int(v) - 1) == 0:
        return f"2^{int(v).bit_length() - 1}"
    return str(int(v)) if float(v).is_integer() else str(v)


def test_every_field_shows_the_apis_description_limits_and_choices(base, page):
    doc = httpx.get(f"{base}/openapi.json").json()
    page.goto(base)
    _ready(page, "breakdown")
    rows = page.locator("#setup .field").all()
    assert len(rows) >= 30
    # every parallelism field of the contract has its input (a new layout dimension is not left out)
    paths = {row.get_attribute("data-path") for row in rows}
    parallel = doc["components"]["schemas"]["ParallelSpec"]["properties"]
    assert {f"parallelism.{k}" for k in parallel} <= paths, sorted(parallel)
    assert {"training.loss.kind", "training.loss.chunks"} <= paths
    for row in rows:
        path = row.get_attribute("data-path")
        schema = _schema(doc, "MemoryRequest", path)
        hint = row.locator(".hint").inner_text()
        assert schema.get("description", "") in hint, path
        for key, sign in (("minimum", "≥"), ("maximum", "≤"), ("exclusiveMaximum", "<")):
            if key in schema:
                assert f"{sign} {_num(schema[key])}" in hint, (path, hint)
        label = row.locator("label")
        assert label.get_attribute("for") == row.locator("input, select").get_attribute("id")
        if "enum" in schema:
            options = [o for o in row.locator("option").all_inner_texts() if o != "(default)"]
            assert options == [str(v) for v in schema["enum"]], path
    # The views are tabs the keyboard moves between.
    page.focus("#tab-breakdown")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.id") == "tab-curve"
    assert page.get_attribute("#tab-curve", "aria-selected") == "true"
    _ready(page, "curve")
    assert page.is_hidden("#panel-breakdown") and page.is_visible("#panel-curve")
    # ...and the curve's points are the API's answers at each size, its mark the API's largest fit.
    request = _request_in_url(page)
    cells = _cells(page, "curve")
    for mbs in (1, 8):
        body = {**request, "training": {**request.get("training", {}), "micro_batch_size": mbs}}
        answer = httpx.post(f"{base}/v1/memory", json=body).json()
        assert cells[f"micro_batch_size={mbs}.breakdown.total"][0] == answer["breakdown"]["total"]
    largest = httpx.post(f"{base}/v1/memory", json=request).json()["fit"]["max_micro_batch_size"]
    assert page.locator("#panel-curve h2").inner_text() == f"Largest micro-batch that fits: {largest}"
    assert page.locator("#panel-curve circle.mark").first.get_attribute("data-x") == str(largest)


def test_an_invalid_field_shows_the_apis_message_next_to_it(base, page):
    page.goto(base)
    _ready(page, "breakdown")
    page.fill("#f-training-micro_batch_size", "0")
    page.fill("#f-hardware-gpu", "no-such-gpu")
    page.press("#f-hardware-gpu", "Enter")  # the keyboard submits the form
    page.wait_for_function("location.hash.includes('no-such-gpu')")
    _ready(page, "breakdown")
    request = _request_in_url(page)
    problem = httpx.post(f"{base}/v1/memory", json=request).json()
    reasons = {p["name"]: p["reason"] for p in problem["invalid-params"]}
    assert "body.training.micro_batch_size" in reasons
    error = page.locator("[data-error-for='training.micro_batch_size']")
    assert error.inner_text() == reasons["body.training.micro_batch_size"]
    assert page.get_attribute("#f-training-micro_batch_size", "aria-invalid") == "true"
    assert page.locator("[data-error-for='training.sequence_length']").inner_text() == ""
    # Once the schema is satisfied, the planner's answer (an unknown GPU) goes next to the GPU.
    page.fill("#f-training-micro_batch_size", "2")
    page.click("#estimate")
    page.wait_for_function("document.querySelector(\"[data-error-for='hardware.gpu']\")"
                           ".textContent.length > 0")
    problem = httpx.post(f"{base}/v1/memory", json=_request_in_url(page)).json()
    reason = {p["name"]: p["reason"] for p in problem["invalid-params"]}["body.hardware.gpu"]
    assert page.locator("[data-error-for='hardware.gpu']").inner_text() == reason
    assert page.locator("[data-error-for='training.micro_batch_size']").inner_text() == ""


def test_a_validation_job_is_submitted_and_followed_to_its_result(base, browser, page):
    page.goto(base)
    _ready(page, "breakdown")
    page.check("#source-architecture")
    # examples/validate-small.json: a 2-layer GPT-2, a few seconds on CPU.
    for field, value in {"num_layers": "2", "hidden_size": "64", "num_heads": "4",
                         "vocab_size": "256", "max_sequence_length": "64"}.items():
        page.fill(f"#f-model-{field}", value)
    page.select_option("#f-model-family", "gpt2")
    page.select_option("#f-training-precision", "fp32")
    page.fill("#f-training-micro_batch_size", "2")
    page.fill("#f-training-sequence_length", "32")
    page.fill("#f-hardware-gpu", "")
    page.click("#tab-validation")
    _ready(page, "validation")
    page.select_option("#v-device", "cpu")
    page.click("#submit-validation")
    job = page.locator(".job[data-status=succeeded]")
    job.wait_for(timeout=120_000)
    job_id = job.get_attribute("data-job")
    assert parse_qs(urlsplit(page.url).fragment)["job"] == [job_id]
    answer = httpx.get(f"{base}/v1/validations/{job_id}").json()
    assert answer["status"] == "succeeded"
    assert answer["request"]["model"]["num_layers"] == 2 and answer["request"]["device"] == "cpu"
    result = answer["result"]
    expected = {f"result.{k}.{c}": result[k][c] for k in ("estimate", "measured") for c in CATEGORIES}
    drawn = _cells(page, "validation")
    assert {k: v for k, (v, _) in drawn.items()} == expected
    assert all(value == shown for value, shown in drawn.values())
    total = page.locator("[data-field='result.relative_error.total']").inner_text()
    assert total == f"{100 * result['relative_error']['total']:.1f}%"
    steps = answer["progress"]["total_steps"]
    assert page.locator("progress").get_attribute("value") == str(answer["progress"]["step"])
    assert f"of {steps}" in page.locator(".progress-text").inner_text()
    # The link names the job: opened afresh, it shows the same result.
    again = browser.new_page(viewport={"width": 1366, "height": 768})
    again.goto(page.url)
    again.locator(f".job[data-job='{job_id}'][data-status=succeeded]").wait_for(timeout=30_000)
    assert _cells(again, "validation") == drawn
    again.close()


def test_zero_checkpointing_and_pipeline_views_draw_the_apis_numbers(base, page):
    """Opened from a link (the README's examples): each view's figures are the API's answer."""

    def open_view(view: str, request: dict) -> None:
        page.goto(f"{base}/#{urlencode({'view': view, 'req': json.dumps(request)})}")
        _ready(page, view)

    zero = {"model": {"preset": "llama-2-7b"},
            "training": {"sequence_length": 4096, "activation_checkpointing": {"strategy": "full"}},
            "parallelism": {"data_parallel": 8, "zero_stage": 3}, "hardware": {"gpu": "h100-80gb"}}
    open_view("zero", zero)
    answer = httpx.post(f"{base}/v1/zero", json=zero).json()
    expected = {f"stages.{i}.breakdown.{c}": s["breakdown"][c]
                for i, s in enumerate(answer["stages"]) for c in CATEGORIES}
    expected |= {f"stages.{i}.communication_bytes_per_step": s["communication_bytes_per_step"]
                 for i, s in enumerate(answer["stages"])}
    assert {k: v for k, (v, _) in _cells(page, "zero").items()} == expected

    setup = {"model": {"preset": "gpt2-xl"}, "training": {"micro_batch_size": 16,
             "activation_checkpointing": {"strategy": "every-k", "every_k": 3}},
             "hardware": {"gpu": "a100-80gb"}}
    open_view("checkpointing", setup)
    own = httpx.post(f"{base}/v1/checkpointing", json=setup).json()
    drawn = page.locator("#panel-checkpointing rect[data-checkpointed=true]").all()
    assert [int(r.get_attribute("data-block")) for r in drawn] == own["checkpointed_blocks"]
    assert page.locator("#panel-checkpointing rect[data-block]").count() == own["num_blocks"]
    sqrt = httpx.post(f"{base}/v1/checkpointing", json={**setup, "strategy": "sqrt"}).json()
    assert _cells(page, "checkpointing")["sqrt.total_peak_bytes"][0] == sqrt["total_peak_bytes"]

    piped = {"model": {"preset": "llama-2-7b"},
             "training": {"sequence_length": 4096, "gradient_accumulation_steps": 8},
             "parallelism": {"pipeline_parallel": 4}, "hardware": {"gpu": "h100-80gb"}}
    open_view("pipeline", piped)
    answer = httpx.post(f"{base}/v1/pipeline",
                        json={"setup": piped, "stages": 4, "microbatches": 8}).json()
    for rank in answer["ranks"]:
        cell = page.locator(f"[data-field='ranks.{rank['rank']}.peak_in_flight_microbatches']")
        assert cell.inner_text() == str(rank["peak_in_flight_microbatches"])
    assert page.locator("dd[data-field=bubble_fraction]").inner_text() \
        == f"{100 * answer['bubble_fraction']:.1f}%"
    assert page.locator("#panel-pipeline img.timeline").evaluate("i => i.naturalWidth") > 0


def _plan_cells(page) -> dict[str, tuple[float, str]]:
    """data-field -> (data-value, the text shown) for every number the Plan view draws."""
    return {c.get_attribute("data-field"): (float(c.get_attribute("data-value")), c.inner_text())
            for c in page.locator("#panel-plan [data-value]").all()}


def test_plan_view_draws_the_apis_ranked_layouts_front_and_search(base, browser, page):
    page.goto(f"{base}/#{urlencode({'view': 'plan', 'req': json.dumps({'model': {'preset': 'llama-3.2-1b'}})})}")
    _ready(page, "plan")
    doc = httpx.get(f"{base}/openapi.json").json()
    for row in page.locator("#plan-form .field").all():  # the API's description and limits
        schema = _schema(doc, "PlanRequest", row.get_attribute("data-path"))
        hint = row.locator(".hint").inner_text()
        assert schema.get("description", "") in hint
        for key, sign in (("minimum", "≥"), ("maximum", "≤"), ("exclusiveMinimum", ">")):
            if key in schema:
                assert f"{sign} {_num(schema[key])}" in hint, hint
    # A count out of the API's limits: its own message, next to that field.
    page.fill("#p-cluster-num_gpus", "0")
    page.click("#plan-search")
    page.wait_for_function("document.querySelector(\"[data-error-for='cluster.num_gpus']\")"
                           ".textContent.length > 0")
    plan = json.loads(parse_qs(urlsplit(page.url).fragment)["plan"][0])
    problem = httpx.post(f"{base}/v1/plan", json={"model": {"preset": "llama-3.2-1b"}, **plan})
    assert problem.status_code == 422
    reason = {p["name"]: p["reason"] for p in problem.json()["invalid-params"]}["body.cluster.num_gpus"]
    assert page.locator("[data-error-for='cluster.num_gpus']").inner_text() == reason
    # examples/plan.json typed into the form (the model comes from the setup on the left).
    for field, value in {"cluster-gpu": "l4-24gb", "cluster-num_gpus": "16",
                         "training-global_batch_sequences": "64",
                         "training-sequence_length": "8192", "training-max_micro_batch_size": "4",
                         "training-train_tokens": "100000000000", "constraints-top_k": "5",
                         "cluster-price_per_gpu_hour": "0.8"}.items():
        page.fill(f"#p-{field}", value)
    page.click("#plan-search")
    page.wait_for_function("location.hash.includes('l4-24gb')")
    _ready(page, "plan")
    plan = json.loads(parse_qs(urlsplit(page.url).fragment)["plan"][0])
    body = {"model": _request_in_url(page)["model"], **plan}
    assert body == json.loads((ROOT / "examples" / "plan.json").read_text())
    answer = httpx.post(f"{base}/v1/plan", json=body).json()
    drawn = _plan_cells(page)
    (cluster,) = answer["clusters"]
    assert cluster["layouts"] and cluster["pareto_front"]
    expected = {}
    for part in ("layouts", "pareto_front"):
        assert page.locator(f"[data-field$='.shape'][data-field^='clusters.0.{part}.']").count() \
            == len(cluster[part])
        for j, x in enumerate(cluster[part]):
            f, t = f"clusters.0.{part}.{j}", x["time"]
            expected |= {f"{f}.peak_bytes": x["peak_bytes"], f"{f}.time.compute_s": t["compute_s"],
                         f"{f}.time.bubble_s": t["bubble_s"], f"{f}.time.step_s": t["step_s"],
                         f"{f}.tokens_per_s": x["tokens_per_s"],
                         f"{f}.model_flops_utilization": x["model_flops_utilization"],
                         f"{f}.time_to_train_s": x["time_to_train_s"],
                         f"{f}.cost_to_train": x["cost_to_train"]}
            comm = sum(t[k] for k in ("tensor_parallel_s", "data_parallel_s", "pipeline_p2p_s",
                                      "expert_parallel_s", "offload_s"))
            assert drawn.pop(f"{f}.time.exposed_communication_s")[0] == pytest.approx(comm, rel=1e-12)
            assert page.locator(f"[data-field='{f}.shape']").inner_text() \
                == f"{x['data_parallel']}×{x['tensor_parallel']}×{x['pipeline_parallel']}"
            assert page.locator(f"[data-field='{f}.batch']").inner_text() \
                == f"{x['micro_batch_size']} × {x['gradient_accumulation_steps']}"
    expected |= {f"clusters.0.search.rejected.{k}": v for k, v in cluster["search"]["rejected"].items()}
    assert {k: v for k, (v, _) in drawn.items()} == expected
    # The text shown is the value: seconds to 4 digits, exact bytes, days to 0.1.
    first = "clusters.0.layouts.0"
    assert float(drawn[f"{first}.time.step_s"][1]) == pytest.approx(cluster["layouts"][0]["time"]["step_s"], rel=1e-3)
    assert drawn[f"{first}.peak_bytes"][1] == f"{cluster['layouts'][0]['peak_bytes'] / 2**30:.2f} GiB"
    assert _digits(page.get_attribute(f"[data-field='{first}.peak_bytes']", "title")) \
        == cluster["layouts"][0]["peak_bytes"]
    assert drawn[f"{first}.time_to_train_s"][1] == f"{cluster['layouts'][0]['time_to_train_s'] / 86400:.1f} d"
    for k in ("space_size", "pruned_by_bound", "evaluated"):
        shown = page.locator(f"dd[data-field='clusters.0.search.{k}']").inner_text()
        assert _digits(shown) == cluster["search"][k]
    # The scatter: one point per layout shown, the front's points marked.
    points = {(float(c.get_attribute("data-step-s")), int(c.get_attribute("data-bytes")),
               c.get_attribute("data-front")) for c in page.locator("#panel-plan svg.scatter circle").all()}
    front = {(x["time"]["step_s"], x["peak_bytes"]) for x in cluster["pareto_front"]}
    assert {(s, b) for s, b, f in points if f == "true"} == front
    assert {(s, b) for s, b, _ in points} == front | {(x["time"]["step_s"], x["peak_bytes"])
                                                      for x in cluster["layouts"]}
    # The link reproduces the view; picking the fastest layout opens it in Breakdown, where
    # POST /v1/memory's peak is the plan's.
    again = browser.new_page(viewport={"width": 1366, "height": 768})
    again.goto(page.url)
    _ready(again, "plan")
    assert again.input_value("#p-cluster-gpu") == "l4-24gb"
    assert {k: v for k, (v, _) in _plan_cells(again).items()
            if not k.endswith("exposed_communication_s")} == expected
    again.close()
    page.locator(".open-layout").first.click()
    _ready(page, "breakdown")
    assert _cells(page, "breakdown")["breakdown.total"][0] == cluster["layouts"][0]["peak_bytes"]


def test_breakdown_shows_the_apis_suggestions_when_it_does_not_fit(base, page):
    request = json.loads((ROOT / "examples" / "does-not-fit.json").read_text())
    page.goto(f"{base}/#{urlencode({'view': 'breakdown', 'req': json.dumps(request)})}")
    _ready(page, "breakdown")
    answer = httpx.post(f"{base}/v1/memory", json=request).json()
    assert not answer["fit"]["fits"] and answer["suggestions"]
    cells = _cells(page, "breakdown")
    for i, s in enumerate(answer["suggestions"]):
        assert page.locator(f"[data-field='suggestions.{i}.change']").inner_text() == s["change"]
        assert cells[f"suggestions.{i}.peak_bytes"] == (s["peak_bytes"], s["peak_bytes"])
        assert cells[f"suggestions.{i}.headroom_bytes"] == (s["headroom_bytes"], s["headroom_bytes"])
    assert page.locator("[data-field$='.change']").count() == len(answer["suggestions"])
    # Applying one gives the peak it promised, and the setup fits.
    page.locator(".apply-suggestion").first.click()
    page.wait_for_function("!document.querySelector('#panel-breakdown h2.bad')")
    _ready(page, "breakdown")
    assert _cells(page, "breakdown")["breakdown.total"][0] == answer["suggestions"][0]["peak_bytes"]


# A 2-layer Qwen2 config.json (the fields transformers' Qwen2Config reads): small enough that the
# first transformers estimate (its traced proxies) and a real CPU step take seconds.
SMALL_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128,
               "tie_word_embeddings": False, "torch_dtype": "float32"}


def _use_config_file(page, path) -> None:
    page.check("#source-hf_config")
    page.set_input_files("#f-model-hf_config-file", str(path))
    page.wait_for_function("document.querySelector('#f-model-hf_config').value.length > 0")


def test_a_config_json_file_is_estimated_and_validated_by_transformers(base, browser, page,
                                                                       tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMALL_QWEN2, indent=2))
    page.goto(base)
    _ready(page, "breakdown")
    _use_config_file(page, path)
    assert page.is_hidden("#f-model-preset") and page.is_visible("#f-model-hf_config")
    assert "config.json read" in page.locator(".config-field output").inner_text()
    page.select_option("#f-training-implementation", "transformers")
    page.select_option("#f-training-precision", "fp32")
    page.fill("#f-training-micro_batch_size", "2")
    page.fill("#f-training-sequence_length", "32")
    page.fill("#f-hardware-gpu", "")
    page.click("#estimate")
    page.wait_for_function("location.hash.includes('hf_config')")
    _ready(page, "breakdown")
    request = _request_in_url(page)
    assert request["model"] == {"hf_config": SMALL_QWEN2}  # the file's JSON, as sent
    assert request["training"]["implementation"] == "transformers"
    answer = httpx.post(f"{base}/v1/memory", json=request, timeout=120).json()
    expected = {f"{k}.{c}": answer[k][c] for k in ("breakdown", "forward_backward_peak", "first_step")
                for c in CATEGORIES if answer.get(k)}
    expected |= {k: answer[k] for k in ("allocator_reserve_bytes", "activation_peak_bytes")
                 if answer[k] is not None}  # none given: the cell shows a dash
    drawn = _cells(page, "breakdown")
    assert {k: v for k, (v, _) in drawn.items()} == expected
    assert all(value == shown for value, shown in drawn.values())
    assert answer["model"]["model_type"] == "qwen2"
    assert page.locator("#panel-breakdown h2").inner_text().startswith("qwen2 config.json: ")
    assert page.locator("dd[data-field=peak_phase]").inner_text() == answer["peak_phase"]
    assert page.locator("[data-error-for='model.hf_config']").inner_text() == ""
    # The link carries the config: a fresh page shows it in the text area and draws the same.
    again = browser.new_page(viewport={"width": 1366, "height": 768})
    again.goto(page.url)
    _ready(again, "breakdown")
    assert again.is_checked("#source-hf_config")
    assert json.loads(again.input_value("#f-model-hf_config")) == SMALL_QWEN2
    assert _cells(again, "breakdown") == drawn
    again.close()
    # The same setup as a validation job: the transformers model run on CPU, its result drawn.
    page.click("#tab-validation")
    _ready(page, "validation")
    page.select_option("#v-device", "cpu")
    page.click("#submit-validation")
    job = page.locator(".job[data-status=succeeded]")
    job.wait_for(timeout=120_000)
    answer = httpx.get(f"{base}/v1/validations/{job.get_attribute('data-job')}").json()
    assert answer["request"]["model"]["hf_config"] == SMALL_QWEN2
    assert answer["request"]["training"]["implementation"] == "transformers"
    result = answer["result"]
    expected = {f"result.{k}.{c}": result[k][c] for k in ("estimate", "measured") for c in CATEGORIES}
    assert {k: v for k, (v, _) in _cells(page, "validation").items()} == expected


def test_a_refused_config_shows_the_apis_message_and_invalid_json_the_pages(base, page, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**SMALL_QWEN2, "model_type": "bert"}))
    page.goto(base)
    _ready(page, "breakdown")
    _use_config_file(page, path)
    page.select_option("#f-training-implementation", "transformers")
    page.click("#estimate")
    page.wait_for_function("location.hash.includes('bert')")
    error = page.locator("[data-error-for='model.hf_config']")
    error.wait_for()
    problem = httpx.post(f"{base}/v1/memory", json=_request_in_url(page))
    assert problem.status_code == 422
    (param,) = problem.json()["invalid-params"]
    assert param["name"] == "body.model.hf_config.model_type" and "qwen2" in param["reason"]
    assert error.inner_text() == param["reason"]
    assert page.get_attribute("#f-model-hf_config", "aria-invalid") == "true"
    # Text that is not JSON: the page's own message as it is typed, and nothing is sent.
    before = page.url
    page.fill("#f-model-hf_config", '{"model_type": "qwen2", "hidden_size": 64,')
    assert error.inner_text().startswith("not valid JSON: ")
    page.click("#estimate")
    assert error.inner_text().startswith("not valid JSON: ")
    assert page.locator("#status").inner_text().startswith("config.json: not valid JSON")
    assert page.url == before


# meta-llama/Llama-3.1-8B's config.json as published on its model card (every field).
LLAMA_31_8B = {"architectures": ["LlamaForCausalLM"], "attention_bias": False,
               "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001,
               "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
               "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
               "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
               "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
               "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
               "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
               "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256}


def test_a_pasted_published_config_json_travels_in_the_link(base, browser, page):
    page.goto(base)
    _ready(page, "breakdown")
    page.check("#source-hf_config")
    page.fill("#f-model-hf_config", json.dumps(LLAMA_31_8B, indent=2))  # pasted as published
    page.fill("#f-training-sequence_length", "2048")
    page.fill("#f-hardware-gpu", "h100-80gb")
    page.click("#estimate")
    page.wait_for_function("location.hash.includes('LlamaForCausalLM')")
    _ready(page, "breakdown")
    request = _request_in_url(page)
    assert request["model"] == {"hf_config": LLAMA_31_8B}
    answer = httpx.post(f"{base}/v1/memory", json=request).json()
    assert answer["model"]["num_parameters"] == 8_030_261_248  # the model card's count
    drawn = _cells(page, "breakdown")
    assert drawn["breakdown.total"][0] == answer["breakdown"]["total"]
    again = browser.new_page(viewport={"width": 1366, "height": 768})
    again.goto(page.url)  # the whole config in the link (about 1 KiB of JSON)
    _ready(again, "breakdown")
    assert json.loads(again.input_value("#f-model-hf_config")) == LLAMA_31_8B
    assert _cells(again, "breakdown") == drawn
    again.close()
