"""Request and result models: the one definition of memplan's contract.

Every route, the CLI and the validation runner use these models as they are. All byte figures are
Python ints (exact), every numeric input carries its documented maximum (``le=``) so absurd inputs
are refused with a 422 that names the field and the limit.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from planner.catalog.loss_specs import LossSpec

# ---- documented input limits (also enforced by the API as 422) -------------------------------
MAX_LAYERS = 1024
MAX_HIDDEN = 131_072
MAX_HEADS = 1024
MAX_VOCAB = 1_048_576
MAX_SEQUENCE = 1_048_576
MAX_BATCH = 65_536
MAX_RANKS = 1_048_576
MAX_MICROBATCHES = 65_536
# pipeline stages x virtual stages x micro-batches: bounds a pipelined step's actions per request
MAX_STAGE_MICROBATCHES = 2**20
MAX_PARAMETERS = 10**14

Family = Literal["gpt2", "llama"]
Precision = Literal["fp32", "amp-bf16", "amp-fp16", "mixed-bf16", "mixed-fp16", "bf16"]
DType = Literal["fp32", "bf16", "fp16", "int8", "nf4"]
OptimizerName = Literal[
    "sgd", "sgd-momentum", "adagrad", "rmsprop", "adadelta", "adam", "adamw", "adam-8bit",
    "adafactor", "lion",
]
CheckpointStrategy = Literal["none", "full", "every-k", "sqrt", "selective", "budget", "blocks"]
Attention = Literal["sdpa", "eager"]
Implementation = Literal["reference", "megatron", "transformers"]
PipelineScheduleName = Literal[
    "gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "dualpipe", "dualpipe-v"
]


from planner.catalog.allocator_specs import CudaAllocatorPeaks  # noqa: E402
from planner.catalog.frozen import _Frozen  # noqa: E402
from planner.catalog.result_specs import Assumption, Breakdown, Fit, Suggestion  # noqa: E402, F401
from planner.catalog.hf_specs import TransformersOptions  # noqa: E402
from planner.catalog.moe_specs import MoEStates  # noqa: E402


class ModelSpec(_Frozen):
    """A model: a preset name, architecture fields, or a bare parameter count."""

    preset: str | None = Field(None, description="Name from GET /v1/models, e.g. 'llama-2-7b'.")
    num_parameters: int | None = Field(
        None, ge=1, le=MAX_PARAMETERS,
        description="Bare parameter count: only model states (parameters, gradients, optimizer "
        "states) can then be estimated.",
    )
    family: Family | None = Field(None, description="Architecture family.")
    num_layers: int | None = Field(None, ge=1, le=MAX_LAYERS, description="Transformer blocks.")
    hidden_size: int | None = Field(None, ge=1, le=MAX_HIDDEN, description="Model width h.")
    num_heads: int | None = Field(None, ge=1, le=MAX_HEADS, description="Attention heads a.")
    num_kv_heads: int | None = Field(
        None, ge=1, le=MAX_HEADS, description="Key/value heads (grouped-query attention); "
        "defaults to num_heads.")
    ffn_hidden_size: int | None = Field(
        None, ge=1, le=4 * MAX_HIDDEN, description="MLP inner width; defaults to 4h (gpt2).")
    vocab_size: int | None = Field(None, ge=1, le=MAX_VOCAB, description="Vocabulary size V.")
    max_sequence_length: int | None = Field(
        None, ge=1, le=MAX_SEQUENCE, description="Positions (gpt2 learned position table size).")
    tie_embeddings: bool | None = Field(
        None, description="Output projection shares the token embedding (gpt2 default true).")
    hf_config: dict[str, Any] | None = Field(
        None, description="The contents of a Hugging Face config.json; model_type one of gpt2, "
        "llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, mixtral, qwen2_moe, qwen3_moe. "
        "Estimated through training.implementation 'transformers' (gpt2 and llama configs also "
        "through the reference step).")

    @field_validator("preset")
    @classmethod
    def _preset_name(cls, v: str | None) -> str | None:
        return None if v is None else v.lower()  # catalog names are lower case; 'GPT2-XL' is one

    @model_validator(mode="after")
    def _one_form(self) -> "ModelSpec":
        arch = [self.family, self.num_layers, self.hidden_size, self.num_heads, self.vocab_size]
        forms = sum([self.preset is not None, self.num_parameters is not None,
                     any(v is not None for v in arch), self.hf_config is not None])
        if forms != 1:
            raise ValueError(
                "give exactly one of: preset, num_parameters, hf_config, or architecture fields "
                "(family, num_layers, hidden_size, num_heads, vocab_size, ...)")
        if any(v is not None for v in arch):
            missing = [n for n, v in zip(
                ["family", "num_layers", "hidden_size", "num_heads", "vocab_size"], arch) if v is None]
            if missing:
                raise ValueError(f"architecture form needs {', '.join(missing)}")
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
            kv = self.num_kv_heads or self.num_heads
            if self.num_heads % kv:
                raise ValueError(
                    f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({kv})")
        return self


class ResolvedModel(_Frozen):
    """A fully specified model, as the planner used it."""

    name: str | None = Field(None, description="Preset name, if one was used.")
    family: Family | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    ffn_hidden_size: int | None = None
    vocab_size: int | None = None
    max_sequence_length: int | None = None
    tie_embeddings: bool | None = None
    num_parameters: int = Field(..., description="Exact parameter count.")
    model_type: str | None = Field(None, description="Hugging Face model_type of an hf_config "
                                   "model (or hf preset).")
    architecture_known: bool = Field(
        ..., description="False for a bare parameter count: activations cannot be estimated.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class LoraSpec(_Frozen):
    """Low-rank adapters on a frozen base (Hu et al. 2021; QLoRA, Dettmers et al. 2023)."""

    rank: int = Field(8, ge=1, le=4096, description="Adapter rank r.")
    alpha: float = Field(16.0, gt=0, le=1e6, description="Scaling numerator (scale = alpha/r).")
    target_modules: list[Literal["q", "k", "v", "o", "up", "gate", "down"]] = Field(
        default_factory=lambda: ["q", "v"], description="Projections that get adapters.")
    base_dtype: DType | None = Field(
        None, description="Frozen base weights' storage: a 16-bit/fp32 dtype, or int8 / nf4 "
        "quantized (QLoRA). Defaults to the precision's parameter dtype.")


class PrecisionOverrides(_Frozen):
    """Individual dtype overrides on top of a precision preset."""

    parameters: DType | None = None
    gradients: DType | None = Field(
        None, description="e.g. fp32 gradient accumulation on mixed-bf16: 18 bytes/param with Adam.")
    master_weights: DType | None = None


class ActivationCheckpointing(_Frozen):
    """Which transformer blocks recompute their forward in backward."""

    strategy: CheckpointStrategy = "none"
    every_k: int | None = Field(None, ge=1, le=MAX_LAYERS, description="For 'every-k': checkpoint "
                                "every k-th block.")
    budget_bytes: int | None = Field(None, ge=1, le=2**62, description="For 'budget': peak-memory "
                                     "budget per device in bytes (defaults to the GPU's memory).")
    blocks: list[Annotated[int, Field(ge=0, lt=MAX_LAYERS)]] | None = Field(
        None, max_length=MAX_LAYERS, description="Checkpointed block indices, each below "
        "num_layers: the plan of strategy 'blocks', or the resolved plan of a 'budget' (the "
        "'plan' POST /v1/checkpointing returns). Stored sorted.")

    @model_validator(mode="after")
    def _plan(self) -> "ActivationCheckpointing":
        if self.strategy == "blocks" and self.blocks is None:
            raise ValueError("strategy 'blocks' needs blocks (the checkpointed block indices)")
        if self.blocks is not None:
            if self.strategy not in ("blocks", "budget"):
                raise ValueError(f"blocks is the plan of strategy 'blocks' or a resolved 'budget' "
                                 f"plan, not of {self.strategy!r}")
        return self

    @field_validator("blocks")
    @classmethod
    def _sorted_blocks(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("lists a block index twice")
        return None if v is None else sorted(v)


# torch.optim's optimizers with a ``fused=True`` kernel (torch/optim/*.py, ``_fused_*``)
FUSED_OPTIMIZERS = ("sgd", "sgd-momentum", "adam", "adamw", "adagrad", "adam-8bit")


class TrainingSpec(_Frozen):
    """How one training step is run."""

    precision: Precision = "amp-bf16"
    precision_overrides: PrecisionOverrides | None = None
    optimizer: OptimizerName = "adamw"
    optimizer_implementation: Literal["foreach", "fused", "for-loop"] = Field(
        "foreach", description="torch.optim kernel: changes the step's temporaries.")
    rmsprop_centered: bool = False
    rmsprop_momentum: bool = False
    micro_batch_size: int = Field(1, ge=1, le=MAX_BATCH)
    sequence_length: int = Field(1024, ge=1, le=MAX_SEQUENCE)
    gradient_accumulation_steps: int = Field(1, ge=1, le=MAX_MICROBATCHES)
    activation_checkpointing: ActivationCheckpointing = Field(default_factory=ActivationCheckpointing)
    attention: Attention = "sdpa"
    implementation: Implementation = Field(
        "reference", description="'reference': memplan's measured training step, op by op. "
        "'megatron': Korthikanti et al. 2022, Table 2. 'transformers': the Hugging Face "
        "transformers model code in a trainer-style loop (traced; needs memplan[hf]).")
    transformers: TransformersOptions | None = Field(
        None, description="Options of implementation 'transformers'.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability (0 = no masks).")
    lora: LoraSpec | None = None
    loss: LossSpec = Field(default_factory=LossSpec, description="Output head and cross-entropy: "
                           "whole, chunked, or chunked and recomputed in backward.")

    @model_validator(mode="after")
    def _transformers_options(self) -> "TrainingSpec":
        if self.transformers is not None and self.implementation != "transformers":
            raise ValueError("transformers options apply to implementation 'transformers'")
        return self

    @field_validator("optimizer_implementation")
    @classmethod
    def _fused_exists(cls, v: str, info) -> str:
        opt = info.data.get("optimizer")
        if v == "fused" and opt is not None and opt not in FUSED_OPTIMIZERS:
            raise ValueError(f"torch.optim has no fused implementation of {opt!r}; fused exists "
                             f"for {', '.join(FUSED_OPTIMIZERS)}")
        return v


class ParallelSpec(_Frozen):
    """How the model is spread over devices."""

    data_parallel: int = Field(1, ge=1, le=MAX_RANKS)
    tensor_parallel: int = Field(1, ge=1, le=MAX_HEADS)
    pipeline_parallel: int = Field(1, ge=1, le=MAX_LAYERS)
    virtual_pipeline_stages: int = Field(1, ge=1, le=MAX_LAYERS)
    pipeline_schedule: PipelineScheduleName = "1f1b"
    sequence_parallel: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    offload_parameters: bool = False
    fsdp_mixed_precision: bool = Field(False, description=(
        "precision 'mixed-bf16' under zero_stage 3 (FSDP2) run as torchtitan runs it: fp32 "
        "sharded parameters (the master weights), MixedPrecisionPolicy(param_dtype=bf16, "
        "reduce_dtype=fp32); needs data_parallel >= 2."))
    expert_parallel: int = Field(1, ge=1, le=4096, description="MoE models: ranks the routed "
                                 "experts are split over, inside the data-parallel group.")


class HardwareSpec(_Frozen):
    """The device to fit on: a catalog GPU name, or a memory size."""

    gpu: str | None = Field(None, description="Name from GET /v1/gpus, e.g. 'h100-80gb'.")
    memory_bytes: int | None = Field(None, ge=1, le=2**50)
    allocator: Literal["assumed", "replay"] = Field(
        "assumed", description="The CUDA caching allocator's reserve: 'assumed' (5% of the peak, "
        "instant) or 'replay' (the single-device reference step's allocations replayed through "
        "the allocator's rules, exact against max_memory_reserved, one replay per setup and size; "
        "fills cuda_allocator).")

    @field_validator("gpu")
    @classmethod
    def _gpu_name(cls, v: str | None) -> str | None:
        return None if v is None else v.lower()  # catalog names are lower case; 'A100-80GB' is one


class MemoryRequest(_Frozen):
    model: ModelSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    parallelism: ParallelSpec = Field(default_factory=ParallelSpec)
    hardware: HardwareSpec | None = None


class MemoryResult(_Frozen):
    model: ResolvedModel
    breakdown: Breakdown
    first_step: Breakdown | None = Field(None, description="Peak of the first step (no optimizer states yet).")
    peak_phase: str = Field(..., description="Where in the step the peak occurs.")
    activation_peak_bytes: int | None = Field(
        None, description="Highest live activation bytes (tensors allocated in forward or in a "
        "checkpoint's recompute) at any instant of forward and backward, wherever the step's "
        "peak falls: what activation checkpointing lowers. None where activations are not "
        "derived (bare parameter count, pipelined ranks).")
    forward_backward_peak: Breakdown | None = Field(
        None, description="The highest total of forward and backward in the steady state "
        "(optimizer states live), by category: equal to breakdown when the step's peak falls "
        "there, lower when the optimizer step is the peak. None where not derived.")
    forward_backward_peak_phase: str | None = Field(
        None, description="Where forward_backward_peak occurs.")
    allocator_reserve_bytes: int = Field(..., description="Caching-allocator overhead on top of "
                                         "the peak: cuda_allocator's reserved - total, else assumed.")
    cuda_allocator: CudaAllocatorPeaks | None = None
    fit: Fit | None = None
    moe: MoEStates | None = None
    assumptions: list[Assumption] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    suggestions: list[Suggestion] = Field(
        default_factory=list, description="When it does not fit: the smallest changes that fit, "
        "each with its new peak.")


PositiveInt = Annotated[int, Field(ge=1)]


# ---- validation jobs (what a job reports: planner/catalog/validation_specs.py) -----------------
class ValidationRequest(MemoryRequest):
    """Run the reference training step for this setup and compare it with the estimate."""

    mode: Literal["real", "traced"] = Field(
        "real", description="'real' allocates and times the step; 'traced' runs it under "
        "FakeTensorMode (exact bytes for full-size models, no time figures).")
    steps: int = Field(3, ge=2, le=50, description="Training steps; step 2+ is the steady state.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    timeout_s: float = Field(600.0, gt=0, le=6 * 3600, description="Wall-clock limit of the job.")
