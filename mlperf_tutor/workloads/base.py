"""The workload interface: what the CLI, parity, convert, train and the notebooks rely on."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mlperf_tutor import frameworks
from mlperf_tutor.core.batch import ATTRIBUTE, BatchCheck
from mlperf_tutor.core.checkpoint import Tree
from mlperf_tutor.core.config import Config
from mlperf_tutor.core.interop import HfInterop
from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec
from mlperf_tutor.layers.spec import IGNORE_INDEX
from mlperf_tutor.workloads.recipe import Recipe


@dataclasses.dataclass(frozen=True)
class LossTerm:
    """One mean in a model's training loss: the model output that holds it on a batch, and the
    count it divides by, from the host batch.

    A loss that is a sum of such means is the same on a global batch and, split into slices,
    as ``sum over slices of mean(slice) * count(slice) / count(global batch)``: what a sharded
    step computes (:meth:`Workload.loss_terms`). A mean of the slices' means is not, where
    slices hold different counts (labelled tokens, masked positions).
    """

    output: str
    count: Callable[[Mapping[str, np.ndarray]], float]


def examples(batch: Mapping[str, np.ndarray]) -> float:
    """The count of a per-example mean: the batch's examples."""
    return float(len(next(iter(batch.values()))))


def labelled_tokens(shift: int) -> Callable[[Mapping[str, np.ndarray]], float]:
    """The count of a mean over labelled tokens: ``labels[:, shift:]`` that are not
    ``IGNORE_INDEX`` (``shift`` 0 where the labels are already the next tokens, GPT; 1 where
    the model shifts them itself, Llama)."""

    def count(batch: Mapping[str, np.ndarray]) -> float:
        return float(np.count_nonzero(np.asarray(batch["labels"])[:, shift:] != IGNORE_INDEX))

    return count


