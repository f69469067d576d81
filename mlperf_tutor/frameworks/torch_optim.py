"""The torch-side pieces of the PyTorch optimizers: LAMB, the schedule, clipping, construction.

:mod:`mlperf_tutor.frameworks.torch` wraps these into the adapter's ``Optimizer``; this module
works on tensors only (no numpy), so it can be read next to ``torch.optim`` itself. The numbers
are those of :class:`mlperf_tutor.core.OptimizerSpec` (see its docstring) and of the numpy oracle
:mod:`mlperf_tutor.core.reference`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec


def scalar_dtype() -> torch.dtype:
    """The dtype ``torch.optim`` gives its per-parameter ``step`` counters (non-fused)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019, https://arxiv.org/abs/1904.00962) with MLPerf BERT semantics.

    Per parameter, with ``t`` the 1-based update count: Adam moments with bias correction,
    ``u = m_hat / (sqrt(v_hat) + eps) + weight_decay * p``, trust ratio ``r = |p| / |u|`` when
    both norms are positive (else 1) and ``p -= lr * r * u``. The MLPerf BERT reference
    (``language_model/tensorflow/bert/optimization.py``) turns both weight decay and the trust
    ratio off for the parameters matched by ``exclude_from_weight_decay``; here that is a group
    with ``weight_decay=0`` and ``trust_ratio=False``.

    Args:
        params: parameters or parameter groups (groups may set ``trust_ratio``).
        lr: learning rate.
        betas: ``(beta1, beta2)`` of the moment averages.
        eps: added to ``sqrt(v_hat)``.
        weight_decay: coefficient of ``p`` added to the update (before the trust ratio).
        trust_ratio: whether the layer-wise trust ratio applies (default of every group).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        trust_ratio: bool = True,
    ):
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "trust_ratio": trust_ratio,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                if not state:
                    # Same layout as torch.optim.Adam's state, so loading code is shared.
                    state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = int(state["step"].item())  # a CPU tensor, as in non-capturable Adam
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                m_hat = m / (1.0 - beta1**t)
                v_hat = v / (1.0 - beta2**t)
                update = m_hat / (v_hat.sqrt() + eps)
                if wd != 0.0:
                    update.add_(p, alpha=wd)
                if group["trust_ratio"]:
                    w_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    # torch.where instead of .item(): no host sync on accelerators.
                    ratio = torch.where(
                        (w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm)
                    )
                    update.mul_(ratio * lr)
                else:
                    update.mul_(lr)
                p.sub_(update)
        return loss


class ScheduleLR(torch.optim.lr_scheduler.LRScheduler):
    """Sets every group's learning rate to ``schedule.lr_at(step)`` for update ``step``.

    ``last_epoch`` counts the updates done, so after ``n`` calls of ``optimizer.step()`` +
    ``scheduler.step()`` the groups hold the rate of update ``n`` (0-based). The rate is the
    schedule's own float, not ``base_lr * factor`` as with ``LambdaLR``, which would round.

    Args:
        optimizer: the optimizer whose groups' ``lr`` is set.
        schedule: the learning-rate schedule.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: ScheduleSpec):
        self.schedule = schedule
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [self.schedule.lr_at(self.last_epoch)] * len(self.optimizer.param_groups)

    def jump_to(self, step: int) -> None:
        """Continue the schedule at update ``step`` (after loading an optimizer state)."""
        self.last_epoch = step
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs

    def state_dict(self) -> dict[str, Any]:
        # The schedule is configuration, not state; leaving it out keeps the dict loadable by
        # torch.load(weights_only=True).
        return {k: v for k, v in super().state_dict().items() if k != "schedule"}


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.Tensor], clip_norm: float) -> torch.Tensor:
    """Scale the gradients in place by ``clip_norm / max(norm, clip_norm)``; return the norm.

    Not ``torch.nn.utils.clip_grad_norm_``: that scales by ``clip_norm / (norm + 1e-6)``, an
    epsilon the spec (TF and optax semantics) does not have. The norm is accumulated in float64
    like the numpy reference, and stays a tensor (no host sync).

    Args:
        params: tensors whose ``.grad`` is clipped (those without a gradient are skipped).
        clip_norm: the largest global L2 norm allowed.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    device = grads[0].device
    # Multi-tensor kernels, one group per (device, dtype): a few launches instead of three per
    # tensor, which on a GPU cost several percent of a small model's step.
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    norms = [
        n.to(device)
        for group in groups.values()
        for n in torch._foreach_norm(group, 2, torch.float64)
    ]
    norm = torch.linalg.vector_norm(torch.stack(norms))
    scale = clip_norm / torch.clamp(norm, min=clip_norm)
    for (group_device, dtype), group in groups.items():
        torch._foreach_mul_(group, scale.to(device=group_device, dtype=dtype))
    return norm


def build_native(
    spec: OptimizerSpec, named_params: dict[str, torch.Tensor], lr: float
) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer of ``spec``, with every argument passed explicitly.

    Parameters are split into a group with weight decay and one without (``spec.decays``); for
    LAMB the second group also has the trust ratio off.

    Args:
        spec: the optimizer.
        named_params: canonical name -> parameter.
        lr: initial learning rate (the scheduler sets it before every update).
    """
    decay = [p for name, p in named_params.items() if spec.decays(name)]
    keep = [p for name, p in named_params.items() if not spec.decays(name)]
    groups: list[dict[str, Any]] = []
    for params, decays in ((decay, True), (keep, False)):
        if params:
            group = {"params": params, "weight_decay": spec.weight_decay if decays else 0.0}
            if spec.name == "lamb":
                group["trust_ratio"] = decays
            groups.append(group)
    if spec.name == "lamb":
        return Lamb(
            groups,
            lr=lr,
            betas=(spec.beta1, spec.beta2),
            eps=spec.eps,
            weight_decay=spec.weight_decay,
            trust_ratio=True,
        )
    # foreach/fused None: torch picks the implementation for the device (same math).
    if spec.name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=lr,
            momentum=spec.momentum,
            dampening=0.0,
            weight_decay=spec.weight_decay,
            nesterov=spec.nesterov,
            maximize=False,
            foreach=None,
            differentiable=False,
            fused=None,
        )
    if spec.name == "adagrad":
        return torch.optim.Adagrad(
            groups,
            lr=lr,
            lr_decay=0.0,
            weight_decay=spec.weight_decay,
            initial_accumulator_value=spec.initial_accumulator,
            eps=spec.eps,
            foreach=None,
            maximize=False,
            differentiable=False,
            fused=None,
        )
    # On CUDA, Adam(W)'s fused kernel updates every tensor in one launch (same math; torch's
    # default there is the multi-tensor "foreach" path, several launches per step).
    on_cuda = all(p.is_cuda and p.is_floating_point() for p in named_params.values())
    adam_args = {
        "lr": lr,
        "betas": (spec.beta1, spec.beta2),
        "eps": spec.eps,
        "weight_decay": spec.weight_decay,
        "amsgrad": False,
        "foreach": None,
        "maximize": False,
        "capturable": False,
        "differentiable": False,
        "fused": True if on_cuda else None,
    }
    if spec.name == "adamw":
        return torch.optim.AdamW(groups, **adam_args)
    return torch.optim.Adam(groups, **adam_args, decoupled_weight_decay=False)
