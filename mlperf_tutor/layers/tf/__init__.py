"""Keras 3 (TensorFlow backend) layers with the numbers of the PyTorch ones, by role.

The same file and class names as ``layers/torch`` and ``layers/jax``:

* ``attention.py``: :class:`Attention` (self- or cross-attention) and its masks.
* ``mlp.py``: :class:`MLP`, ``ACTIVATIONS`` and ``get_activation``.
* ``block.py``: :class:`TransformerBlock`, built from one ``layers.spec.BlockSpec``.
* ``norms.py``: ``BatchNorm``, ``RMSNorm`` and ``make_norm``.
* ``rotary.py``: ``apply_rotary`` and ``math_dtype``.
* ``lora.py``: ``LoRALinear`` and ``make_linear``.
* ``conv.py``: Stable Diffusion's UNet blocks (``PaddedConv2D``, ``ResnetBlock``,
  ``SpatialTransformer``, ...).
* ``losses.py``: ``next_token_loss``.

Importing this package imports nothing; each module imports the TF adapter (which sets
``KERAS_BACKEND``) before Keras.
"""
