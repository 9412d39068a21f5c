"""The transformers training step: what ``training.implementation: "transformers"`` describes.

The model is the one transformers builds from the config (``AutoModelForCausalLM.from_config``,
random init, ``attn_implementation`` = ``training.attention``), run in the loop a trainer runs:

    with autocast (amp-* only):
        loss = model(input_ids=ids, labels=ids[, use_cache=...]).loss
    scale(loss / gradient_accumulation_steps).backward()
    optimizer.step() (through the GradScaler for amp-fp16); optimizer.zero_grad(set_to_none=True)

``activation_checkpointing: full`` is ``gradient_checkpointing_enable`` (transformers 5.x:
``activation_checkpointing_enable``) with ``use_reentrant`` from ``training.transformers``.
Precisions (planner/hf/precision.py, the reference step's schemes): fp32; amp-bf16 / amp-fp16
(fp32 model, 16-bit autocast, fp16 with torch's GradScaler); bf16 (bf16 model, optimizer on it);
mixed-bf16 / mixed-fp16 (16-bit model, fp32 master weights stepped by the optimizer, fp16 with a
static loss scale).

``run`` meters each step with ``LiveMemoryMeter`` (planner/hf/meter.py) in windows per phase
(forward, backward, optimizer): the step's peak is the highest window, and each window's peak is
what the traced estimate (planner/hf/estimate.py) extrapolates over the layers. The validation
runner calls the same ``run`` on the full model, so estimate and measurement are one code path
apart only in the layer count. Traced, ``run`` takes the real run's path where a fake tensor would
take another (planner/hf/tracing.py).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any, Callable

from planner.catalog.errors import PlanningError
from planner.catalog.hf_config import layer_field
from planner.catalog.specs import TrainingSpec
from planner.hf.tracing import (_NoRebuild, _as_real_run, _fake_rank_checks, _in_place_allreduce,
                                 _trace_slot)

PRECISIONS = ("fp32", "amp-bf16", "amp-fp16", "bf16", "mixed-bf16", "mixed-fp16")
OPTIMIZERS = ("sgd", "sgd-momentum", "adam", "adamw", "rmsprop", "adadelta", "adagrad")
STRATEGIES = ("none", "full")
PHASES = ("forward", "backward", "optimizer")


def unsupported(tr: TrainingSpec) -> tuple[str, str] | None:
    """(field, why) for a training setting this step does not run; None when it runs it."""
    if tr.precision not in PRECISIONS:
        return ("training.precision", f"implementation 'transformers' runs precision "
                f"{', '.join(PRECISIONS)}, not {tr.precision!r}")
    if tr.optimizer not in OPTIMIZERS:
        return ("training.optimizer", f"implementation 'transformers' runs optimizers "
                f"{', '.join(OPTIMIZERS)}, not {tr.optimizer!r}")
    if tr.activation_checkpointing.strategy not in STRATEGIES:
        return ("training.activation_checkpointing.strategy",
                "implementation 'transformers' checkpoints every decoder layer "
                "(gradient_checkpointing_enable): strategy 'full' or 'none', not "
                f"{tr.activation_checkpointing.strategy!r}")
    if tr.precision_overrides is not None:
        return ("training.precision_overrides", "not run by implementation 'transformers'")
    if tr.lora is not None:
        from planner.hf.lora import unsupported as lora_unsupported

        why = lora_unsupported(tr)
        if why is not None:
            return why
    if tr.loss.kind != "standard":
        return ("training.loss.kind", "implementation 'transformers' computes the model's own "
                f"loss (model(**batch).loss): loss kind 'standard', not {tr.loss.kind!r}")
    if tr.dropout:
        return ("training.dropout", "implementation 'transformers' uses the config's own "
                "dropout fields (e.g. gpt2's attn_pdrop); training.dropout must be 0")
    if tr.optimizer in ("rmsprop", "adadelta", "adagrad") and \
            tr.optimizer_implementation == "fused":
        return ("training.optimizer_implementation", f"torch has no fused {tr.optimizer}")
    return None


def make_config(config: dict[str, Any], num_layers: int | None = None):
    """A transformers config from validated config.json fields; ``num_layers`` builds a proxy
    of the first blocks (per-layer lists such as layer_types cut to match)."""
    d = {k: v for k, v in config.items() if k != "model_type"}
    mt = config["model_type"]
    full = _config(mt, d)
    if num_layers is None:
        return full
    d[layer_field(mt)] = num_layers
    types = getattr(full, "layer_types", None)
    if types is not None:
        d["layer_types"] = list(types[:num_layers])
    return _config(mt, d)


def _config(model_type: str, fields: dict[str, Any]):
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as exc:  # noqa: BLE001 - transformers' own validation of the fields
        raise PlanningError(f"model.hf_config: transformers refuses this config: "
                            f"{type(exc).__name__}: {_first_line(exc)}", "model.hf_config") \
            from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def block_kinds(config: dict[str, Any]) -> list[tuple]:
    """What distinguishes one decoder block from another, per block: its attention type and,
    for Qwen MoE, whether it is sparse (its decoder layer's rule)."""
    full = make_config(config)
    n = getattr(full, "num_hidden_layers", None) or full.n_layer
    types = getattr(full, "layer_types", None) or ["full_attention"] * n
    step = getattr(full, "decoder_sparse_step", None)
    only = set(getattr(full, "mlp_only_layers", None) or [])
    experts = getattr(full, "num_experts", 0) or 0
    return [(types[i], step is not None and i not in only and experts > 0
             and (i + 1) % step == 0) for i in range(n)]


def make_optimizer(tr: TrainingSpec, params: list) -> Any:
    import torch

    impl = tr.optimizer_implementation
    kw: dict[str, Any] = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    name = tr.optimizer
    if name in ("sgd", "sgd-momentum"):
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9 if name == "sgd-momentum" else 0.0,
                               **kw)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-4, **kw)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, **kw)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=1e-3, centered=tr.rmsprop_centered,
                                   momentum=0.9 if tr.rmsprop_momentum else 0.0, **kw)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=1.0, **kw)
    return torch.optim.Adagrad(params, lr=1e-3, **kw)


