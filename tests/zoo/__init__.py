"""A zoo of third-party models, each with its own recipe, for testing the port as users meet it.

Each :class:`Entry` builds a model written by another project (transformers models from small
configs, ``torch.nn`` recurrent and encoder models, a nanoGPT-style decoder) and carries the
step its recipe trains with: the optimizer and its parameter groups, the scheduler, the loss
(with label smoothing where the recipe smooths) and the step options around them (gradient
clipping, accumulation, autocast), declared as data. :func:`run` hands all of it to
``mlperf_tutor.migrate.verify``; an option that ``verify`` does not accept is reported as a
refusal, never dropped, so no entry is checked on a step that differs from its recipe's.

Used by tests/test_migrate_zoo.py and benchmarks/migrate_zoo.py.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .recipes import STEPS


@dataclasses.dataclass(frozen=True)
class Entry:
    """One zoo model and its recipe.

    Attributes:
        name: the zoo's name for it (test ids, the benchmark's table).
        model: builds the model in train mode (seeded inside).
        batch: ``batch(seed) -> dict`` of numpy arrays, one micro-batch.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the forward included.
        optimizer: ``optimizer(model)``, the recipe's optimizer over the recipe's groups.
        scheduler: ``scheduler(optimizer)`` or None, stepped once per optimizer step.
        recipe: where the recipe comes from (paper, script, config).
        clip_grad_norm: ``torch.nn.utils.clip_grad_norm_``'s max norm before each update.
        accumulate: micro-batches per optimizer step (the loss of each divided by it).
        autocast: ``"bf16"`` when the recipe runs the forward under ``torch.autocast``.
        tied: groups of parameter names that are one ``Parameter`` in the model.
        refusal: for an expected refusal, a regex its message must match (naming the op,
            module or feature); None when the entry must pass ``verify``.
    """

    name: str
    model: Callable[[], torch.nn.Module]
    batch: Callable[[int], dict[str, np.ndarray]]
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor]
    optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]
    scheduler: Callable[[torch.optim.Optimizer], Any] | None
    recipe: str
    clip_grad_norm: float | None = None
    accumulate: int = 1
    autocast: str | None = None
    tied: tuple[tuple[str, ...], ...] = ()
    refusal: str | None = None

    def step_options(self) -> dict[str, Any]:
        """The step options the recipe uses, as keyword arguments for ``verify``."""
        options = {}
        if self.clip_grad_norm is not None:
            options["clip_grad_norm"] = self.clip_grad_norm
        if self.accumulate != 1:
            options["accumulate"] = self.accumulate
        if self.autocast is not None:
            options["autocast"] = self.autocast
        return options

    def build(self):
        """(model, optimizer, scheduler), freshly seeded."""
        torch.manual_seed(0)
        model = self.model().train()
        optimizer = self.optimizer(model)
        scheduler = self.scheduler(optimizer) if self.scheduler else None
        return model, optimizer, scheduler

    def micro_batches(self, step: int) -> list[dict[str, np.ndarray]]:
        """The ``accumulate`` micro-batches of optimizer step ``step``, in order."""
        k = self.accumulate
        return [self.batch(seed) for seed in range(step * k, (step + 1) * k)]

    def batches(self, steps: int = STEPS) -> list[dict[str, np.ndarray]]:
        """One batch per optimizer step: its micro-batches joined along the leading axis, as
        ``verify(..., accumulate=k)`` takes them (it splits each into k, as ``chunk(k)``)."""
        return [
            {key: np.concatenate([m[key] for m in micro]) for key in micro[0]}
            for micro in map(self.micro_batches, range(steps))
        ]


def as_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def torch_step(entry: Entry, model, optimizer, scheduler, micro_batches) -> float:
    """One step of the recipe in torch, as its training loop writes it: autocast forward,
    accumulated backward, clipping, update, scheduler. Returns the step's mean loss."""
    dtypes = {None: None, "bf16": torch.bfloat16}
    if entry.autocast not in dtypes:
        raise ValueError(f"{entry.name}: autocast={entry.autocast!r}; the zoo knows {dtypes}")
    optimizer.zero_grad()
    total = 0.0
    for batch in micro_batches:
        dtype = dtypes[entry.autocast]
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = entry.loss_fn(model, as_torch(batch))
        (loss / entry.accumulate).backward()
        total += float(loss.detach()) / entry.accumulate
    if entry.clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), entry.clip_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return total


