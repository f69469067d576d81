"""The transformer's feed-forward network in Keras, with the numbers of ``layers/torch/mlp.py``;
gated variants after Shazeer 2020 (https://arxiv.org/abs/2002.05202): SwiGLU (Llama 2) and GEGLU
(Stable Diffusion)."""

from __future__ import annotations

import dataclasses
import math

# The adapter first: it sets KERAS_BACKEND (and TF's log level) before Keras is imported.
from mlperf_tutor.frameworks import tf as _adapter  # noqa: F401

# isort: split
import keras
from keras import ops

from mlperf_tutor.layers.spec import MlpSpec, check_activation
from mlperf_tutor.layers.tf.lora import make_linear

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_exact(x):
    # PyTorch's formula. Not ops.gelu(approximate=False): tf.nn.gelu casts its constant 1/sqrt(2)
    # through float32, so float64 inputs get errors of 5e-9. A Python float multiplies exactly.
    return 0.5 * x * (1.0 + ops.erf(x * _SQRT_HALF))


def _gelu_tanh(x):
    # PyTorch's tanh approximation, written out for the same reason: tf.nn.gelu's 0.044715 is
    # cast through float32 as well.
    return 0.5 * x * (1.0 + ops.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


#: Activation name (``layers.spec.ACTIVATIONS``) -> function; the GELU approximation is explicit.
ACTIVATIONS = {
    "gelu": _gelu_exact,  # exact, with erf (BERT, GPT-3)
    "gelu_tanh": _gelu_tanh,  # GPT-2, GPT-J (HF gelu_new)
    "relu": ops.relu,
    "silu": ops.silu,
}


def get_activation(name: str):
    """The activation function called ``name`` (a key of :data:`ACTIVATIONS`)."""
    check_activation(name)
    return ACTIVATIONS[name]


class MLP(keras.layers.Layer):
    """The feed-forward network that ``spec`` describes (see :class:`~mlperf_tutor.layers.spec.
    MlpSpec`): ``fc_out(dropout(act(fc_in(x))))``, or gated ``fc_out(dropout(act(fc_gate(x)) *
    fc_in(x)))``.

    Args:
        spec: widths, activation, biases, dropout and gating.
        **kwargs: Keras layer arguments (``name``, ``dtype``).

    Shapes:
        x: (..., D) -> (..., D); inside (..., F).
    """

    def __init__(self, spec: MlpSpec, **kwargs):
        super().__init__(**kwargs)
        self.spec = spec
        # The function itself, as Keras expects of a layer's ``activation`` (Dense, remat).
        self.activation = get_activation(spec.activation)
        dtype, f = self.dtype_policy, spec.hidden
        self.fc_gate = (
            make_linear("fc_gate", f, bias=spec.bias, lora=None, dtype=dtype)
            if spec.gated
            else None
        )
        self.fc_in = make_linear("fc_in", f, bias=spec.bias, lora=None, dtype=dtype)
        self.fc_out = make_linear("fc_out", spec.dim, bias=spec.bias, lora=None, dtype=dtype)
        self.dropout = keras.layers.Dropout(spec.dropout, name="dropout", dtype=dtype)

    def call(self, x, training=False):
        if self.fc_gate is None:
            h = self.activation(self.fc_in(x))  # (..., F)
        else:
            h = self.activation(self.fc_gate(x)) * self.fc_in(x)  # (..., F)
        return self.fc_out(self.dropout(h, training=training))  # (..., D)

    def get_config(self) -> dict:
        return {**super().get_config(), "spec": dataclasses.asdict(self.spec)}

    @classmethod
    def from_config(cls, config: dict) -> MLP:
        return super().from_config({**config, "spec": MlpSpec(**config["spec"])})