class Workload:
    """One workload, implemented in every framework.

    Subclasses set ``name``, ``config_class``, ``package`` (the module path holding
    ``torch_model``, ``jax_model`` and ``tf_model``, each with a ``build(cfg)`` function) and
    implement the analytic and numpy-side methods: :meth:`canonical_shapes` (from which
    :meth:`param_count`, :meth:`canonical_specs` and :meth:`init_canonical` follow),
    :meth:`init_weight` where the default initialisation does not fit, ``synthetic_batch`` and
    ``optimizer``. Workloads that MLPerf runs also give their run rules (:meth:`recipe`) and
    their evaluation (``eval_set``, ``evaluate``). Framework-side methods are generic: they go
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
    # Which MLPerf suite the workload belongs to, and the rounds of it that ran the benchmark,
    # among those whose official results summaries the package reads (v4.0, v5.0, v5.1).
    suite: str = "training"
    rounds: tuple[str, ...] = ()

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

    # --- data: synthetic, and the real MLPerf format --------------------------------------
    def write_sample_data(
        self, cfg: Config, directory: str | os.PathLike, *, samples: int = 64, seed: int = 0
    ) -> Path:
        """Write a small dataset in the workload's real MLPerf format, with its own writer.

        The samples are drawn from the distribution of :meth:`synthetic_batch` (``samples`` of
        them, seeded ``seed``), so a model learns from the files what it learns from synthetic
        batches.

        Args:
            cfg: the config whose shapes the files take.
            directory: where to write; created, and it must be empty or absent.
            samples: training samples (sequences, images, clicks) to write.
            seed: seeds the samples.

        Returns:
            The path :meth:`data_batches` takes: a file, a path prefix or ``directory``.

        Raises:
            ValueError: ``directory`` is not empty, or ``samples`` is below 1.
        """
        raise NotImplementedError(
            f"workload {self.name!r} has no real-data format; train it on synthetic batches"
        )

    def data_batches(
        self,
        cfg: Config,
        path: str | os.PathLike,
        batch_size: int,
        *,
        seed: int = 0,
        start: int = 0,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Endless training batches from the real-format data at ``path``, through the
        workload's reader (a bad file raises the reader's error, naming the file, when this is
        called: before training starts).

        Epoch ``e`` is a shuffle of the data seeded by ``(seed, e)``; a batch never spans two
        epochs (each epoch drops its last partial batch). Batch ``i`` of the stream depends only
        on ``(path, batch_size, seed, i)``: ``start=k`` yields batches ``k, k + 1, ...`` of the
        stream, reached by computing the epoch and the offset in it, not by reading the ``k``
        batches before. That makes ``(seed, batch index)`` a run's whole data position.

        Args:
            cfg: the config the batches are for (shapes, vocabulary).
            path: what :meth:`write_sample_data` returns, or the real dataset of that layout.
            batch_size: B.
            seed: the run's data seed (a non-negative int).
            start: index of the first batch to yield.

        Returns:
            An iterator of batches with the keys, dtypes and shapes of :meth:`synthetic_batch`.

        Raises:
            ValueError: the data holds fewer samples than one batch (the message names
                ``path``), a bad ``batch_size``, ``seed`` or ``start``, or the reader's error.
        """
        raise NotImplementedError(
            f"workload {self.name!r} has no real-data reader; train it on synthetic batches"
        )

    def canonical_shapes(self, cfg: Config) -> dict[str, tuple[int, ...]]:
        """Canonical name -> shape of every weight (PyTorch layouts), in a fixed order: the
        order :meth:`init_canonical` draws them in. Analytic: nothing allocated, so it works
        for the mlperf presets."""
        raise NotImplementedError

    def param_count(self, cfg: Config) -> int:
        """Number of parameters, computed analytically from :meth:`canonical_shapes` (no
        allocation); workloads with entries that are not parameters override it."""
        return sum(math.prod(shape) for shape in self.canonical_shapes(cfg).values())

    def synthetic_batch(self, cfg: Config, batch_size: int = 2, seed: int = 0) -> dict:
        """A seeded batch of the right shapes, dtypes and ranges (numpy arrays)."""
        raise NotImplementedError

    def batch_check(self, cfg: Config) -> BatchCheck:
        """The ranges of a batch's id fields for a model of ``cfg`` (token ids below the
        vocabulary, labels in their set, ...): what :meth:`check_batch` checks, and what every
        model :meth:`build` makes refuses before a framework sees the batch. Empty by default.
        """
        return BatchCheck()

    def check_batch(self, cfg: Config, batch: Mapping[str, Any]) -> None:
        """Raise a :class:`~mlperf_tutor.core.batch.BatchError` naming the field and the entry
        of ``batch`` (host arrays) that a model of ``cfg`` cannot take (see
        :meth:`batch_check`): the same error in every framework."""
        self.batch_check(cfg)(batch)

    def init_canonical(self, cfg: Config, seed: int = 0) -> Tree:
        """Initial weights in canonical names and layouts, float32: :meth:`init_weight` of each
        entry of :meth:`canonical_shapes`, in that order, from one generator seeded ``seed``."""
        rng = np.random.default_rng(seed)
        return {
            name: self.init_weight(cfg, name, shape, rng).astype(np.float32)
            for name, shape in self.canonical_shapes(cfg).items()
        }

    def init_weight(
        self, cfg: Config, name: str, shape: tuple[int, ...], rng: np.random.Generator
    ) -> np.ndarray:
        """The initial value of one weight (any float dtype; :meth:`init_canonical` casts),
        drawing from ``rng`` if it is random. By default a transformer's: norm weights 1, other
        vectors (biases, norm biases) 0, matrices normal with std ``cfg.init_std``."""
        if "norm." in name and name.endswith("weight"):
            return np.ones(shape)
        if len(shape) == 1:
            return np.zeros(shape)
        return cfg.init_std * rng.standard_normal(shape)

    def parity_weights(self, cfg: Config, seed: int = 0) -> Tree:
        """The weights parity runs compare frameworks on: :meth:`init_canonical` unless a
        workload's init would hide differences (stable_diffusion zeroes its output layers)."""
        return self.init_canonical(cfg, seed=seed)

    def deterministic(self, cfg: Config) -> Config:
        """``cfg`` with every source of randomness in the forward (dropout) turned off, as
        parity runs need; workloads with dropout override this."""
        return cfg

    def canonical_specs(self, cfg: Config) -> dict[str, tuple[tuple[int, ...], str]]:
        """Canonical name -> (shape, dtype name) of every weight, from :meth:`canonical_shapes`
        (float32, as :meth:`init_canonical` makes them; nothing allocated)."""
        return {name: (shape, "float32") for name, shape in self.canonical_shapes(cfg).items()}

    # --- parallel plans (mlperf_tutor.parallel) ----------------------------------------------
    def logical_axes(self, cfg: Config) -> dict[str, tuple[str | None, ...]]:
        """Canonical name -> the logical axis of each dimension (``"vocab"``, ``"heads"``,
        ``"mlp"``, ``"embed"``, ``"rows"``, ... or None), what :func:`mlperf_tutor.parallel.plan`
        maps to mesh axes. By default the transformer family's
        (:func:`mlperf_tutor.layers.axes.transformer_axes`); names it does not know get None."""
        from mlperf_tutor.layers.axes import transformer_axes

        return {
            name: transformer_axes(name, len(shape))
            for name, shape in self.canonical_shapes(cfg).items()
        }

    def check_mesh(self, cfg: Config, mesh) -> None:
        """Refuse a :class:`~mlperf_tutor.parallel.plan.MeshShape` that would split this model
        unevenly where it must not (by default: a ``tensor`` size that does not divide the
        heads or the MLP width of a config with a ``block_spec``).

        Raises:
            ValueError: naming the workload, the mesh and what it would split.
        """
        from mlperf_tutor.layers.axes import check_tensor_parallel

        block_spec = getattr(cfg, "block_spec", None)
        if mesh.tensor > 1 and block_spec is None:
            raise ValueError(
                f"workload {self.name!r} has no tensor-parallel plan; use the data and fsdp "
                f"axes (mesh {mesh})"
            )
        if mesh.tensor > 1:
            check_tensor_parallel(block_spec(), mesh.tensor, f"{self.name} mesh {mesh}")

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

    def loss_terms(self, cfg: Config) -> tuple[LossTerm, ...]:
        """The means the training loss (the model's ``loss`` output) sums, each with the count
        it divides by: by default one mean over examples."""
        return (LossTerm("loss", examples),)

    def device_memory(self, cfg: Config, plan, batch_size: int, precision: str = "fp32"):
        """What each device holds under ``plan`` (a :class:`~mlperf_tutor.parallel.Plan`):
        :func:`mlperf_tutor.parallel.memory.device_memory` of the plan's partitions, unless a
        workload shards some weights by a plan of its own (DLRM's embedding tables)."""
        from mlperf_tutor.parallel import memory

        return memory.device_memory(self, cfg, plan, batch_size, precision)

    def communication(
        self, cfg: Config, plan, batch_size: int, precision: str = "fp32"
    ) -> dict[str, float]:
        """Bytes each device sends per step, by mesh axis (or collective): by default
        :func:`mlperf_tutor.parallel.memory.communication` of the plan's partitions."""
        from mlperf_tutor.parallel import memory

        return memory.communication(self, cfg, plan, batch_size, precision)

    def activation_bytes(self, cfg: Config, tensor: int = 1) -> float | None:
        """Activation bytes of one example in mixed-precision training without recomputation,
        with tensor parallelism of size ``tensor`` (per device); None where the workload has
        no estimate. Transformers: :func:`mlperf_tutor.parallel.memory.
        transformer_activation_bytes` of their config."""
        fields = ("num_layers", "seq_len", "hidden", "num_heads")
        if not all(hasattr(cfg, f) for f in fields):
            return None
        from mlperf_tutor.parallel.memory import transformer_activation_bytes

        return transformer_activation_bytes(*(getattr(cfg, f) for f in fields), tensor=tensor)

    def flops_per_sample(self, cfg: Config) -> float | None:
        """Model FLOPs of one training sample (forward and backward), for MFU; None where the
        workload does not count them."""
        return None

    # --- MLPerf run rules and evaluation ------------------------------------------------------
    def recipe(self, cfg: Config) -> Recipe:
        """The MLPerf run rules of ``cfg``: benchmark, targets, eval cadence, start checkpoint,
        logged units and hyperparameters (see :class:`~mlperf_tutor.workloads.recipe.Recipe`).
        By default none: no MLPerf log, no evaluation, a run from the initial weights."""
        return Recipe()

    def eval_set(self, cfg: Config) -> Tree:
        """The held-out evaluation examples, the same for every run (name -> (N, ...) array)."""
        raise NotImplementedError

    # --- framework side -------------------------------------------------------------------
    def adapter(self, framework: str):
        return frameworks.get(framework)

    def build(
        self,
        framework: str,
        cfg: Config,
        weights: Tree | str | os.PathLike | None = None,
        *,
        precision: str = "fp32",
        fused: bool = False,
    ):
        """A model in ``framework``; ``weights`` is a canonical dict or a checkpoint path (any
        format of ``mlperf_tutor.convert``, a ``save_pretrained`` directory included).

        Without ``weights`` the model gets :meth:`init_canonical` with seed 0, so that every
        framework starts from the same numbers.

        Args:
            framework: "torch", "jax" or "tf".
            cfg: the config.
            weights: see above.
            precision: "fp32", or "bf16" for a model that a bf16 trainer trains: the Keras
                model is built with the ``mixed_bfloat16`` dtype policy (torch autocasts and
                JAX casts inside the trainer's step, so their models are the same either way).
            fused: the framework's fused attention kernel where the model has attention (the
                training path on accelerators); the explicit path is the parity reference.
        """
        adapter = self.adapter(framework)
        module = importlib.import_module(f"{self.package}.{framework}_model")
        options = inspect.signature(module.build).parameters
        kwargs = {}
        if fused and "fused" in options:
            kwargs["fused"] = True
        if precision == "bf16" and framework == "tf":
            kwargs["dtype"] = "mixed_bfloat16"
        model = module.build(cfg, **kwargs)
        if weights is None:
            weights = self.init_canonical(cfg, seed=0)
        elif isinstance(weights, (str, os.PathLike)):
            from mlperf_tutor import convert

            weights = convert.load(weights, workload=self, cfg=cfg)
        adapter.load_canonical(model, weights)
        # The adapters' forward, loss_and_grads, train_step and Trainer.step check every batch
        # with it (mlperf_tutor.core.batch), so an id outside its table is one BatchError.
        setattr(model, ATTRIBUTE, self.batch_check(cfg))
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

    def forward(
        self, framework: str, model, batch: dict, train: bool = False, outputs=None
    ) -> dict:
        """Named outputs (numpy), including ``loss``; ``outputs`` names the ones copied to the
        host (None: all)."""
        return self.adapter(framework).forward(model, batch, train=train, outputs=outputs)

    def evaluate(
        self, framework: str, model, eval_set: Tree, batch_size: int
    ) -> float | dict[str, float]:
        """The quality of ``model`` (the recipe's ``quality_metric``) over all of ``eval_set``,
        in batches (eval mode); or a dict of metrics holding it, each logged as an
        ``eval_accuracy`` of its own."""
        raise NotImplementedError


