"""Float64 numpy reference of the shared transformer blocks, for the framework tests.

The PyTorch, JAX and TensorFlow layers in ``mlperf_tutor.layers`` are checked against these
functions. Weights ``w`` are dicts in the canonical naming and layouts (PyTorch's): a linear layer
``name`` has ``name.weight`` of shape (out, in) and, optionally, ``name.bias``; a layer norm has
``name.weight`` and ``name.bias``. A block's sub-layers sit under ``attention.``, ``mlp.``,
``attention_norm.`` and ``mlp_norm.``; a layer tested alone has the empty prefix.

Conventions the layers must match:

* ``key_mask`` (B, S) is 1 for real keys and 0 for padding; padded keys get -10000.0 added to
  their scores (BERT's additive mask), so a row with padding still has a finite softmax.
* ``causal`` hides the keys after each query (scores set to -inf).
* Grouped-query attention with N query heads and K key/value heads: query head n reads
  key/value head n // (N / K).
* ``"gelu"`` is the exact (erf) GELU, ``"gelu_tanh"`` the tanh approximation.
* Rotary positions (Su et al. 2021) rotate the first ``rotary_dim`` dims of every query and key
  head by ``t * base**(-2j / rotary_dim)`` for pair j at position t. The pairs are dims
  (2j, 2j + 1) in the ``"interleaved"`` layout (GPT-J) and (j, j + rotary_dim / 2) in the
  ``"half"`` layout (GPT-NeoX, Llama); the other dims pass through.

Test modules import this as ``numpy_reference``: ``tests/`` has no ``__init__.py``, so pytest's
default ("prepend") import mode puts ``tests/`` on ``sys.path`` when it imports them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

_erf = np.vectorize(math.erf)

ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: (
        0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    ),
    "relu": lambda x: np.maximum(x, 0.0),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
}


def linear(w: dict, name: str, x: np.ndarray) -> np.ndarray:
    """``x @ W.T + b`` with ``W`` = ``w[name.weight]`` (out, in); no bias if ``name.bias`` is
    absent."""
    y = x @ w[f"{name}.weight"].T
    return y + w[f"{name}.bias"] if f"{name}.bias" in w else y


def layer_norm(w: dict, name: str, x: np.ndarray, eps: float) -> np.ndarray:
    """Layer norm over the last axis (biased variance), scaled and shifted by ``name``'s
    weight and bias."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w[f"{name}.weight"] + w[f"{name}.bias"]


def rotary(x: np.ndarray, rotary_dim: int, layout: str, base: float = 10000.0) -> np.ndarray:
    """Rotary positions on ``x`` (B, T, N, H), position t = 0..T-1, one pair at a time."""
    out = x.copy()
    half = rotary_dim // 2
    for j in range(half):
        first, second = (2 * j, 2 * j + 1) if layout == "interleaved" else (j, j + half)
        angle = np.arange(x.shape[1]) * base ** (-2.0 * j / rotary_dim)  # (T,)
        cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
        a, b = x[..., first], x[..., second]  # (B, T, N)
        out[..., first] = a * cos - b * sin
        out[..., second] = b * cos + a * sin
    return out


def attention(
    w: dict,
    x: np.ndarray,
    num_heads: int,
    num_kv_heads: int | None = None,
    key_mask: np.ndarray | None = None,
    causal: bool = False,
    prefix: str = "",
    rotary_dim: int = 0,
    rotary_layout: str = "interleaved",
) -> np.ndarray:
    """Multi-head self-attention of ``x`` (B, T, D) through ``{prefix}q_proj``, ``k_proj``,
    ``v_proj`` and ``o_proj``; ``num_kv_heads`` (default ``num_heads``) key/value heads;
    rotary positions on the first ``rotary_dim`` dims of q and k when it is not 0."""
    b, t, d = x.shape
    n, k, h = num_heads, num_kv_heads or num_heads, d // num_heads
    q = linear(w, f"{prefix}q_proj", x).reshape(b, t, n, h)
    keys = linear(w, f"{prefix}k_proj", x).reshape(b, t, k, h)
    if rotary_dim:
        q, keys = rotary(q, rotary_dim, rotary_layout), rotary(keys, rotary_dim, rotary_layout)
    values = linear(w, f"{prefix}v_proj", x).reshape(b, t, k, h)
    kv_head = np.arange(n) // (n // k)  # query head -> the kv head it reads
    keys, values = keys[:, :, kv_head], values[:, :, kv_head]  # (B, S, N, H)
    scores = np.einsum("btnh,bsnh->bnts", q, keys) / math.sqrt(h)
    if key_mask is not None:
        scores = scores + (1.0 - key_mask)[:, None, None, :] * -10000.0
    if causal:
        # A naive mask: every future key, one at a time.
        for query in range(t):
            scores[:, :, query, query + 1 :] = -np.inf
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", probs, values).reshape(b, t, d)
    return linear(w, f"{prefix}o_proj", out)


