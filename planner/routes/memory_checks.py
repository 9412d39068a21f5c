"""The rules POST /v1/memory checks a request against before estimating it (each a 422 naming
the field): combinations of options the planner does not model, and limits of the model."""

from __future__ import annotations

from planner.catalog.errors import PlanningError
from planner.catalog.specs import MAX_STAGE_MICROBATCHES, ParallelSpec, ResolvedModel, TrainingSpec
from planner.layouts.parallel_ranks import empty_shard_rule, fsdp_mixed_precision_refusal
from planner.routes.loss_rules import loss_refusal

__all__ = ["check_request", "check_sizes"]


def check_sizes(model: ResolvedModel, tr: TrainingSpec) -> None:
    """The rule that reads the micro-batch size or the sequence length (the others read the
    setup alone: a setup that passed them at one size passes them at every size)."""
    if model.family == "gpt2" and tr.sequence_length > model.max_sequence_length:
        raise PlanningError(
            f"sequence_length ({tr.sequence_length}) exceeds the learned position table "
            f"({model.max_sequence_length})", "training.sequence_length")


def check_request(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec) -> None:
    """Every rule, in order: the first broken one is the 422."""
    if par.offload_parameters and par.zero_stage != 3:
        raise PlanningError("offload_parameters needs zero_stage 3 (FSDP2 CPUOffloadPolicy)",
                            "parallelism.offload_parameters")
    mp = fsdp_mixed_precision_refusal(tr, par)
    if mp is not None:
        raise PlanningError(mp, "parallelism.fsdp_mixed_precision")
    if par.offload_optimizer and par.zero_stage == 0:
        raise PlanningError("offload_optimizer needs zero_stage >= 1", "parallelism.offload_optimizer")
    if par.virtual_pipeline_stages > 1 and par.pipeline_parallel == 1:
        raise PlanningError("virtual_pipeline_stages > 1 needs pipeline_parallel > 1",
                            "parallelism.virtual_pipeline_stages")
    if par.sequence_parallel and par.tensor_parallel == 1:
        raise PlanningError("sequence_parallel needs tensor_parallel > 1", "parallelism.sequence_parallel")
    refusal = loss_refusal(tr, par)
    if refusal is not None:
        raise PlanningError(refusal, "training.loss.kind")
    if not model.architecture_known:
        return
    if par.tensor_parallel > 1:
        kv = model.num_kv_heads or model.num_heads
        if model.num_heads % par.tensor_parallel or kv % par.tensor_parallel:
            raise PlanningError(
                f"tensor_parallel ({par.tensor_parallel}) must divide num_heads ({model.num_heads}) "
                f"and num_kv_heads ({kv})", "parallelism.tensor_parallel")
    rule = empty_shard_rule(model, tr, par)
    if rule is not None:
        raise PlanningError(rule, "parallelism.data_parallel")
    if par.pipeline_parallel * par.virtual_pipeline_stages > model.num_layers:
        raise PlanningError(
            f"pipeline_parallel x virtual_pipeline_stages ({par.pipeline_parallel * par.virtual_pipeline_stages}) "
            f"exceeds num_layers ({model.num_layers})", "parallelism.pipeline_parallel")
    actions = par.pipeline_parallel * par.virtual_pipeline_stages * tr.gradient_accumulation_steps
    if par.pipeline_parallel > 1 and actions > MAX_STAGE_MICROBATCHES:
        raise PlanningError(
            f"pipeline_parallel x virtual_pipeline_stages x gradient_accumulation_steps must be "
            f"<= {MAX_STAGE_MICROBATCHES} (as for POST /v1/pipeline), got {actions}",
            "training.gradient_accumulation_steps")
    check_sizes(model, tr)
    if tr.lora is not None and model.family == "gpt2" and "gate" in tr.lora.target_modules:
        raise PlanningError(
            "gpt2 blocks have no gate projection (their MLP is up and down): LoRA targets q, k, "
            "v, o, up or down there", "training.lora.target_modules")
    if tr.lora is not None and tr.lora.base_dtype in ("fp32", "bf16", "fp16"):
        pdt = {"fp32": "fp32", "amp-bf16": "fp32", "amp-fp16": "fp32", "mixed-bf16": "bf16",
               "mixed-fp16": "fp16", "bf16": "bf16"}[tr.precision]
        if not tr.precision.startswith("amp-") and tr.lora.base_dtype != pdt:
            raise PlanningError(
                f"lora.base_dtype {tr.lora.base_dtype} differs from the {pdt} parameters of "
                f"precision {tr.precision}: without autocast the matmul dtypes must agree",
                "training.lora.base_dtype")
    ov = tr.precision_overrides
    if ov is not None and ov.gradients is not None:
        pdt = ov.parameters or {"mixed-bf16": "bf16", "mixed-fp16": "fp16", "bf16": "bf16"}.get(
            tr.precision, "fp32")
        if ov.gradients != pdt and not tr.precision.startswith("mixed-"):
            raise PlanningError(
                f"gradients in {ov.gradients} on {pdt} parameters need a master-weight preset "
                "(mixed-bf16 / mixed-fp16): torch.optim steps a parameter with its own-dtype "
                "gradient", "training.precision_overrides.gradients")
        if ov.gradients in ("int8", "nf4"):
            raise PlanningError("gradients cannot be quantized", "training.precision_overrides.gradients")
    ac = tr.activation_checkpointing
    if ac.strategy == "every-k" and ac.every_k is None:
        raise PlanningError("strategy 'every-k' needs every_k", "training.activation_checkpointing.every_k")
    if ac.blocks and max(ac.blocks) >= model.num_layers:
        raise PlanningError(
            f"training.activation_checkpointing.blocks: block {max(ac.blocks)} is not below "
            f"num_layers ({model.num_layers})", "training.activation_checkpointing.blocks")
