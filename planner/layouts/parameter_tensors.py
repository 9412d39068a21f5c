"""The reference model's parameter tensors per pipeline stage, with their shapes and
tensor-parallel split.

``service.validation.model.Transformer`` registers its parameters in a fixed order: the word
embedding (and GPT-2's learned positions), the blocks' norms and projections, the final norm and
an untied (or, on another pipeline stage, copied) output projection. ``_stage_tensors`` lists the
ones a pipeline stage holds, each with the way Megatron-LM splits it over tensor-parallel ranks,
and ``_lora_shapes`` the LoRA adapters a stage trains instead. ``planner/layouts/sharding.py``
shards these tensors over the data-parallel ranks for the per-rank model states;
``parameter_shapes`` is the whole model's list, in registration order.
"""

from __future__ import annotations

from planner.catalog.specs import ResolvedModel

Shape = tuple[int, ...]


# ---- the reference model's parameter tensors, with shapes and tensor-parallel split -----------
# Kinds: "col" column-parallel Linear (weight (out, in) split on out, bias split), "row"
# row-parallel Linear (weight split on in, bias replicated), "vocab" vocab-parallel embedding /
# output (split on rows), "rep" replicated (norms, learned positions). Megatron-LM, Shoeybi et al.
# 2019 §3: q/k/v/up/gate column-parallel, o/down row-parallel.

def _layer_tensors(m: ResolvedModel) -> list[tuple[Shape, str]]:
    h, f = m.hidden_size, m.ffn_hidden_size
    kv = (m.num_kv_heads or m.num_heads) * (h // m.num_heads)
    if m.family == "gpt2":
        return [((h,), "rep"), ((h,), "rep"),
                ((h, h), "col"), ((h,), "col"), ((kv, h), "col"), ((kv,), "col"),
                ((kv, h), "col"), ((kv,), "col"), ((h, h), "row"), ((h,), "rep"),
                ((h,), "rep"), ((h,), "rep"), ((f, h), "col"), ((f,), "col"), ((h, f), "row"),
                ((h,), "rep")]
    return [((h,), "rep"), ((h, h), "col"), ((kv, h), "col"), ((kv, h), "col"), ((h, h), "row"),
            ((h,), "rep"), ((f, h), "col"), ((f, h), "col"), ((h, f), "row")]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _tp_split(shape: Shape, kind: str, t: int) -> Shape:
    if t == 1 or kind == "rep":
        return shape
    if kind in ("col", "vocab"):
        return (_ceil_div(shape[0], t),) + shape[1:]
    return shape[:-1] + (_ceil_div(shape[-1], t),)  # row-parallel: split the input dim


def parameter_shapes(m: ResolvedModel) -> list[Shape]:
    """Shapes of every parameter of service.validation.model.Transformer, registration order
    (numels equal ``count_parameters(m).tensor_sizes()``)."""
    return [s for s, _ in _stage_tensors(m, 0, m.num_layers, first=True, last=True, tp=1)]


def _stage_tensors(m: ResolvedModel, layer_lo: int, layer_hi: int, *, first: bool, last: bool,
                   tp: int) -> list[tuple[Shape, str]]:
    h, V = m.hidden_size, m.vocab_size
    out: list[tuple[Shape, str]] = []
    if first:
        out.append(((V, h), "vocab"))  # tok_emb
        if m.family == "gpt2":
            out.append(((m.max_sequence_length, h), "rep"))  # pos_emb
    out += _layer_tensors(m) * (layer_hi - layer_lo)
    if last:
        out += [((h,), "rep"), ((h,), "rep")] if m.family == "gpt2" else [((h,), "rep")]
        if not m.tie_embeddings or not first:
            # untied lm_head; or, tied but on another pipeline stage, the output stage keeps its
            # own copy of the word embedding (Megatron-LM word_embeddings_for_head)
            out.append(((V, h), "vocab"))
    if tp == 1:
        return out
    split = {sk: (_tp_split(*sk, tp), sk[1]) for sk in set(out)}  # per distinct tensor kind
    return list(map(split.__getitem__, out))


def _lora_shapes(m: ResolvedModel, lora, n_layers: int, t: int) -> list[Shape]:
    """Adapter tensors A (r, in) and B (out, r) per targeted projection (Hu et al. 2021, §4.1);
    under tensor parallelism the adapters follow their base Linear's split."""
    h, f = m.hidden_size, m.ffn_hidden_size
    kv = (m.num_kv_heads or m.num_heads) * (h // m.num_heads)
    dims = {"q": (h, h, "col"), "k": (h, kv, "col"), "v": (h, kv, "col"), "o": (h, h, "row"),
            "up": (h, f, "col"), "gate": (h, f, "col"), "down": (f, h, "row")}
    if m.family == "gpt2":
        dims.pop("gate")
    r = lora.rank
    order = ["q", "k", "v", "o", "gate", "up", "down"]
    out: list[Shape] = []
    for name in order:
        if name in dims and name in lora.target_modules:
            i, o, kind = dims[name]
            a, b = (r, i), (o, r)
            if t > 1 and kind == "col":
                b = (_ceil_div(o, t), r)
            elif t > 1:
                a = (r, _ceil_div(i, t))
            out += [a, b]
    return out * n_layers


__all__ = ["parameter_shapes"]
