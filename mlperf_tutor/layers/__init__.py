"""Shared building blocks: ``spec.py`` (framework-free: what a transformer block is, and the
checks that belong to the model) and one package per framework, ``torch``, ``jax`` and ``tf``,
mirrored by role: ``attention``, ``mlp``, ``block``, ``norms``, ``rotary``, ``lora``, ``conv``
and ``losses``, with the same class names in each."""
