"""The transformer block in Keras, built from one :class:`~mlperf_tutor.layers.spec.BlockSpec`,
with the numbers of ``layers/torch/block.py``: post-LN (BERT), pre-LN (GPT-3, Llama 2, Stable
Diffusion; Xiong et al. 2020, https://arxiv.org/abs/2002.04745) or parallel attention and MLP
(GPT-J; Wang & Komatsuzaki 2021, https://github.com/kingoflolz/mesh-transformer-jax)."""

from __future__ import annotations

import dataclasses

# The adapter first: it sets KERAS_BACKEND (and TF's log level) before Keras is imported.
from mlperf_tutor.frameworks import tf as _adapter  # noqa: F401

# isort: split
import keras
import tensorflow as tf

from mlperf_tutor.layers.spec import BlockSpec, MlpSpec
from mlperf_tutor.layers.tf.attention import Attention, attention_spec_from_config
from mlperf_tutor.layers.tf.mlp import MLP
from mlperf_tutor.layers.tf.norms import make_norm


def block_spec_from_config(config: dict) -> BlockSpec:
    """The :class:`BlockSpec` of a ``dataclasses.asdict`` dict (``TransformerBlock.get_config``)."""
    cross = config.get("cross_attention")
    return BlockSpec(
        **{
            **config,
            "attention": attention_spec_from_config(config["attention"]),
            "mlp": MlpSpec(**config["mlp"]),
            "cross_attention": None if cross is None else attention_spec_from_config(cross),
        }
    )


def check_input_length(spec: BlockSpec, tokens) -> None:
    """``spec.check_length`` of the time axis of ``tokens`` (B, T): a ValueError now when T is
    known; inside a shape-relaxed ``tf.function`` (``train_step``), where T is known only when
    the graph runs, a graph assertion that raises ``InvalidArgumentError`` then."""
    length = tokens.shape[1]
    spec.check_length(length)
    limit = spec.attention.max_positions
    if length is None and limit is not None:
        tf.debugging.assert_less_equal(
            tf.shape(tokens)[1], limit, message=f"the model takes at most max_positions = {limit}"
        )


class TransformerBlock(keras.layers.Layer):
    """The transformer block that ``spec`` describes (see :class:`~mlperf_tutor.layers.spec.
    BlockSpec` for the three norm positions): self-attention and MLP, each in a residual branch
    with a norm, and a pre-norm cross-attention branch between them when
    ``spec.cross_attention`` is set.

    Args:
        spec: the attention, MLP, norms, norm position, residual dropout and cross-attention.
        **kwargs: Keras layer arguments (``name``, ``dtype``).

    Shapes:
        x: (B, T, D); key_mask: (B, T) of 1/0 or None; context: (B, S, context_dim), given
        exactly when ``spec.cross_attention`` is set. Output (B, T, D).
    """

    def __init__(self, spec: BlockSpec, **kwargs):
        super().__init__(**kwargs)
        self.spec = spec
        dtype = self.dtype_policy
        self.attention = Attention(spec.attention, name="attention", dtype=dtype)
        self.attention_norm = make_norm(
            spec.norm, spec.norm_eps, name="attention_norm", dtype=dtype
        )
        self.cross_attention = None
        if spec.cross_attention is not None:
            self.cross_attention = Attention(
                spec.cross_attention, name="cross_attention", dtype=dtype
            )
            self.cross_attention_norm = make_norm(
                spec.norm, spec.norm_eps, name="cross_attention_norm", dtype=dtype
            )
        self.mlp = MLP(spec.mlp, name="mlp", dtype=dtype)
        if spec.norm_position != "parallel":  # the parallel MLP reads attention_norm's output
            self.mlp_norm = make_norm(spec.norm, spec.norm_eps, name="mlp_norm", dtype=dtype)
        self.dropout = keras.layers.Dropout(spec.dropout, name="dropout", dtype=dtype)

    def call(self, x, key_mask=None, context=None, training=False):
        if context is not None and self.cross_attention is None:
            raise ValueError(
                f"block {self.name!r} has no cross-attention (its spec's cross_attention is None)"
            )

        def drop(y):
            return self.dropout(y, training=training)

        position = self.spec.norm_position
        if position == "parallel":
            h = self.attention_norm(x)
            attended = drop(self.attention(h, key_mask, training=training))
            return x + attended + drop(self.mlp(h, training=training))
        if position == "pre":
            x = x + drop(self.attention(self.attention_norm(x), key_mask, training=training))
            if self.cross_attention is not None:
                h = self.cross_attention_norm(x)
                x = x + drop(self.cross_attention(h, context=context, training=training))
            return x + drop(self.mlp(self.mlp_norm(x), training=training))
        x = self.attention_norm(x + drop(self.attention(x, key_mask, training=training)))
        return self.mlp_norm(x + drop(self.mlp(x, training=training)))

    def get_config(self) -> dict:
        return {**super().get_config(), "spec": dataclasses.asdict(self.spec)}

    @classmethod
    def from_config(cls, config: dict) -> TransformerBlock:
        return super().from_config({**config, "spec": block_spec_from_config(config["spec"])})
