"""Shared building blocks: the framework-free specs (``spec.py``) and, per framework, the
packages ``torch``, ``jax`` and ``tf`` with the same files by role (attention, mlp, block, norms,
rotary, lora, conv, losses)."""
