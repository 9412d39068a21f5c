"""Screenshots of each view of the web page, for docs/screenshots/ (shown in the README).

Starts `memplan serve` (SQLite, embedded worker) on a free port and drives Debian's chromium
under Playwright, as tests/test_web_e2e.py does:

    .venv/bin/python scripts/screenshots.py [OUT_DIR [NAME ...]]

NAME (e.g. plan) takes only those.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.webpage import browser_missing, chromium, server  # noqa: E402


def example(name: str) -> dict:
    return json.loads((ROOT / "examples" / name).read_text())


def setup(validation: dict) -> dict:
    return {k: v for k, v in validation.items() if k in ("model", "training", "parallelism",
                                                           "hardware")}


PLAN = example("plan.json")

# Qwen/Qwen3-0.6B's config.json (the fields planner/catalog/data/hf_presets.json keeps, plus
# those every config.json carries): read from a file by the page's config.json input.
QWEN3_CONFIG = {"architectures": ["Qwen3ForCausalLM"], "torch_dtype": "bfloat16",
                **json.loads((ROOT / "planner" / "catalog" / "data" / "hf_presets.json")
                             .read_text())["models"]["qwen3-0.6b"]}

# (file, view, request[, plan]): mostly the README's examples.
SHOTS = [
    # The peak falls in the optimizer step; the forward/backward (activation) peak is drawn too.
    ("breakdown", "breakdown", {"model": {"preset": "gpt2-xl"},
                                "training": {"micro_batch_size": 2, "sequence_length": 1024,
                                             "activation_checkpointing": {"strategy": "full"}},
                                "hardware": {"gpu": "a100-40gb"}}),
    ("curve", "curve", example("fits.json")),
    ("zero", "zero", example("zero.json")),
    ("checkpointing", "checkpointing", example("checkpointing.json")),
    ("pipeline", "pipeline", {**example("pipeline.json")["setup"],
                              "parallelism": {"pipeline_parallel": 4},
                              "training": {**example("pipeline.json")["setup"]["training"],
                                           "gradient_accumulation_steps": 8}}),
    ("invalid", "breakdown", {"model": {"preset": "gpt2-xl"}, "training": {"micro_batch_size": 0},
                              "hardware": {"gpu": "a100-80gb"}}),
    ("validation", "validation", setup(example("validate-small.json"))),
    # The setup does not fit: the API's suggestions, each with its new peak.
    ("suggestions", "breakdown", example("does-not-fit.json")),
    # A config.json file estimated by the transformers model code itself.
    ("hf-config", "breakdown", {"model": {"hf_config": QWEN3_CONFIG},
                                "training": {"implementation": "transformers",
                                             "precision": "amp-bf16", "micro_batch_size": 4,
                                             "sequence_length": 2048},
                                "hardware": {"gpu": "a100-80gb"}}),
    # examples/plan.json: the model from the setup, the cluster in the Plan view's own fields.
    ("plan", "plan", {"model": PLAN["model"]}, {k: v for k, v in PLAN.items() if k != "model"}),
]


def ready(page, view: str) -> None:
    page.wait_for_function(f"document.body.dataset.ready === '{view}' && "
                           "!document.body.hasAttribute('aria-busy')", timeout=120_000)


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "docs" / "screenshots"
    why = browser_missing()
    if why:
        print(f"cannot take screenshots: {why}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, server(Path(tmp)) as base, chromium() as browser:
        for name, view, request, *plan in SHOTS:
            if argv[1:] and name not in argv[1:]:
                continue
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            state = {"view": view, "req": json.dumps(request)}
            if plan:
                state["plan"] = json.dumps(plan[0])
            page.goto(f"{base}/#{urlencode(state)}")
            ready(page, view)
            if "hf_config" in request["model"]:  # the file input used as a person would
                config = Path(tmp) / "config.json"
                config.write_text(json.dumps(request["model"]["hf_config"], indent=2))
                page.set_input_files("#f-model-hf_config-file", str(config))
                page.wait_for_selector(".config-field output:not(:empty)")
                page.click("#estimate")
                ready(page, view)
            if view == "validation":
                page.select_option("#v-device", "cpu")
                page.click("#submit-validation")
                page.locator(".job[data-status=succeeded]").wait_for(timeout=120_000)
            page.screenshot(path=str(out / f"{name}.png"), full_page=True)
            print(f"{out / f'{name}.png'}")
            page.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
