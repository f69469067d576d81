"""Framework-neutral optimizer and learning-rate schedule specifications.

An :class:`OptimizerSpec` plus a :class:`ScheduleSpec` fix every number of a training update, so
that the PyTorch, JAX and TensorFlow realisations (``mlperf_tutor.frameworks.*``) and the numpy
oracle (:mod:`mlperf_tutor.core.reference`) compute the same thing. Semantics follow PyTorch's
``torch.optim`` where PyTorch has the optimizer, and the MLPerf BERT reference for LAMB
(mlcommons/training ``language_model/tensorflow/bert/optimization.py``).

Canonical optimizer state (what moves between frameworks) is a flat ``dict[str, np.ndarray]``:
``"step"`` (int64 scalar, number of updates applied) and one entry per parameter and slot,
keyed ``f"{slot}/{param_name}"`` (see :func:`state_key`). Slots use PyTorch's state names:

==========  =============================
optimizer   slots
==========  =============================
sgd         ``momentum_buffer`` (only when momentum > 0)
adam(w)     ``exp_avg``, ``exp_avg_sq``
lamb        ``exp_avg``, ``exp_avg_sq``
adagrad     ``sum``
==========  =============================
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad", "lamb")
DECAYS = ("constant", "polynomial", "cosine")

# MLPerf BERT reference: `exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"]`.
BERT_NO_DECAY = ("LayerNorm", "layer_norm", "bias")


def state_key(slot: str, param_name: str) -> str:
    """Canonical key of one optimizer slot of one parameter, e.g. ``exp_avg/fc.weight``."""
    return f"{slot}/{param_name}"


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """Learning rate as a function of the update count ``step`` (0 for the first update).

    Warmup (when ``warmup_steps > 0``): with ``s = step - start_warmup_step``, while
    ``s < warmup_steps`` the rate is ``lr * (f + (1 - f) * s / warmup_steps)`` where
    ``f = warmup_init_factor``. A negative ``start_warmup_step`` (MLPerf BERT) starts the warmup
    part-way through.

    After warmup:
      * ``constant``: ``lr``.
      * ``polynomial``: ``(lr - end_lr) * (1 - min(step, total_steps) / total_steps) ** power +
        end_lr``, counted from step 0 as in the MLPerf BERT reference.
      * ``cosine``: ``end_lr + (lr - end_lr) * (1 + cos(pi * p)) / 2`` with
        ``p = clip((step - w) / (total_steps - w), 0, 1)`` and ``w = warmup_steps +
        start_warmup_step``, as Megatron-LM (MLPerf GPT-3) counts from the end of warmup.

    Args:
        lr: peak learning rate.
        warmup_steps: length of the linear warmup; 0 disables it.
        start_warmup_step: step at which the warmup's counter is 0 (may be negative).
        warmup_init_factor: fraction of ``lr`` at the start of warmup (SD's LambdaLinear: 1e-6).
        decay: ``"constant"``, ``"polynomial"`` or ``"cosine"``.
        total_steps: step at which the decay reaches ``end_lr`` (required for decays).
        power: exponent of the polynomial decay.
        end_lr: final rate of the decay (the cosine floor).
    """

    lr: float
    warmup_steps: int = 0
    start_warmup_step: int = 0
    warmup_init_factor: float = 0.0
    decay: Literal["constant", "polynomial", "cosine"] = "constant"
    total_steps: int = 0
    power: float = 1.0
    end_lr: float = 0.0

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ValueError(f"unknown schedule decay {self.decay!r}; choose one of {DECAYS}")
        if self.decay != "constant" and self.total_steps <= 0:
            raise ValueError(f"a {self.decay!r} decay needs total_steps > 0")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if self.start_warmup_step > 0:
            raise ValueError("start_warmup_step must be <= 0 (it would give negative rates)")

    def lr_at(self, step: int) -> float:
        """The learning rate of update ``step`` (a Python float, computed in float64)."""
        s = step - self.start_warmup_step
        if self.warmup_steps > 0 and s < self.warmup_steps:
            f = self.warmup_init_factor
            return self.lr * (f + (1.0 - f) * s / self.warmup_steps)
        if self.decay == "constant":
            return self.lr
        if self.decay == "polynomial":
            frac = min(step, self.total_steps) / self.total_steps
            return (self.lr - self.end_lr) * (1.0 - frac) ** self.power + self.end_lr
        w = self.warmup_steps + self.start_warmup_step if self.warmup_steps > 0 else 0
        p = min(max((step - w) / max(self.total_steps - w, 1), 0.0), 1.0)
        return self.end_lr + (self.lr - self.end_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer, with every number explicit.

    Update rules (``g`` the gradient after clipping, ``p`` the parameter, ``lr`` from the schedule,
    ``t`` the 1-based update count):

    * ``sgd``: ``g += wd*p``; with momentum ``b = momentum*b + g`` and ``g = g + momentum*b``
      (nesterov) or ``g = b``; ``p -= lr*g`` (``torch.optim.SGD``, dampening 0).
    * ``adam``: ``g += wd*p`` (L2, as ``torch.optim.Adam``); ``m = b1*m + (1-b1)*g``,
      ``v = b2*v + (1-b2)*g**2``; ``p -= lr * (m/(1-b1**t)) / (sqrt(v/(1-b2**t)) + eps)``
      (epsilon outside the square root, unlike Keras' "epsilon hat").
    * ``adamw``: ``p *= 1 - lr*wd`` (decoupled, as ``torch.optim.AdamW``), then Adam without L2.
    * ``adagrad``: ``g += wd*p``; ``s += g**2`` (``s`` starts at ``initial_accumulator``);
      ``p -= lr * g / (sqrt(s) + eps)`` (``torch.optim.Adagrad``, no lr decay).
    * ``lamb``: Adam moments with bias correction; ``u = m_hat/(sqrt(v_hat) + eps) + wd*p``;
      ``r = |p|/|u|`` when both norms are positive, else 1; ``p -= lr*r*u`` (MLPerf BERT).

    ``no_decay`` holds regular expressions searched in the canonical parameter name; a match
    turns weight decay off for that parameter and, for LAMB, the trust ratio too (the MLPerf BERT
    reference uses one list for both). ``clip_norm`` clips the global gradient norm first:
    ``g *= clip_norm / max(norm, clip_norm)`` (TF/optax semantics, no epsilon).
    """

    name: Literal["sgd", "adam", "adamw", "adagrad", "lamb"]
    momentum: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    initial_accumulator: float = 0.0
    no_decay: tuple[str, ...] = ()
    clip_norm: float | None = None

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; choose one of {OPTIMIZERS}")
        if self.nesterov and (self.name != "sgd" or self.momentum <= 0):
            raise ValueError("nesterov needs optimizer 'sgd' with momentum > 0")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError("clip_norm must be positive or None")

    @property
    def slots(self) -> tuple[str, ...]:
        """Names of the per-parameter state slots of this optimizer."""
        if self.name == "sgd":
            return ("momentum_buffer",) if self.momentum > 0 else ()
        if self.name == "adagrad":
            return ("sum",)
        return ("exp_avg", "exp_avg_sq")

    def decays(self, param_name: str) -> bool:
        """Whether weight decay (and LAMB's trust ratio) applies to ``param_name``."""
        return not any(re.search(pattern, param_name) for pattern in self.no_decay)

    def initial_slot_value(self, slot: str) -> float:
        """The value every element of ``slot`` starts at."""
        return self.initial_accumulator if slot == "sum" else 0.0
