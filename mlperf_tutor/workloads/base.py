"""The workload interface: what the CLI, parity, convert, train and the notebooks rely on."""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from mlperf_tutor import frameworks
from mlperf_tutor.core.checkpoint import Tree, tree_specs
from mlperf_tutor.core.config import Config
from mlperf_tutor.core.interop import HfInterop
from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec


class Workload:
    """One workload, implemented in every framework.

    Subclasses set ``name``, ``config_class``, ``package`` (the module path holding
    ``torch_model``, ``jax_model`` and ``tf_model``, each with a ``build(cfg)`` function) and
    implement the analytic and numpy-side methods. Framework-side methods are generic: they go
    through the framework adapter (``mlperf_tutor.frameworks``).

    A workload is the :class:`~mlperf_tutor.core.interop.CheckpointOwner` that
    ``mlperf_tutor.convert`` asks for what only the model knows: ``canonical_specs``, the Keras
    ``.weights.h5`` files of its TF model (:meth:`read_keras_weights`,
    :meth:`write_keras_weights`) and, for workloads with a public checkpoint naming, ``hf``: an
    :class:`~mlperf_tutor.core.interop.HfInterop` built in the workload's ``hf.py``
    (framework-free), whose ``config_from_hf``, ``config_to_hf``, ``load_pretrained`` and
    ``save_pretrained`` map Hugging Face names and configs, and whose ``architecture`` names the
    config fields a checkpoint fixes. ``convert`` then reads and writes ``save_pretrained``
    directories wherever a checkpoint path is accepted.
    """

    name: str = ""
    description: str = ""
    config_class: type[Config] = Config
    package: str = ""
    hf: HfInterop | None = None  # Hugging Face naming; None: no save_pretrained directories
    # MLPerf: ``mlperf_benchmark`` is the ``submission_benchmark`` name (None: not an MLPerf
    # benchmark, so no MLPerf log and ``hyperparameters`` is never called). ``quality_target`` is
    # the value of ``quality_metric`` that ends a run (None: the workload is never evaluated, and
    # the eval methods are never called).
    mlperf_benchmark: str | None = None
    quality_metric: str = ""
    quality_target: float | None = None
    # Accuracy-like metrics end a run when they reach the target from below; losses such as
    # GPT-3's log perplexity when they fall to it.
    quality_higher_is_better: bool = True

    # --- framework-free -------------------------------------------------------------------
    def config(self, preset: str = "tiny", **overrides) -> Config:
        """The frozen config of ``preset`` with field overrides (unknown names raise)."""
        return self.config_class.preset(preset, **overrides)

    @property
    def presets(self) -> list[str]:
        return list(self.config_class.PRESETS)

    def config_from_hf(self, hf_config: Any, **kwargs) -> Config:
        """The config of a Hugging Face model: its architecture from ``hf_config``, the rest
        from a preset.

        Args:
            hf_config: a transformers config object, its dict, a ``config.json`` path or a
                ``save_pretrained`` directory.
            **kwargs: ``preset=`` and field overrides, as the workload's
                ``hf.config_from_hf`` takes them.

        Raises:
            ValueError: the workload has no Hugging Face interop, or the model is not of its
                architecture (the message names the field).
        """
        if self.hf is None:
            raise ValueError(f"workload {self.name!r} has no Hugging Face interop")
        return self.hf.config_from_hf(hf_config, **kwargs)

    def param_count(self, cfg: Config) -> int:
        """Number of trainable parameters, computed analytically (no allocation)."""
        raise NotImplementedError

    def synthetic_batch(self, cfg: Config, batch_size: int = 2, seed: int = 0) -> dict:
        """A seeded batch of the right shapes, dtypes and ranges (numpy arrays)."""
        raise NotImplementedError

    def init_canonical(self, cfg: Config, seed: int = 0) -> Tree:
        """Initial weights in canonical names and layouts, from the config's init ranges."""
        raise NotImplementedError

    def parity_weights(self, cfg: Config, seed: int = 0) -> Tree:
        """The weights parity runs compare frameworks on: :meth:`init_canonical` unless a
        workload's init would hide differences (stable_diffusion zeroes its output layers)."""
        return self.init_canonical(cfg, seed=seed)

    def deterministic(self, cfg: Config) -> Config:
        """``cfg`` with every source of randomness in the forward (dropout) turned off, as
        parity runs need; workloads with dropout override this."""
        return cfg

    def canonical_specs(self, cfg: Config) -> dict[str, tuple[tuple[int, ...], str]]:
        """Canonical name -> (shape, dtype name) of every weight; workloads with large presets
        override this to avoid allocating."""
        return tree_specs(self.init_canonical(cfg))

    def optimizer(self, cfg: Config) -> tuple[OptimizerSpec, ScheduleSpec]:
        """The workload's optimizer and learning-rate schedule."""
        raise NotImplementedError

    def info(self, cfg: Config) -> dict[str, Any]:
        """Facts for ``mlperf-tutor info``: parameters, memory, FLOPs; nothing allocated."""
        n = self.param_count(cfg)
        return {
            "workload": self.name,
            "parameters": n,
            "fp32 weights (GB)": n * 4 / 1e9,
            "fp32 weights + grads + Adam state (GB)": n * 16 / 1e9,
        }

    # --- MLPerf logging and evaluation (see mlperf_benchmark and quality_target) -------------
    def hyperparameters(self, cfg: Config) -> dict[str, Any]:
        """MLPerf log key -> value of the hyperparameters the closed division's rules name
        (beyond ``global_batch_size``, ``gradient_accumulation_steps`` and ``seed``, which the
        training loop logs)."""
        raise NotImplementedError

    def eval_every_samples(self, cfg: Config, batch_size: int) -> int:
        """Training samples between two evaluations at ``batch_size`` examples per step."""
        raise NotImplementedError

    def checkpoint_start_step(self, cfg: Config) -> int:
        """Optimizer steps of the checkpoint a run starts from (MLPerf's GPT-3 rule); 0: a run
        starts from the initial weights."""
        return 0

    def checkpoint_optimizer(self, cfg: Config) -> tuple[OptimizerSpec, ScheduleSpec]:
        """The optimizer and schedule of the steps that made the start checkpoint (see
        :meth:`checkpoint_start_step`); by default the run's own."""
        return self.optimizer(cfg)

    def checkpoint_config(self, cfg: Config) -> Config:
        """The config of the model that made the start checkpoint; by default the run's own.
        Llama 2 LoRA pretrains the base model without adapters: the run takes the weights the
        two share and initialises the rest (the adapters)."""
        return cfg

    def checkpoint_continues(self, cfg: Config) -> bool:
        """Whether a run continues the start checkpoint's optimizer state and step count
        (GPT-3 resumes pretraining), or starts a fresh optimizer at step 0 (fine-tuning)."""
        return True

    def logged_units_per_sample(self, cfg: Config) -> int:
        """What one training sample counts for in the MLPerf log's ``epoch_num`` and
        ``train_samples``: 1 (samples), or tokens per sequence where MLPerf counts tokens."""
        return 1

    def default_target(self, cfg: Config) -> float | None:
        """The quality that ends a run of ``cfg`` by default: ``quality_target`` (MLPerf's);
        stable_diffusion's tiny preset scores stand-in metrics with targets of their own."""
        return self.quality_target

    def quality_reached(self, metrics: dict[str, float], target: float, cfg: Config) -> bool:
        """Whether an evaluation's ``metrics`` end the run: ``quality_metric`` at ``target``
        (from below or above, see ``quality_higher_is_better``). Workloads with several bars
        (stable_diffusion: FID and CLIP score) override this."""
        quality = metrics[self.quality_metric]
        return quality >= target if self.quality_higher_is_better else quality <= target

    def eval_set(self, cfg: Config) -> Tree:
        """The held-out evaluation examples, the same for every run (name -> (N, ...) array)."""
        raise NotImplementedError

    # --- framework side -------------------------------------------------------------------
    def adapter(self, framework: str):
        return frameworks.get(framework)

    def build(self, framework: str, cfg: Config, weights: Tree | str | os.PathLike | None = None):
        """A model in ``framework``; ``weights`` is a canonical dict or a checkpoint path (any
        format of ``mlperf_tutor.convert``, a ``save_pretrained`` directory included).

        Without ``weights`` the model gets :meth:`init_canonical` with seed 0, so that every
        framework starts from the same numbers.
        """
        adapter = self.adapter(framework)
        module = importlib.import_module(f"{self.package}.{framework}_model")
        model = module.build(cfg)
        if weights is None:
            weights = self.init_canonical(cfg, seed=0)
        elif isinstance(weights, (str, os.PathLike)):
            from mlperf_tutor import convert

            weights = convert.load(weights, workload=self, cfg=cfg)
        adapter.load_canonical(model, weights)
        return model

    def read_keras_weights(self, path: str | os.PathLike, cfg: Config) -> Tree:
        """The canonical tree in a ``.weights.h5`` file of the TF model of ``cfg``.

        Keras stores variables by layer path, so the file is loaded into a freshly built model
        and exported through the TF adapter. Errors of Keras and h5py propagate;
        ``mlperf_tutor.convert`` (the caller) checks the file and names it in its error.
        """
        model = self.build("tf", cfg)
        model.load_weights(str(path))
        return self.export("tf", model)

    def write_keras_weights(
        self, tree: Mapping[str, np.ndarray], path: str | os.PathLike, cfg: Config
    ) -> None:
        """Write ``tree`` to ``path`` as the ``.weights.h5`` file of the TF model of ``cfg``.

        Raises:
            CheckpointMismatch: ``tree`` does not fit the model (every offending key named).
        """
        model = self.build("tf", cfg, weights=dict(tree))
        model.save_weights(str(path))

    def export(self, framework: str, model) -> Tree:
        """The model's weights as a canonical dict."""
        return self.adapter(framework).to_canonical(model)

    def forward(self, framework: str, model, batch: dict, train: bool = False) -> dict:
        """Named outputs (numpy), including ``loss``."""
        return self.adapter(framework).forward(model, batch, train=train)

    def evaluate(
        self, framework: str, model, eval_set: Tree, batch_size: int
    ) -> float | dict[str, float]:
        """The ``quality_metric`` of ``model`` over all of ``eval_set``, in batches (eval mode);
        or a dict of metrics holding it, each logged as an ``eval_accuracy`` of its own."""
        raise NotImplementedError
