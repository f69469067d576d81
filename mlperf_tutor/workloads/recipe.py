"""The MLPerf run rules of a workload, as plain values: :class:`Recipe` (framework-free).

A workload's ``recipe(cfg)`` says how a run of that config is held to MLPerf's rules: the MLPerf
benchmark it is logged as, the quality that ends it, how often it is evaluated, the checkpoint it
starts from, what the log counts, and the hyperparameters the log states. The training loop
(:mod:`mlperf_tutor.train`) and the MLPerf log (:mod:`mlperf_tutor.mlperf.mllog`) read only this;
a workload with no rules (the toy model, GPT-J) has the empty ``Recipe()``: no log, no evaluation,
a run from the initial weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from mlperf_tutor.core.config import Config
from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec


@dataclasses.dataclass(frozen=True)
class Target:
    """One quality bar: ``metric`` at ``value``, reached from below (accuracies) or from above
    (losses such as GPT-3's log perplexity, or stable_diffusion's FID).

    Attributes:
        metric: the name of the metric, as the workload's ``evaluate`` reports it.
        value: the bar.
        higher_is_better: reached when the metric is at least ``value`` (else at most).
    """

    metric: str
    value: float
    higher_is_better: bool = True

    def reached(self, metrics: Mapping[str, float]) -> bool:
        """Whether ``metrics[self.metric]`` is at the bar."""
        quality = metrics[self.metric]
        return quality >= self.value if self.higher_is_better else quality <= self.value


@dataclasses.dataclass(frozen=True)
class CheckpointStart:
    """The checkpoint a run starts from (MLPerf's GPT-3 rule), made here by training before
    the run's clock starts.

    Attributes:
        steps: optimizer steps of the checkpoint, on batches ``seed + 1 + step``; the run's
            batches continue after them.
        optimizer: the optimizer of those steps.
        schedule: their learning-rate schedule.
        config: the model that made the checkpoint. Llama 2 LoRA pretrains its base without
            adapters: the run takes the weights the two share and initialises the rest.
        continues: the run continues the checkpoint's optimizer state and step count (GPT-3
            resumes pretraining); False: it starts a fresh optimizer at step 0 (fine-tuning).
    """

    steps: int
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    config: Config
    continues: bool = True

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(
                f"a start checkpoint needs at least 1 step (init_checkpoint_step), got "
                f"{self.steps}; a run from the initial weights has no CheckpointStart"
            )


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a run of one config follows the MLPerf rules.

    Attributes:
        benchmark: the MLPerf ``submission_benchmark`` (None: not an MLPerf benchmark, so a run
            writes no MLPerf log).
        targets: the bars an evaluation must all reach to end the run; the first is the
            quality (what ``evaluate`` returns, or the key of its dict that the run records,
            and what ``--target`` replaces). Empty: the workload is never evaluated.
        eval_every: training samples between two evaluations, or a function of the global
            batch size giving them (BERT's MLPerf rule); see :meth:`eval_every_samples`.
        checkpoint: the checkpoint a run starts from; None: the initial weights.
        units_per_sample: what one training sample counts for in the log's ``epoch_num`` and
            ``train_samples``: 1 (samples), or tokens per sequence where MLPerf counts tokens.
        hyperparameters: MLPerf log key -> value of the hyperparameters the closed division's
            rules name (beyond ``global_batch_size``, ``gradient_accumulation_steps`` and
            ``seed``, which the training loop logs); read-only.
    """

    benchmark: str | None = None
    targets: tuple[Target, ...] = ()
    eval_every: int | Callable[[int], int] | None = None
    checkpoint: CheckpointStart | None = None
    units_per_sample: int = 1
    hyperparameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "hyperparameters", MappingProxyType(dict(self.hyperparameters)))
        if self.targets and self.eval_every is None:
            raise ValueError("a recipe with targets needs eval_every (when to evaluate)")
        if isinstance(self.eval_every, int) and self.eval_every < 1:
            raise ValueError(f"eval_every_samples must be at least 1, got {self.eval_every}")
        if self.units_per_sample < 1:
            raise ValueError(f"units_per_sample must be at least 1, got {self.units_per_sample}")

    @property
    def evaluated(self) -> bool:
        """Whether a run is evaluated (the recipe has a target)."""
        return bool(self.targets)

    @property
    def quality_metric(self) -> str | None:
        """The metric of the first target (None: not evaluated)."""
        return self.targets[0].metric if self.targets else None

    @property
    def target(self) -> float | None:
        """The value of the first target (None: not evaluated)."""
        return self.targets[0].value if self.targets else None

    @property
    def start_step(self) -> int:
        """Optimizer steps of the start checkpoint; 0: a run starts from the initial weights."""
        return 0 if self.checkpoint is None else self.checkpoint.steps

    def eval_every_samples(self, batch_size: int) -> int:
        """Training samples between two evaluations at ``batch_size`` examples per step."""
        if self.eval_every is None:
            raise ValueError("this recipe has no evaluation (no target)")
        if callable(self.eval_every):
            return self.eval_every(batch_size)
        return self.eval_every

    def with_target(self, value: float) -> Recipe:
        """The recipe with the first target at ``value`` (the other bars unchanged)."""
        if not self.targets:
            raise ValueError("this recipe has no target to replace")
        first = dataclasses.replace(self.targets[0], value=value)
        return dataclasses.replace(self, targets=(first, *self.targets[1:]))

    def quality_reached(self, metrics: Mapping[str, float]) -> bool:
        """Whether an evaluation's ``metrics`` end the run: every target reached."""
        return all(target.reached(metrics) for target in self.targets)


__all__ = ["CheckpointStart", "Recipe", "Target"]
