"""Shared building blocks per framework: ``torch_layers``, ``jax_layers`` and ``tf_layers``."""
