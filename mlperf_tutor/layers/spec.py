"""What a transformer block is, framework-free: the one argument of every framework's layers.

A workload config describes its model; ``cfg.block_spec()`` turns that into a
:class:`BlockSpec` (an :class:`AttentionSpec`, an :class:`MlpSpec` and the norms around them),
and ``layers/{torch,jax,tf}/block.py``'s ``TransformerBlock(spec)`` builds it. The checks that
belong to the model rather than to a framework (head divisibility, rotary dims, the longest
input) live here once, so the three frameworks refuse the same things with the same words.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) adds a trainable low-rank update to a
frozen linear layer, as PEFT's ``LoraLayer`` computes it::

    y = W x + b + (alpha / r) * lora_b(lora_a(dropout(x)))        lora_a: (r, in), lora_b: (out, r)

Each framework's ``LoRALinear`` (``layers/<framework>/lora.py``) is its ``Linear`` plus the two
children ``lora_a`` and ``lora_b``, so the base weight keeps its plain canonical name
(``...qkv_proj.weight``) and the adapters are ``...qkv_proj.lora_a.weight`` and
``...qkv_proj.lora_b.weight``.

Dimension letters: B batch, T query time, S key time, D model, N heads, K kv heads, H head dim,
F ffn, R rotary dims.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Added to the scores of padded keys: the MLPerf BERT reference's value (modeling.py). It is
# not -inf so that a fully padded row still has a well-defined (uniform) softmax.
KEY_MASK_VALUE = -10000.0
# Put on the scores of future keys; the most negative float32, so exp() gives exactly 0 even
# where a padded key's -10000 was added before.
CAUSAL_MASK_VALUE = float(np.finfo(np.float32).min)

# Labels with this value are not predicted (PyTorch's and Hugging Face's ignore_index).
IGNORE_INDEX = -100

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")  # gelu: exact (erf); gelu_tanh: GPT-2's
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("post", "pre", "parallel")
ROTARY_LAYOUTS = ("interleaved", "half")
FUSED_IMPLEMENTATIONS = (None, "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class Lora:
    """Which linear layers get adapters, and the adapters' numbers.

    Args:
        rank: r, the inner width of the update.
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout rate on the adapter's input (not on the base layer's).
        targets: attribute names of the layers that get adapters, e.g. ("qkv_proj", "o_proj").
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("qkv_proj", "o_proj")

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def applies_to(self, name: str) -> bool:
        return name in self.targets


def is_adapter(name: str) -> bool:
    """Whether a canonical parameter name belongs to a LoRA adapter (the only trained ones)."""
    return ".lora_a." in name or ".lora_b." in name


def check_rotary(rotary_dim: int, head_dim: int, layout: str) -> None:
    """Raise a ValueError unless ``rotary_dim`` dims of a ``head_dim`` head can be rotated in
    ``layout`` (see ``apply_rotary`` in ``layers/<framework>/rotary.py``)."""
    if layout not in ROTARY_LAYOUTS:
        raise ValueError(f"rotary_layout must be one of {ROTARY_LAYOUTS}, got {layout!r}")
    if rotary_dim % 2 or not 0 <= rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim ({rotary_dim}) must be even and in [0, head dim {head_dim}]")


