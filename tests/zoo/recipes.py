"""The optimizers, schedulers and losses that the zoo's recipes use, written once.

Each helper names the recipe it follows. Learning rates are the recipes' own where a tiny model
trains with them; where the recipe's rate is tuned for a large model and batch (5e-5 for a
fine-tune), the zoo's entry says what it uses instead. Schedules span :data:`STEPS` steps (the
length of a ``verify`` run) with :data:`WARMUP` warm-up steps.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STEPS = 10  # the length of a verify run, and of every schedule
WARMUP = 2  # warm-up steps of the schedules that have one


def seeded(cls, config):
    """A factory of ``cls(config)`` (a transformers model) built under ``torch.manual_seed(0)``."""

    def make():
        torch.manual_seed(0)
        return cls(config)

    return make


def trainer_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """transformers ``Trainer.create_optimizer``'s two groups: weight decay for every parameter
    but biases and normalisation weights (``Trainer.get_decay_parameter_names``). A tied
    parameter appears once (``named_parameters`` removes duplicates), as in the Trainer."""
    no_decay = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, nn.LayerNorm | nn.GroupNorm) or "Norm" in type(module).__name__
        for name, _ in module.named_parameters(recurse=False):
            if is_norm or name == "bias":
                no_decay.add(f"{module_name}.{name}" if module_name else name)
    decay, rest = [], []
    for name, p in model.named_parameters():
        (rest if name in no_decay else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]


def trainer_adamw(model: nn.Module, lr: float, weight_decay: float = 0.0, **kwargs):
    """The transformers Trainer default: ``torch.optim.AdamW`` (``optim="adamw_torch"``), betas
    (0.9, 0.999), eps 1e-8, over :func:`trainer_param_groups`."""
    return torch.optim.AdamW(trainer_param_groups(model, weight_decay), lr=lr, **kwargs)


def nanogpt_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT's ``configure_optimizers``: every parameter of two or more dimensions decays
    (matmul weights, embeddings), biases and LayerNorm weights do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Token or class cross-entropy over the last axis, -100 ignored (transformers' convention;
    the Trainer's ``label_smoothing_factor`` smooths the same way)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=-100,
        label_smoothing=label_smoothing,
    )


def tokens(seed: int, vocab: int, batch: int = 4, seq: int = 12) -> np.ndarray:
    """Token ids (B, T) int64, never 0 (0 is the zoo's padding id)."""
    return np.random.default_rng(seed).integers(1, vocab, (batch, seq), dtype=np.int64)


def images(seed: int, size: int, classes: int, batch: int = 4) -> dict[str, np.ndarray]:
    """``pixel_values`` (B, 3, size, size) float32 and ``labels`` (B,) int64."""
    rng = np.random.default_rng(seed)
    return {
        "pixel_values": rng.standard_normal((batch, 3, size, size), dtype=np.float32),
        "labels": rng.integers(0, classes, (batch,), dtype=np.int64),
    }
