"""Logical axes of the transformer family's parameters, framework-free: what each dimension of a
canonical parameter means, so that a parallel plan can say which mesh axis splits it.

Canonical layouts are PyTorch's (a linear weight is ``(out, in)``). The logical axes:

* ``vocab``: the rows of a token embedding or of an untied LM head (split over ``tensor``,
  Megatron's vocabulary-parallel embedding);
* ``heads``: the outputs of the q, k and v projections (and their inputs in ``o_proj``): whole
  heads go to one device under ``tensor``, so :func:`check_tensor_parallel` asks that the head
  counts divide;
* ``mlp``: the inner width F of the MLP (``fc_in``/``fc_gate`` outputs, ``fc_out`` inputs);
* ``embed``: the model width D wherever it appears (split over ``fsdp``: every device keeps
  a slice of every weight, as ZeRO-3 and FSDP do);
* ``qkv``: the outputs of a fused ``qkv_proj`` (Llama). Its rows are all query heads, then all
  key heads, then all value heads, so a contiguous split would give one device the queries and
  another the values: it is not split over ``tensor`` (``fsdp`` still splits its ``embed`` side);
* ``lora_rank``: the rank r of a LoRA adapter (never split: r is 16 at most here).

Norm weights and biases carry the axis of the width they scale; position embeddings are
``(None, "embed")``. Names no rule knows get no logical axes: the plan then splits them over
``fsdp`` by their largest evenly divisible dimension (see :mod:`mlperf_tutor.parallel.plan`).
"""

from __future__ import annotations

import re

from mlperf_tutor.layers.spec import BlockSpec

# (pattern on the canonical name, logical axis of each dimension). First match wins; LoRA
# adapters come before their base layer's rule.
TRANSFORMER_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(^|\.)(word_embeddings|lm_head)\.weight$", ("vocab", "embed")),
    (r"(^|\.)lm_head\.bias$", ("vocab",)),
    (r"(^|\.)mlm_head\.bias$", ("vocab",)),
    (r"(^|\.)(position_embeddings|token_type_embeddings)\.weight$", (None, "embed")),
    (r"\.qkv_proj\.lora_a\.weight$", ("lora_rank", "embed")),
    (r"\.qkv_proj\.lora_b\.weight$", ("qkv", "lora_rank")),
    (r"\.[qkv]_proj\.lora_a\.weight$", ("lora_rank", "embed")),
    (r"\.[qkv]_proj\.lora_b\.weight$", ("heads", "lora_rank")),
    (r"\.o_proj\.lora_a\.weight$", ("lora_rank", "heads")),
    (r"\.o_proj\.lora_b\.weight$", ("embed", "lora_rank")),
    (r"\.qkv_proj\.weight$", ("qkv", "embed")),
    (r"\.qkv_proj\.bias$", ("qkv",)),
    (r"\.[qkv]_proj\.weight$", ("heads", "embed")),
    (r"\.[qkv]_proj\.bias$", ("heads",)),
    (r"\.o_proj\.weight$", ("embed", "heads")),
    (r"\.(fc_in|fc_gate)\.lora_a\.weight$", ("lora_rank", "embed")),
    (r"\.(fc_in|fc_gate)\.lora_b\.weight$", ("mlp", "lora_rank")),
    (r"\.fc_out\.lora_a\.weight$", ("lora_rank", "mlp")),
    (r"\.fc_out\.lora_b\.weight$", ("embed", "lora_rank")),
    (r"\.(fc_in|fc_gate)\.weight$", ("mlp", "embed")),
    (r"\.(fc_in|fc_gate)\.bias$", ("mlp",)),
    (r"\.fc_out\.weight$", ("embed", "mlp")),
    (r"\.(o_proj|fc_out)\.bias$", ("embed",)),
    (r"(norm|_norm)\.(weight|bias)$", ("embed",)),
)
_COMPILED = tuple((re.compile(p), axes) for p, axes in TRANSFORMER_AXES)


def transformer_axes(name: str, ndim: int) -> tuple[str | None, ...]:
    """The logical axis of each dimension of the canonical parameter ``name`` (None: an axis no
    rule names; all None for a name no rule knows)."""
    for pattern, axes in _COMPILED:
        if pattern.search(name) and len(axes) == ndim:
            return axes
    return (None,) * ndim


def check_tensor_parallel(spec: BlockSpec, tensor: int, where: str) -> None:
    """Refuse a ``tensor`` size that would split a head or the MLP's inner width unevenly.

    Raises:
        ValueError: the query heads, the key/value heads or the MLP width is not a multiple of
            ``tensor`` (the message names the config field through ``where``).
    """
    if tensor <= 1:
        return
    attention = spec.attention
    counts = {
        "attention heads": attention.num_heads,
        "key/value heads": attention.num_kv_heads or attention.num_heads,
        "MLP width": spec.mlp.hidden,
    }
    for what, count in counts.items():
        if count % tensor:
            raise ValueError(
                f"{where}: tensor={tensor} must divide the {what} ({count}); choose a tensor "
                "size that divides it"
            )