def token_weighted_loss(
    workload: Workload, framework: str, model, eval_set: Tree, batch_size: int, shift: int
) -> float:
    """A language model's eval loss over ``eval_set``: the cross-entropy averaged over every
    labelled token (token-weighted across batches, not a mean of batch means).

    Each batch's mean loss (the model's own ``loss`` output, computed on the device) is weighted
    by its count of labelled tokens, counted here from the labels; only that one number per batch
    leaves the device. ``shift`` is 0 where the labels are already the next tokens (GPT) and 1
    where the model shifts them itself (Llama: ``labels[:, 1:]``).
    """
    total = count = 0.0
    labelled = labelled_tokens(shift)
    for start in range(0, len(eval_set["input_ids"]), batch_size):
        batch = {k: v[start : start + batch_size] for k, v in eval_set.items()}
        n = labelled(batch)
        if n == 0:  # the model's mean over no tokens is 0/0
            continue
        loss = workload.forward(framework, model, batch, outputs=("loss",))["loss"]
        total, count = total + float(loss) * n, count + n
    return total / count


# --- helpers of write_sample_data and data_batches -----------------------------------------------
def check_int(name: str, value, low: int) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an int of at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an int of at least {low}, got {value!r}")


def new_data_directory(directory: str | os.PathLike, samples: int) -> Path:
    """``directory``, created if absent, for :meth:`Workload.write_sample_data`.

    Raises:
        ValueError: ``directory`` is a file or a directory that is not empty, or ``samples``
            is below 1.
    """
    check_int("samples", samples, 1)
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is not a directory; write sample data into a new directory")
    if path.is_dir() and any(path.iterdir()):
        raise ValueError(f"{path} is not empty; write sample data into a new or empty directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def epoch_rng(seed: int, epoch: int, *more: int) -> np.random.Generator:
    """The generator of epoch ``epoch`` of a run seeded ``seed`` (and of ``more``: a batch's
    own draws), the same for every process that asks."""
    return np.random.default_rng([seed, epoch, *more])


def endless_batches(
    path: str | os.PathLike,
    samples: int,
    batch_size: int,
    seed: int,
    start: int,
    epoch: Callable[[int, int], Iterator[dict[str, np.ndarray]]],
) -> Iterator[dict[str, np.ndarray]]:
    """The endless stream of :meth:`Workload.data_batches`, from batch ``start``.

    Args:
        path: the dataset (named in errors).
        samples: samples in one epoch.
        batch_size: B; an epoch has ``samples // B`` batches.
        seed: the run's data seed, checked here (``epoch`` uses it).
        start: index of the first batch.
        epoch: ``epoch(e, first)`` yields batches ``first, first + 1, ...`` up to the end of
            epoch ``e`` (each ``epoch_rng(seed, e)``-shuffled), without reading those before.

    Raises:
        ValueError: fewer samples than one batch, or a bad ``batch_size``, ``seed`` or
            ``start``; raised here, not at the first ``next()``.
    """
    check_int("batch_size", batch_size, 1)
    check_int("seed", seed, 0)
    check_int("start", start, 0)
    per_epoch = samples // batch_size
    if per_epoch == 0:
        raise ValueError(
            f"{path} holds {samples} samples, fewer than one batch of {batch_size}; write more "
            "samples or use a smaller batch size"
        )
    first_epoch, first = divmod(int(start), per_epoch)

    def stream() -> Iterator[dict[str, np.ndarray]]:
        e, offset = first_epoch, first
        while True:
            yield from epoch(e, offset)
            e, offset = e + 1, 0

    return stream()