def _recompute_aware(fn: Callable, on_recompute: Callable[[], Any]) -> Callable:
    import torch

    def run(*args: Any, **kwargs: Any) -> Any:
        if torch._C._current_graph_task_id() != -1:  # inside backward: the recompute
            with on_recompute():
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return run


def build(config: dict[str, Any], tr: TrainingSpec, device, num_layers: int | None = None,
          on_recompute: Callable[[], Any] | None = None, traced: bool = False,
          wrap: Callable[[Any], Any] | None = None, zero1: bool = False):
    """(model, optimizer) on ``device`` (under FakeTensorMode when one is active); for mixed-*
    the optimizer is ``MasterWeights`` (planner/hf/precision.py) around the torch one. ``wrap``
    (e.g. FSDP2's ``fully_shard``) runs on the model before the optimizer is made over it;
    ``zero1``: torch's ZeroRedundancyOptimizer around the optimizer's class and defaults."""
    import torch
    from transformers import AutoModelForCausalLM

    from planner.hf import precision as P

    conf = make_config(config, num_layers)
    dtype = P.model_dtype(tr.precision)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(conf, attn_implementation=tr.attention,
                                                     dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - what transformers cannot build from the config
        if isinstance(exc, ValueError) and "attention implementation" in str(exc):
            raise PlanningError(f"training.attention {tr.attention!r}: "
                                f"{str(exc).split('. ')[0]}", "training.attention") from None
        raise PlanningError(f"model.hf_config: transformers cannot build this model: "
                            f"{type(exc).__name__}: {_first_line(exc)}", "model.hf_config") \
            from None
    model.train()
    if tr.lora is not None:  # frozen base, adapters (planner/hf/lora.py)
        from planner.hf.lora import apply

        apply(model, tr)
    if tr.activation_checkpointing.strategy == "full":
        kwargs = {"use_reentrant": (tr.transformers.use_reentrant if tr.transformers else False)}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if on_recompute is not None:  # count a recompute's tensors as activations
            for m in model.modules():
                f = getattr(m, "_gradient_checkpointing_func", None)
                if f is not None:
                    m._gradient_checkpointing_func = (
                        lambda fn, *a, _f=f, **k: _f(_recompute_aware(fn, on_recompute), *a, **k))
    if wrap is not None:
        wrap(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if zero1:
        from planner.hf.fsdp import zero_redundancy

        return model, zero_redundancy(params, lambda ps: make_optimizer(tr, ps))
    opt = P.wrap_optimizer(tr.precision, params, lambda ps: make_optimizer(tr, ps), traced)
    return model, opt


def make_batch(vocab_size: int, tr: TrainingSpec, device, traced: bool) -> dict:
    import torch

    shape = (tr.micro_batch_size, tr.sequence_length)
    if traced:
        ids = torch.zeros(shape, dtype=torch.long, device=device)
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab_size, shape, generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids}
    opts = tr.transformers
    if opts is not None and opts.use_cache is not None:
        batch["use_cache"] = opts.use_cache
    return batch


def run(config: dict[str, Any], tr: TrainingSpec, device: str = "cpu", traced: bool = True,
        steps: int = 2, num_layers: int | None = None,
        on_step: Callable[[int], None] | None = None, ddp: bool = False,
        kernels: str = "cpu", zero_stage: int = 0) -> list[dict]:
    """Run ``steps`` optimizer steps metered; per step ``{"peak": (breakdown, op, phase),
    "phases": {phase: (breakdown, op)}}`` (breakdowns classified once the step has ended).
    ``ddp``: the model wrapped in DistributedDataParallel(gradient_as_bucket_view=True) on the
    initialised default process group (gloo under torchrun, or the fake one when traced); the
    reducer's gradient buckets are created inside the meter, with the model. With ``ddp``,
    ``zero_stage`` 1: torch's ZeroRedundancyOptimizer as the optimizer; 2 or 3: FSDP2 instead of
    DDP (planner/hf/fsdp.py), sharded inside the meter before the optimizer is made over the
    shards, its collectives' buffers temporaries. ``kernels``
    "cuda": a trace takes the attention kernels a CUDA device runs (planner/hf/cuda_attention.py).
    A step whose loss scaler found an overflow (amp-fp16, mixed-fp16; real runs only) skipped
    the optimizer: ``"skipped": True`` (planner/hf/precision.py)."""
    import torch

    from planner.hf import fsdp as F
    from planner.hf import precision as P
    from planner.hf.meter import LiveMemoryMeter
    from planner.machine.deadline import check

    dev = torch.device(device)
    out: list[dict] = []
    with ExitStack() as stack:
        if traced:
            from torch._subclasses.fake_tensor import FakeTensorMode

            stack.enter_context(_trace_slot(check))  # _as_real_run patches modules: one at a time
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=False))
            stack.enter_context(_as_real_run())
            if kernels == "cuda" and tr.precision == "fp32":  # 16-bit inputs: cuDNN, below
                from planner.hf.cuda_attention import cuda_sdpa

                stack.enter_context(cuda_sdpa())
        check()
        torch.manual_seed(0)
        fsdp = ddp and zero_stage >= 2
        meter = F.DistributedMeter() if fsdp else LiveMemoryMeter()

        def shard(m: Any) -> None:
            mesh = F.default_mesh()  # not metered: a few bytes the mesh keeps, no parameter
            with meter, meter.in_phase("other"):
                F.shard(m, zero_stage, mesh, gloo=not traced)

        model, opt = build(config, tr, dev, num_layers, lambda: meter.in_phase("recompute"),
                           traced, shard if fsdp else None, ddp and zero_stage == 1)
        local = opt.optim if ddp and zero_stage == 1 else opt  # ZeRO-1: this rank's own
        vocab = model.config.vocab_size
        inner = model
        batch = make_batch(vocab, tr, dev, traced)
        meter.register(model, "parameters")
        if fsdp:
            stack.enter_context(F.fsdp_collectives_as(meter, "comm"))
            if traced:
                stack.enter_context(F.as_real_storages())
        elif ddp:
            from torch.nn.parallel import DistributedDataParallel

            with meter, _fake_rank_checks(traced):  # buckets: gradients once marked
                model = DistributedDataParallel(model, gradient_as_bucket_view=True,
                                                broadcast_buffers=False)
                if traced:
                    model.register_comm_hook(None, _in_place_allreduce)
                    model.reducer = _NoRebuild(model.reducer)
        meter.register([v for v in batch.values() if isinstance(v, torch.Tensor)], "activations")
        if tr.optimizer == "adagrad":  # Adagrad creates its state in the constructor
            meter.register(local, "optimizer_states")
        if isinstance(opt, P.MasterWeights):  # fp32 masters: the optimizer's, made with it
            meter.register(opt.masters, "optimizer_states")
        amp = P.autocast(tr.precision, dev.type)
        scaling = P.LossScaling(tr.precision, dev.type, traced)
        accum = tr.gradient_accumulation_steps
        with meter:
            for i in range(steps):
                if on_step is not None:
                    on_step(i)
                t0 = time.perf_counter()
                windows: list[tuple[str, Any]] = []
                for _ in range(accum):
                    check()  # the request's work limit (planner.machine.deadline), per phase
                    meter.reset_peak()
                    with meter.in_phase("forward"), amp:
                        loss = model(**batch).loss
                        if accum > 1:
                            loss = loss / accum
                    windows.append(("forward", meter.peak))
                    check()
                    meter.reset_peak()
                    with meter.in_phase("backward"):
                        scaling.scale(loss).backward()
                    del loss
                    windows.append(("backward", meter.peak))
                meter.mark([p.grad for p in inner.parameters() if p.grad is not None],
                           "gradients")
                if fsdp:  # the unsharded parameters (all-gather outputs), freed by now
                    meter.mark(F.fsdp_unsharded(model), "parameters")
                check()
                meter.reset_peak()
                with meter.in_phase("optimizer"):
                    scaling.step(opt)
                    opt.zero_grad(set_to_none=True)
                windows.append(("optimizer", meter.peak))
                meter.mark(local, "optimizer_states")
                if dev.type == "cuda" and not traced:
                    torch.cuda.synchronize(dev)
                out.append({**_summary(windows), "time_s": time.perf_counter() - t0,
                            "skipped": scaling.skipped})
    return out


def _summary(windows: list[tuple[str, Any]]) -> dict:
    phases: dict[str, tuple[dict, str]] = {}
    best = None
    for name, pk in windows:
        bd = pk.breakdown()
        if name not in phases or bd["total"] > phases[name][0]["total"]:
            phases[name] = (bd, pk.op)
        if best is None or bd["total"] > best[0]["total"]:
            best = (bd, pk.op, name)
    return {"peak": best, "phases": phases}
