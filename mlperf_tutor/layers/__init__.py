"""Shared building blocks: ``spec`` (framework-free: what a transformer block is) and one package
per framework, ``torch``, ``jax`` and ``tf``, with the same file and class names."""