def check_activation(name: str) -> None:
    """Raise a ValueError unless ``name`` is one of :data:`ACTIVATIONS`."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")


def check_norm(kind: str) -> None:
    """Raise a ValueError unless ``kind`` is one of :data:`NORMS`."""
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Multi-head attention: self-attention, or cross-attention to a context of ``context_dim``.

    ``scores = q k^T / sqrt(H)``; padded keys get :data:`KEY_MASK_VALUE` added, future keys are
    set to :data:`CAUSAL_MASK_VALUE` when ``causal``; softmax in float32 at least, dropout on
    the probabilities, then ``o_proj``. With ``num_kv_heads = K < N``, query head ``n`` uses
    key/value head ``n // (N / K)`` (Llama 2's grouped heads).

    Args:
        dim: model width D (input and output); head dim H = D / N.
        num_heads: query heads N.
        num_kv_heads: key/value heads K (grouped-query attention); None: N.
        bias: whether the q/k/v (or fused qkv) projections have biases.
        out_bias: whether ``o_proj`` has a bias; None: as ``bias``.
        dropout: dropout rate on the attention probabilities.
        causal: mask keys after the query (decoder self-attention).
        rotary_dim: dims R of each query and key head that rotary positions rotate; 0: none.
        rotary_base: the rotary wavelength base (10000 in RoFormer, GPT-J and Llama 2).
        rotary_layout: which dims form rotary pair j: "interleaved" (2j, 2j + 1) as GPT-J, or
            "half" (j, j + R / 2) as GPT-NeoX and Llama.
        fused_qkv: one ``qkv_proj`` whose output is the N H query dims, then the K H key and the
            K H value dims (the MLPerf Llama 2 checkpoint's layout), instead of three.
        context_dim: width of the ``context`` that keys and values read (cross-attention);
            None: self-attention. Not with causal, rotary or fused_qkv.
        lora: LoRA adapters on the projections it targets (``qkv_proj``, ``o_proj``, ...).
        max_positions: the longest sequence the model takes (its position table or trained
            context); None: no limit. See :meth:`check_length`.
        fused: run the framework's fused attention kernel (torch SDPA,
            ``jax.nn.dot_product_attention``, ``keras.ops.dot_product_attention``). Same math,
            but the dropout draws other random numbers and the softmax runs in the input dtype;
            the explicit path is the reference.
        fused_implementation: JAX's fused implementation, "xla" or "cudnn"; None: cuDNN for
            bf16/fp16 on a GPU, XLA otherwise. Ignored by torch and TF.
    """

    dim: int  # D
    num_heads: int  # N
    num_kv_heads: int | None = None  # K
    bias: bool = True
    out_bias: bool | None = None
    dropout: float = 0.0
    causal: bool = False
    rotary_dim: int = 0  # R
    rotary_base: float = 10000.0
    rotary_layout: str = "interleaved"
    fused_qkv: bool = False
    context_dim: int | None = None
    lora: Lora | None = None
    max_positions: int | None = None
    fused: bool = False
    fused_implementation: str | None = None

    def __post_init__(self):
        if self.context_dim is not None and (self.causal or self.rotary_dim or self.fused_qkv):
            raise ValueError(
                "cross-attention (context_dim set) supports neither causal, rotary_dim nor "
                "fused_qkv; leave them at their defaults"
            )
        if self.dim % self.num_heads or self.num_heads % self.kv_heads:
            raise ValueError(
                f"Attention needs dim ({self.dim}) divisible by num_heads ({self.num_heads}) and "
                f"num_heads divisible by num_kv_heads ({self.kv_heads})"
            )
        check_rotary(self.rotary_dim, self.head_dim, self.rotary_layout)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"attention dropout must be in [0, 1), got {self.dropout}")
        if self.fused_implementation not in FUSED_IMPLEMENTATIONS:
            raise ValueError(
                f"fused_implementation must be one of {FUSED_IMPLEMENTATIONS}, "
                f"got {self.fused_implementation!r}"
            )
        if self.max_positions is not None and self.max_positions < 1:
            raise ValueError(f"max_positions must be positive, got {self.max_positions}")

    @property
    def kv_heads(self) -> int:
        """K: the key/value heads (``num_heads`` without grouped-query attention)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        """H = D / N."""
        return self.dim // self.num_heads

    @property
    def has_out_bias(self) -> bool:
        return self.bias if self.out_bias is None else self.out_bias

    @property
    def is_cross(self) -> bool:
        return self.context_dim is not None

    def check_length(self, length: int | None) -> None:
        """Raise a ValueError when a sequence of ``length`` tokens is longer than the model
        takes (``max_positions``). ``None`` (a length not known while tracing) passes."""
        if length is not None and self.max_positions is not None and length > self.max_positions:
            raise ValueError(
                f"the input has {length} tokens; the model takes at most "
                f"max_positions = {self.max_positions}"
            )

    def cross(self, context_dim: int) -> AttentionSpec:
        """The cross-attention beside this self-attention: same heads, biases, dropout, LoRA
        and kernel choice; keys and values from a context of ``context_dim``; no causal mask,
        rotary positions or fused qkv."""
        return dataclasses.replace(
            self,
            context_dim=context_dim,
            causal=False,
            rotary_dim=0,
            fused_qkv=False,
            max_positions=None,
        )


@dataclasses.dataclass(frozen=True)
class MlpSpec:
    """Feed-forward network: ``fc_out(dropout(act(fc_in(x))))``, or with ``gated`` (SwiGLU with
    "silu", as Llama: ``gate_proj`` = ``fc_gate``, ``up_proj`` = ``fc_in``, ``down_proj`` =
    ``fc_out``; GEGLU with "gelu", as Stable Diffusion) ``fc_out(dropout(act(fc_gate(x)) *
    fc_in(x)))``.

    Args:
        dim: model width D (input and output).
        hidden: inner width F.
        activation: one of :data:`ACTIVATIONS` ("gelu" is exact, with erf).
        bias: whether the linear layers have biases.
        dropout: dropout rate on the inner activations (0 in every block here: BERT and GPT
            drop the MLP's output instead).
        gated: a third projection ``fc_gate`` whose activation multiplies ``fc_in(x)``.
    """

    dim: int  # D
    hidden: int  # F
    activation: str = "gelu"
    bias: bool = True
    dropout: float = 0.0
    gated: bool = False

    def __post_init__(self):
        check_activation(self.activation)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MLP dropout must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """A transformer block: attention and MLP, each in a residual branch with a norm.

    ``norm_position="post"`` (BERT)::

        x = attention_norm(x + dropout(attention(x, key_mask)))
        x = mlp_norm(x + dropout(mlp(x)))

    ``norm_position="pre"`` (GPT-3, Llama, Stable Diffusion)::

        x = x + dropout(attention(attention_norm(x), key_mask))
        x = x + dropout(cross_attention(cross_attention_norm(x), context))  # with cross_attention
        x = x + dropout(mlp(mlp_norm(x)))

    ``norm_position="parallel"`` (GPT-J; Wang & Komatsuzaki 2021,
    https://github.com/kingoflolz/mesh-transformer-jax), one norm and no ``mlp_norm``::

        h = attention_norm(x)
        x = x + dropout(attention(h, key_mask)) + dropout(mlp(h))

    Args:
        attention: the self-attention.
        mlp: the feed-forward network (same width D as the attention).
        norm_eps: the norms' epsilon (always explicit: frameworks' defaults differ).
        norm: "layernorm" (weight and bias) or "rmsnorm" (weight; Llama).
        norm_position: "post", "pre" or "parallel".
        dropout: dropout rate on the attention and MLP outputs before the residual sum.
        cross_attention: a cross-attention after the self-attention ("pre" blocks only), see
            :meth:`AttentionSpec.cross`; None: none.
    """

    attention: AttentionSpec
    mlp: MlpSpec
    norm_eps: float
    norm: str = "layernorm"
    norm_position: str = "post"
    dropout: float = 0.0
    cross_attention: AttentionSpec | None = None

    def __post_init__(self):
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(
                f"norm_position must be 'post' or 'pre' (BERT, GPT-3) or 'parallel' (GPT-J), "
                f"got {self.norm_position!r}"
            )
        check_norm(self.norm)
        if self.mlp.dim != self.attention.dim:
            raise ValueError(
                f"the MLP's width ({self.mlp.dim}) must equal the attention's "
                f"({self.attention.dim})"
            )
        if self.attention.is_cross:
            raise ValueError("a block's first attention is a self-attention (context_dim None)")
        if self.cross_attention is not None:
            if not self.cross_attention.is_cross:
                raise ValueError("cross_attention needs a context_dim (see AttentionSpec.cross)")
            if self.norm_position != "pre":
                raise ValueError(
                    f"a cross-attention needs norm_position 'pre', got {self.norm_position!r}"
                )
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"block dropout must be in [0, 1), got {self.dropout}")

    @property
    def dim(self) -> int:
        """D, the width of the residual stream."""
        return self.attention.dim

    def with_fused(
        self,
        fused: bool = True,
        implementation: str | None = None,
        *,
        kernel_has_dropout: bool = True,
    ) -> BlockSpec:
        """This block with its attentions on (or off) the fused kernel path (the training path
        on accelerators).

        ``kernel_has_dropout``: whether the framework's kernel drops attention probabilities
        (torch's ``scaled_dot_product_attention`` does; ``jax.nn.dot_product_attention`` and
        ``keras.ops.dot_product_attention`` do not). Without it, an attention with
        ``dropout > 0`` stays on the explicit path, which computes the same function, so that a
        model with attention dropout (BERT's 0.1) trains on a GPU instead of being refused."""

        def kernel(spec: AttentionSpec | None) -> AttentionSpec | None:
            if spec is None:
                return None
            on = fused and (kernel_has_dropout or not spec.dropout)
            return dataclasses.replace(spec, fused=on, fused_implementation=implementation)

        return dataclasses.replace(
            self, attention=kernel(self.attention), cross_attention=kernel(self.cross_attention)
        )

    def check_length(self, length: int | None) -> None:
        """See :meth:`AttentionSpec.check_length` (the self-attention's ``max_positions``)."""
        self.attention.check_length(length)