@dataclasses.dataclass
class Result:
    """What ``verify`` said about one entry.

    Attributes:
        name: the entry's name.
        status: ``"pass"``, ``"fail"`` (verify ran and the steps diverged, or it raised) or
            ``"refused"`` (the recipe needs a ``verify`` option that does not exist).
        error: the exception's type name ("" on a pass).
        message: the first line of its message, or the divergence found.
        report: verify's report when it ran to the end.
        exception: the exception itself, when one was raised.
    """

    name: str
    status: str
    error: str = ""
    message: str = ""
    report: Any = None
    exception: BaseException | None = None


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, with the next one when the first ends in a
    colon (``unsupported PyTorch op in the exported graph:`` names the op on the next)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [""]
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]


def _divergence(report) -> str:
    """The first step past the bars, in one line."""
    from mlperf_tutor.core.parity import OUTPUT_ATOL, STEP_RTOL

    for row in report.rows:
        if row["loss diff"] > OUTPUT_ATOL or row["worst rel"] > STEP_RTOL:
            return (
                f"diverged at step {row['step']}: {row['worst param']} relative "
                f"{row['worst rel']:.2e}, loss diff {row['loss diff']:.2e}"
            )
    return ""


def run(entry: Entry, steps: int = STEPS, verify: Callable | None = None) -> Result:
    """``verify`` the entry's recipe for ``steps`` steps.

    The recipe's step options go to ``verify`` as keywords (``clip_grad_norm=1.0``, ...), and
    each step's batch joins its ``accumulate`` micro-batches along the leading axis. An option
    ``verify`` does not take is a refusal (status ``"refused"``): the step would differ from the
    recipe's.

    Args:
        entry: the zoo entry.
        steps: optimizer steps.
        verify: the function to call (default ``mlperf_tutor.migrate.verify``).
    """
    if verify is None:
        from mlperf_tutor.migrate import verify
    options = entry.step_options()
    accepted = inspect.signature(verify).parameters
    lacking = [k for k in options if k not in accepted]
    if lacking:
        wanted = ", ".join(f"{k}={options[k]!r}" for k in lacking)
        return Result(
            entry.name,
            "refused",
            "MissingOption",
            f"verify has no {' / '.join(lacking)} option (the recipe uses {wanted})",
        )
    model, optimizer, scheduler = entry.build()
    try:
        report = verify(
            model,
            optimizer,
            entry.loss_fn,
            entry.batches(steps),
            scheduler,
            quiet=True,
            raise_on_failure=False,
            **options,
        )
    except Exception as e:  # the table reports every kind of refusal
        return Result(entry.name, "fail", type(e).__name__, first_line(e), exception=e)
    if report.ok:
        return Result(entry.name, "pass", report=report)
    return Result(entry.name, "fail", "VerificationError", _divergence(report), report=report)


def probe_migration(entry: Entry) -> tuple[str, str]:
    """``torch_to_jax`` on the entry without stepping: ("", "") when it migrates, else the
    exception's type and first line. For an entry that :func:`run` refuses for a missing
    option, this says what else stands in the way; no step is run, so nothing is compared."""
    from mlperf_tutor.migrate import torch_to_jax

    model, optimizer, scheduler = entry.build()
    try:
        torch_to_jax(model, optimizer, entry.loss_fn, entry.batch(0), scheduler)
    except Exception as e:  # reported, not handled
        return type(e).__name__, first_line(e)
    return "", ""


def zoo() -> dict[str, Entry]:
    """Every entry, by name."""
    from . import hf_text, hf_vision, nanogpt, torch_nn

    entries = [*hf_text.ENTRIES, *hf_vision.ENTRIES, *torch_nn.ENTRIES, *nanogpt.ENTRIES]
    return {e.name: e for e in entries}
