"""What the reference training step does not run, decided from the request alone.

Torch-free, so that the API refuses at submission (``service.jobs.requirements.runner_refusal``)
exactly what the runner would refuse, without loading torch. Multi-rank requests are checked by
the multi-rank and pipelined runners' own checks, which load their modules (and torch).
"""

from __future__ import annotations

from planner.catalog.presets import resolve_model
from planner.catalog.specs import ValidationRequest
from planner.routes.loss_rules import loss_refusal


class ValidationUnsupported(ValueError):
    """The request asks for something the reference step does not run (``field``: the request
    field at fault, ``body.``-prefixed, where the check knows it)."""

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.field = field


def check_transformers(req: ValidationRequest) -> dict:
    """implementation 'transformers': the config the step builds from, or the refusal (the
    estimate's own rules: one device, the precisions, optimizers and checkpointing it runs)."""
    from planner.catalog.errors import PlanningError
    from planner.routes.hf_memory import check

    try:
        return check(req)
    except PlanningError as exc:
        raise ValidationUnsupported(exc.detail, f"body.{exc.field}" if exc.field else None) \
            from None


def check_supported(req: ValidationRequest) -> None:
    """Refuse, with the reason, what the single-process reference step does not run."""
    par, tr = req.parallelism, req.training
    refusal = loss_refusal(tr, par)
    if refusal is not None:  # the estimate refuses it too (training.loss.kind)
        raise ValidationUnsupported(refusal)
    from planner.layouts.parallel_ranks import fsdp_mixed_precision_refusal

    mp = fsdp_mixed_precision_refusal(tr, par)
    if mp is not None:
        raise ValidationUnsupported(mp)
    if tr.implementation == "transformers":
        check_transformers(req)
        if par.data_parallel > 1:
            from service.validation.hf_ranks import check_hf_ranks

            check_hf_ranks(req)
        return
    if par.tensor_parallel > 1:
        raise ValidationUnsupported(
            "tensor_parallel > 1 is not run by the validation runner: the reference model has no "
            "tensor-parallel layers; validate data parallelism (DDP, ZeRO 1-3) or one device")
    if par.pipeline_parallel > 1:
        from service.validation.pipeline_run import check_pipeline

        check_pipeline(req)  # raises ValidationUnsupported with the reason
    elif par.data_parallel > 1:
        from service.validation.distributed import check_multi_rank

        check_multi_rank(req)  # raises ValidationUnsupported with the reason
    elif par.zero_stage or par.offload_optimizer or par.offload_parameters:
        raise ValidationUnsupported("ZeRO stages and offload shard over data-parallel ranks: set "
                                    "data_parallel > 1 (or zero_stage 0 for one device)")
    if tr.implementation != "reference":
        raise ValidationUnsupported("only implementation 'reference' can be measured")
    if tr.optimizer in ("adam-8bit", "lion"):
        raise ValidationUnsupported(f"optimizer {tr.optimizer!r} has no torch.optim implementation")
    if tr.lora is not None and tr.lora.base_dtype in ("int8", "nf4"):
        raise ValidationUnsupported("quantized LoRA bases (int8/nf4) are not run by the reference step")
    ov = tr.precision_overrides
    if ov is not None and (ov.gradients in ("int8", "nf4") or ov.master_weights not in (None, "fp32")):
        raise ValidationUnsupported("gradient / master-weight dtype overrides are not run by the "
                                    "reference step")
    if req.mode == "traced" and tr.precision in ("amp-fp16", "mixed-fp16"):
        raise ValidationUnsupported(
            "fp16 loss scaling reads gradient values (inf/nan checks), which FakeTensorMode has "
            "not got: validate fp16 presets in real mode, or trace a bf16 preset")
    model = resolve_model(req.model)
    if not model.architecture_known:
        raise ValidationUnsupported("a bare num_parameters model cannot be built; give the architecture")