def mlp(w: dict, x: np.ndarray, activation: str, prefix: str = "") -> np.ndarray:
    """``fc_out(act(fc_in(x)))`` with ``act`` = ``ACTIVATIONS[activation]``."""
    return linear(w, f"{prefix}fc_out", ACTIVATIONS[activation](linear(w, f"{prefix}fc_in", x)))


def block(
    w: dict,
    x: np.ndarray,
    num_heads: int,
    norm_eps: float,
    norm_position: str,
    key_mask: np.ndarray | None = None,
    causal: bool = False,
    activation: str = "gelu",
    rotary_dim: int = 0,
) -> np.ndarray:
    """A transformer block: attention then an MLP, each in a residual branch.

    ``norm_position`` "post" (BERT): ``x = norm(x + sublayer(x))``; "pre" (GPT-3):
    ``x = x + sublayer(norm(x))``; "parallel" (GPT-J): ``h = attention_norm(x);
    x = x + attention(h) + mlp(h)``. Attention has ``num_heads`` heads for queries, keys and
    values, and interleaved rotary positions on ``rotary_dim`` dims when that is not 0.
    """

    def attend(y):
        return attention(
            w,
            y,
            num_heads,
            key_mask=key_mask,
            causal=causal,
            prefix="attention.",
            rotary_dim=rotary_dim,
        )

    def norm(name, y):
        return layer_norm(w, name, y, norm_eps)

    def feed_forward(y):
        return mlp(w, y, activation, prefix="mlp.")

    if norm_position == "parallel":
        h = norm("attention_norm", x)
        return x + attend(h) + feed_forward(h)
    if norm_position == "pre":
        x = x + attend(norm("attention_norm", x))
        return x + feed_forward(norm("mlp_norm", x))
    if norm_position == "post":
        x = norm("attention_norm", x + attend(x))
        return norm("mlp_norm", x + feed_forward(x))
    raise ValueError(f"norm_position must be 'post', 'pre' or 'parallel', not {norm_position!r}")


