"""Flax NNX layers by role, the same file and class names as ``layers/torch`` and ``layers/tf``.

- ``attention``: :class:`Attention` (self- or cross-attention) from an ``AttentionSpec``.
- ``mlp``: :class:`MLP` from an ``MlpSpec``; ``ACTIVATIONS`` and ``get_activation``.
- ``block``: :class:`TransformerBlock` from a ``BlockSpec``.
- ``norms``: ``RMSNorm``, ``BatchNorm`` with PyTorch's numbers, ``make_norm``.
- ``rotary``: ``apply_rotary``.
- ``lora``: ``LoRALinear`` and ``make_linear``.
- ``conv``: Stable Diffusion's UNet blocks (``ResnetBlock``, ``SpatialTransformer``, ...).
- ``losses``: ``next_token_loss``.

The specs are in :mod:`mlperf_tutor.layers.spec`.
"""
