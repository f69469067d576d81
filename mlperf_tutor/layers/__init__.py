"""Shared building blocks: ``spec.py`` (framework-free specs of the transformer block) and one
package per framework, ``torch``, ``jax`` and ``tf``, with the same file and class names."""
