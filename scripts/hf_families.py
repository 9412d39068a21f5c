"""Regenerate planner/catalog/data/hf_families.json from the installed transformers.

Each supported model_type's config class, instantiated with its defaults: the fields memplan
accepts in a model's hf_config and the defaults filled in for fields a config.json leaves out.
Run: .venv/bin/python scripts/hf_families.py
"""

import inspect
import json
from pathlib import Path

import transformers
from transformers import CONFIG_MAPPING, AutoConfig

TYPES = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3",
         "mixtral", "qwen2_moe", "qwen3_moe"]
# fields the modeling code reads with getattr although the config class does not declare them
# (Qwen3-MoE attention: getattr(config, "head_dim", hidden_size // num_attention_heads))
EXTRA = {"qwen3_moe": {"head_dim"}}
DROP = {"transformers_version", "architectures", "model_type", "_name_or_path", "dtype",
        "torch_dtype", "id2label", "label2id"}


def _jsonable(v):
    if v is inspect.Parameter.empty:
        return None
    try:
        json.dumps(v)
        return v
    except TypeError:
        return None


def main() -> None:
    fams = {}
    for t in TYPES:
        keys = set(AutoConfig.for_model(t).to_dict())
        sig = inspect.signature(CONFIG_MAPPING[t].__init__).parameters
        keys |= {k for k, v in sig.items() if v.kind is v.POSITIONAL_OR_KEYWORD and k != "self"}
        # the defaults of the config class's constructor (None where transformers derives the
        # value, e.g. head_dim = hidden_size // num_attention_heads)
        keys |= EXTRA.get(t, set())
        fams[t] = {"defaults": {k: _jsonable(sig[k].default) if k in sig else None
                                for k in sorted(keys - DROP)},
                   "aliases": dict(CONFIG_MAPPING[t].attribute_map)}
    out = {"_source": f"transformers {transformers.__version__}: the fields of AutoConfig.for_model(type).to_dict() and of the config class's constructor, with the constructor's defaults",
           "families": fams}
    path = Path(__file__).resolve().parents[1] / "planner/catalog/data/hf_families.json"
    path.write_text(json.dumps(out, indent=1, sort_keys=False) + "\n")
    print(path, {t: len(f) for t, f in fams.items()})


if __name__ == "__main__":
    main()
