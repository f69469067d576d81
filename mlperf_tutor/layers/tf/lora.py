"""Keras linear layers with optional LoRA adapters (Hu et al. 2021,
https://arxiv.org/abs/2106.09685), as ``layers/spec.py`` specifies them.

Dense kernels and biases are created as zeros: weights always come from ``load_canonical`` (a
workload's numpy ``init_canonical`` or a checkpoint), so no time goes into random numbers that
are overwritten.
"""

from __future__ import annotations

# The adapter first: it sets KERAS_BACKEND (and TF's log level) before Keras is imported.
from mlperf_tutor.frameworks import tf as _adapter  # noqa: F401

# isort: split
import keras

from mlperf_tutor.layers.spec import Lora


def _dense(units: int, bias: bool, name: str, dtype) -> keras.layers.Dense:
    return keras.layers.Dense(
        units, use_bias=bias, kernel_initializer="zeros", name=name, dtype=dtype
    )


class LoRALinear(keras.layers.Dense):
    """A Dense layer plus a LoRA adapter: ``dense(x) + scaling * lora_b(lora_a(dropout(x)))``.

    A Dense subclass, so the adapter's Dense rule maps ``kernel`` and ``bias`` to the plain
    canonical ``weight`` and ``bias``; the children ``lora_a`` (in -> r) and ``lora_b``
    (r -> out), Dense layers without bias, give ``lora_a.weight`` and ``lora_b.weight``. Not
    Keras' own ``Dense.enable_lora``: its ``lora_kernel_a``/``_b`` are leaves of the Dense
    itself, which freezes its kernel as a side effect and has no adapter dropout. Freezing the
    base is the model's business (``set_trainable`` of the adapter).

    Args:
        units: output width.
        bias: whether the base layer has a bias.
        lora: the adapter's rank, alpha and dropout.
        **kwargs: Keras layer arguments (``name``, ``dtype``).

    Shapes:
        x: (..., in) -> (..., units).
    """

    def __init__(self, units: int, *, bias: bool, lora: Lora, **kwargs):
        super().__init__(units, use_bias=bias, kernel_initializer="zeros", **kwargs)
        dtype = self.dtype_policy
        self.scaling = lora.scaling
        self.lora_a = _dense(lora.rank, False, "lora_a", dtype)
        self.lora_b = _dense(units, False, "lora_b", dtype)
        self.lora_dropout = keras.layers.Dropout(lora.dropout, name="lora_dropout", dtype=dtype)

    def build(self, input_shape):
        # All variables at once, so that a built layer can be loaded before its first call.
        super().build(input_shape)
        self.lora_a.build(input_shape)
        self.lora_b.build((*input_shape[:-1], self.lora_a.units))

    def call(self, x, training=False):
        update = self.lora_b(self.lora_a(self.lora_dropout(x, training=training)))  # (..., out)
        return super().call(x) + self.scaling * update


def make_linear(
    name: str, units: int, *, bias: bool, lora: Lora | None, dtype
) -> keras.layers.Dense:
    """A Dense layer called ``name`` (zeros), or a :class:`LoRALinear` when ``lora`` targets
    ``name``."""
    if lora is not None and lora.applies_to(name):
        return LoRALinear(units, bias=bias, lora=lora, name=name, dtype=dtype)
    return _dense(units, bias, name, dtype)
