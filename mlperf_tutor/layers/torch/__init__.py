"""PyTorch layers, one file per role (the same file and class names as ``layers/jax`` and
``layers/tf``): ``attention`` (Attention), ``mlp`` (MLP, activations), ``block``
(TransformerBlock), ``norms`` (RMSNorm, make_norm), ``rotary`` (apply_rotary), ``lora``
(LoRALinear, make_linear), ``conv`` (Stable Diffusion's UNet blocks) and ``losses``
(next_token_loss). Attention, MLP and TransformerBlock take their spec from ``layers/spec.py``.
"""