def gpt(w: dict, cfg, input_ids: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """The GPT decoder of ``mlperf_tutor.workloads.gpt`` (GPT-3 and GPT-J configs) in float64:
    ``{"logits": (B, T, V)}`` plus ``"loss"``, the mean cross-entropy over labels != -100."""
    t = input_ids.shape[1]
    x = w["embeddings.word_embeddings.weight"][input_ids]  # (B, T, D)
    if cfg.position == "learned":
        x = x + w["embeddings.position_embeddings.weight"][:t]
    for i in range(cfg.num_layers):
        prefix = f"blocks.{i}."
        layer = {k[len(prefix) :]: v for k, v in w.items() if k.startswith(prefix)}
        x = block(
            layer,
            x,
            cfg.num_heads,
            cfg.norm_eps,
            "parallel" if cfg.parallel_residual else "pre",
            causal=True,
            activation=cfg.activation,
            rotary_dim=cfg.rotary_dim,
        )
    x = layer_norm(w, "final_norm", x, cfg.norm_eps)
    if cfg.tie_embeddings:
        logits = x @ w["embeddings.word_embeddings.weight"].T
    else:
        logits = linear(w, "lm_head", x)
    out = {"logits": logits}
    if labels is not None:
        keep = labels != -100
        top = logits.max(-1, keepdims=True)
        log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        picked = np.take_along_axis(log_probs, np.where(keep, labels, 0)[..., None], -1)[..., 0]
        out["loss"] = -(picked * keep).sum() / keep.sum()
    return out


def dlrm(w: dict, cfg, batch: dict) -> dict:
    """DLRM-DCNv2 of ``mlperf_tutor.workloads.dlrm`` in float64: ``{"logits": (B,), "loss"}``,
    the loss the mean binary cross-entropy with logits."""

    def mlp(prefix, x, sizes, relu_last):
        for j in range(len(sizes)):
            x = linear(w, f"{prefix}.layers.{j}", x)
            if relu_last or j < len(sizes) - 1:
                x = np.maximum(x, 0.0)
        return x

    pooled = [mlp("bottom_mlp", batch["dense"].astype(np.float64), cfg.bottom_mlp, True)]
    start = 0
    for f, hot in enumerate(cfg.multi_hot_sizes):
        bag = batch["sparse"][:, start : start + hot]  # (B, hot)
        table = w[f"embedding_bags.{f}.weight"]
        # A naive bag: add the rows one column at a time.
        total = np.zeros((bag.shape[0], table.shape[1]))
        for column in range(hot):
            total += table[bag[:, column]]
        pooled.append(total)
        start += hot
    x0 = np.concatenate(pooled, axis=1)  # (B, (F + 1) E)
    x = x0
    for layer in range(cfg.cross_layers):
        prefix = f"interaction.layers.{layer}"
        x = x0 * linear(w, f"{prefix}.w", linear(w, f"{prefix}.v", x)) + x
    logits = mlp("top_mlp", x, cfg.top_mlp, False)[:, 0]  # (B,)
    labels = batch["labels"].astype(np.float64)
    # log(1 + exp(-|z|)) + max(z, 0) - z y: the stable form of BCE with logits.
    loss = np.mean(np.log1p(np.exp(-np.abs(logits))) + np.maximum(logits, 0.0) - logits * labels)
    return {"logits": logits, "loss": loss}


def rms_norm(w: dict, name: str, x: np.ndarray, eps: float) -> np.ndarray:
    """Root-mean-square norm over the last axis, scaled by ``name``'s weight (Llama)."""
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w[f"{name}.weight"]


def merge_lora(w: dict, name: str, scaling: float) -> np.ndarray:
    """The weight of ``name`` with its LoRA update merged: ``W + scaling * B @ A``, the form
    PEFT's ``merge_and_unload`` gives (the layers add the update to the output instead)."""
    weight = w[f"{name}.weight"]
    if f"{name}.lora_a.weight" not in w:
        return weight
    return weight + scaling * w[f"{name}.lora_b.weight"] @ w[f"{name}.lora_a.weight"]


def llama(w: dict, cfg, batch: dict) -> dict:
    """The Llama 2 decoder of ``mlperf_tutor.workloads.llama`` in float64, LoRA merged:
    ``{"logits": (B, T, V)}`` plus ``"loss"``, the mean cross-entropy of ``labels[:, t + 1]``
    at position t over labels != -100 (Hugging Face's shift)."""
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    scaling = cfg.lora_alpha / cfg.lora_rank if cfg.lora_rank else 0.0
    x = w["word_embeddings.weight"][batch["input_ids"]]  # (B, T, D)
    key_mask = batch.get("attention_mask")
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        qkv = merge_lora(w, f"{p}attention.qkv_proj", scaling)  # ((N + 2K) H, D)
        split = {
            "q_proj.weight": qkv[: n * h],
            "k_proj.weight": qkv[n * h : (n + k) * h],
            "v_proj.weight": qkv[(n + k) * h :],
            "o_proj.weight": merge_lora(w, f"{p}attention.o_proj", scaling),
        }
        h_in = rms_norm(w, f"{p}attention_norm", x, cfg.norm_eps)
        x = x + attention(
            split,
            h_in,
            n,
            k,
            None if key_mask is None else key_mask.astype(np.float64),
            causal=True,
            rotary_dim=h,
            rotary_layout="half",
        )
        h_in = rms_norm(w, f"{p}mlp_norm", x, cfg.norm_eps)
        gate = ACTIVATIONS["silu"](linear(w, f"{p}mlp.fc_gate", h_in))
        x = x + linear(w, f"{p}mlp.fc_out", gate * linear(w, f"{p}mlp.fc_in", h_in))
    logits = linear(w, "lm_head", rms_norm(w, "final_norm", x, cfg.norm_eps))
    out = {"logits": logits}
    if batch.get("labels") is not None:
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        shifted = logits[:, :-1]
        top = shifted.max(-1, keepdims=True)
        log_probs = shifted - top - np.log(np.exp(shifted - top).sum(-1, keepdims=True))
        picked = np.take_along_axis(log_probs, np.where(keep, labels, 0)[..., None], -1)[..., 0]
        out["loss"] = -(picked * keep).sum() / keep.sum()
    return out
