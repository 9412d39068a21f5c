"""Options of ``training.implementation: "transformers"``: the Hugging Face model code run in a
trainer-style loop (``loss = model(**batch).loss; loss.backward(); optimizer.step();
optimizer.zero_grad(set_to_none=True)``)."""

from __future__ import annotations

from pydantic import Field

from planner.catalog.frozen import _Frozen


class TransformersOptions(_Frozen):
    """What the transformers model code does that changes memory."""

    use_cache: bool | None = Field(
        None, description="The model's use_cache in the training forward: True keeps every "
        "layer's key/value in a DynamicCache until the loss is freed. None: the config's value "
        "(transformers' default is True; gradient_checkpointing_enable() turns it off in "
        "training).")
    use_reentrant: bool = Field(
        False, description="gradient_checkpointing_enable(gradient_checkpointing_kwargs="
        "{'use_reentrant': ...}) with activation_checkpointing 'full'.")
