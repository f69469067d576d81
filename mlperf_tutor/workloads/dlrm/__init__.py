"""DLRM with a DCNv2 interaction (MLPerf Training ``dlrm_dcnv2``): click-through prediction.

References: Naumov et al. 2019, DLRM (https://arxiv.org/abs/1906.00091); Wang et al. 2021,
DCN V2 (https://arxiv.org/abs/2008.13535); mlcommons/training ``recommendation_v2/torchrec_dlrm``.

Forward (same in all three frameworks; B batch, E embedding dim, F tables, D = (F + 1) E)::

    dense (B, 13) -> bottom_mlp: Linear + ReLU per layer (ReLU after the last too)   -> (B, E)
    sparse (B, H): feature f's bag = its multi_hot_sizes[f] columns;
        pooled_f = sum of embedding_bags.f rows over the bag                        -> (B, E)
    x0 = concat(bottom output, pooled_0, ..., pooled_{F-1})                          -> (B, D)
    cross layer l (interaction.layers.l): x = x0 * w(v(x)) + x   (v: D -> R, no bias;
                                                                 w: R -> D, bias)
    top_mlp: Linear + ReLU per layer, no ReLU after the last (one logit)            -> (B,)
    loss = mean binary cross-entropy of the logits against labels
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mlperf_tutor.core.batch import BatchCheck, Ids
from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec
from mlperf_tutor.workloads.base import Workload, endless_batches, new_data_directory
from mlperf_tutor.workloads.dlrm.config import DlrmConfig
from mlperf_tutor.workloads.dlrm.data import TARGET_AUC, bag_offsets, roc_auc, synthetic_batch
from mlperf_tutor.workloads.recipe import Recipe, Target

# Seed of the synthetic click model (the "task"), and of the eval set; far from the training
# batches' seeds (seed + 1 + step).
TASK_SEED = 2**31 - 2
EVAL_SEED = 2**31 - 1
# Evaluation batches hold at least this many samples, whatever the training batch: a forward
# without a backward keeps no activations (the mlperf preset gathers 110 kB of embeddings per
# sample, 1.8 GB a batch). A tiny run of batch 2 evaluated its 2,048 samples in 1,024 calls,
# 0.26 s each in Keras' eager forward (26 ragged lookups): 4.5 minutes an evaluation on a CPU.
EVAL_BATCH = 16384


def _mlp_shapes(prefix: str, n_in: int, sizes) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for j, n_out in enumerate(sizes):
        shapes[f"{prefix}.layers.{j}.weight"] = (n_out, n_in)
        shapes[f"{prefix}.layers.{j}.bias"] = (n_out,)
        n_in = n_out
    return shapes


def canonical_shapes(cfg: DlrmConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every weight (PyTorch layouts: Linear weight is (out, in))."""
    d, r = cfg.interaction_dim, cfg.cross_rank
    shapes = _mlp_shapes("bottom_mlp", cfg.num_dense, cfg.bottom_mlp)
    for i, rows in enumerate(cfg.table_sizes):
        shapes[f"embedding_bags.{i}.weight"] = (rows, cfg.embedding_dim)
    for layer in range(cfg.cross_layers):
        prefix = f"interaction.layers.{layer}"
        shapes[f"{prefix}.v.weight"] = (r, d)
        shapes[f"{prefix}.w.weight"] = (d, r)
        shapes[f"{prefix}.w.bias"] = (d,)
    shapes |= _mlp_shapes("top_mlp", d, cfg.top_mlp)
    return shapes


class DlrmWorkload(Workload):
    name = "dlrm_dcnv2"
    rounds = ("v4.0", "v5.0", "v5.1")  # the summaries' benchmark columns
    description = "DLRM-DCNv2 click-through prediction, Adagrad; MLPerf target AUC 0.80275"
    config_class = DlrmConfig
    package = "mlperf_tutor.workloads.dlrm"

    def logical_axes(self, cfg: DlrmConfig) -> dict[str, tuple[str | None, ...]]:
        """The embedding tables' rows are ``"rows"`` (split over every device: TorchRec's
        ``ROW_WISE``); the MLPs and the interaction have no logical axes (data parallel, or
        split over ``fsdp`` by the plan's fallback).

        :func:`mlperf_tutor.parallel.plan.plan` splits a table's rows only where the device
        count divides them; the DLRM trainers that shard tables
        (``dlrm.torch_sharded``, ``dlrm.jax_sharded``) follow
        :func:`~mlperf_tutor.workloads.dlrm.sharding.embedding_plan` instead, which pads every
        row-wise table to equal blocks (:func:`~mlperf_tutor.workloads.dlrm.sharding.row_ranges`)
        and places small tables whole on one device."""
        return {
            name: ("rows", None) if name.startswith("embedding_bags.") else (None,) * len(shape)
            for name, shape in self.canonical_shapes(cfg).items()
        }

    def canonical_shapes(self, cfg: DlrmConfig) -> dict[str, tuple[int, ...]]:
        return canonical_shapes(cfg)

    def communication(
        self, cfg: DlrmConfig, plan, batch_size: int, precision: str = "fp32"
    ) -> dict[str, float]:
        """Per device and step: the all-reduce of the replicated MLPs' float32 gradients over
        every device, and the all-to-all that brings each example's pooled embeddings (one
        float32 vector per table) to the device of its example and their gradients back (the
        ``(n - 1) / n`` of them that live elsewhere, forward and backward)."""
        from mlperf_tutor.parallel.memory import check_batch
        from mlperf_tutor.workloads.dlrm.sharding import dense_bytes

        check_batch(batch_size, plan)
        n = plan.mesh.devices
        if n == 1:
            return {}
        local = batch_size // plan.mesh.batch_shards
        pooled = local * len(cfg.table_sizes) * cfg.embedding_dim * 4
        return {
            "all-reduce of the MLP gradients": 2 * (n - 1) / n * dense_bytes(cfg, 4),
            "all-to-all of pooled embeddings": 2 * (n - 1) / n * pooled,
        }

    def device_memory(self, cfg: DlrmConfig, plan, batch_size: int, precision: str = "fp32"):
        """The most loaded device of :func:`~mlperf_tutor.workloads.dlrm.sharding.
        embedding_plan` over the plan's devices: its tables' float32 rows and Adagrad
        accumulators, plus the replicated MLPs with their gradients and accumulators. The
        tables' gradients are sparse (the rows a batch reads) and, like the activations, not
        counted."""
        from mlperf_tutor.parallel.memory import DeviceMemory, check_batch
        from mlperf_tutor.workloads.dlrm.sharding import dense_bytes, embedding_plan

        check_batch(batch_size, plan)
        tables = max(embedding_plan(cfg, plan.mesh.devices).device_bytes)  # weights + state
        dense = dense_bytes(cfg, bytes_per_value=4)
        return DeviceMemory(
            weights=tables // 2 + dense,
            gradients=dense,
            optimizer_state=tables // 2 + dense,
            activations=None,
        )

    def init_weight(
        self, cfg: DlrmConfig, name: str, shape: tuple[int, ...], rng: np.random.Generator
    ) -> np.ndarray:
        """The original DLRM's initialisation (facebookresearch/dlrm ``dlrm_s_pytorch.py``):
        Linear weights normal with std sqrt(2 / (fan_in + fan_out)), biases normal with std
        sqrt(1 / fan_out), embedding rows uniform in +-sqrt(1 / rows)."""
        if name.startswith("embedding_bags."):
            bound = math.sqrt(1.0 / shape[0])
            return rng.uniform(-bound, bound, shape)
        if len(shape) == 2:
            return rng.normal(0.0, math.sqrt(2.0 / (shape[0] + shape[1])), shape)
        return rng.normal(0.0, math.sqrt(1.0 / shape[0]), shape)

    def synthetic_batch(self, cfg: DlrmConfig, batch_size: int = 2, seed: int = 0) -> dict:
        return synthetic_batch(cfg, batch_size, seed, TASK_SEED)

    def batch_check(self, cfg: DlrmConfig) -> BatchCheck:
        """Each bag's indices below its table's size (``sparse`` column by column), click
        labels 0 or 1."""
        columns = tuple(
            size
            for size, hot in zip(cfg.table_sizes, cfg.multi_hot_sizes, strict=True)
            for _ in range(hot)
        )
        offsets = tuple(int(o) for o in bag_offsets(cfg.multi_hot_sizes))
        return BatchCheck(
            ids=(
                Ids("sparse", columns, "cfg.table_sizes[{group}]", groups=offsets),
                Ids("labels", 2, "click labels: 0 or 1", floats=True),
            )
        )

    def write_sample_data(
        self, cfg: DlrmConfig, directory: str | os.PathLike, *, samples: int = 64, seed: int = 0
    ) -> Path:
        """Training days 0 and 1 of the MLPerf Criteo multi-hot layout
        (``day_D_dense.npy``, ``day_D_labels.npy``, ``day_D_sparse_multi_hot.npz``) holding
        :meth:`synthetic_batch` samples of the synthetic click model; returns ``directory``."""
        from mlperf_tutor.workloads.dlrm.data import write_sample_days

        directory = new_data_directory(directory, samples)
        batch = self.synthetic_batch(cfg, samples, seed)
        return write_sample_days(directory, batch, cfg.multi_hot_sizes)

    def data_batches(
        self,
        cfg: DlrmConfig,
        path: str | os.PathLike,
        batch_size: int,
        *,
        seed: int = 0,
        start: int = 0,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Batches of the training days (0..22) in the directory ``path``, through
        :class:`~.data.CriteoMultiHot`: epoch ``e`` permutes the batches of contiguous rows
        (and the rows inside each) by ``(seed, e)``, as the reference reads its pre-shuffled
        days. Indices are taken modulo ``cfg.table_sizes``, as the reference does."""
        from mlperf_tutor.workloads.dlrm.data import CriteoMultiHot, training_days

        days = CriteoMultiHot(path, training_days(path), cfg, hash_indices=True)
        return endless_batches(
            path,
            len(days),
            batch_size,
            seed,
            start,
            lambda epoch, first: days.batches(
                batch_size, seed, drop_last=True, epoch=epoch, start=first
            ),
        )

    def optimizer(self, cfg: DlrmConfig) -> tuple[OptimizerSpec, ScheduleSpec]:
        spec = OptimizerSpec("adagrad", eps=cfg.eps, weight_decay=0.0, initial_accumulator=0.0)
        return spec, ScheduleSpec(cfg.lr)

    def recipe(self, cfg: DlrmConfig) -> Recipe:
        """MLPerf's ``dlrm_dcnv2``: ROC AUC 0.80275, evaluated every ``cfg.eval_every_samples``;
        the logged hyperparameters are the keys of mlperf_logging's
        ``training_4.0.0/closed_dlrm_dcnv2.yaml``, read from the optimizer and schedule that
        train."""
        spec, schedule = self.optimizer(cfg)
        return Recipe(
            benchmark="dlrm_dcnv2",
            targets=(Target("ROC AUC", TARGET_AUC),),
            eval_every=cfg.eval_every_samples,
            hyperparameters={
                "opt_name": "adagrad",
                "opt_base_learning_rate": schedule.lr,
                "opt_adagrad_learning_rate_decay": 0.0,
                "opt_weight_decay": spec.weight_decay,
                "opt_adagrad_initial_accumulator_value": spec.initial_accumulator,
                "opt_adagrad_epsilon": spec.eps,
                "opt_learning_rate_warmup_steps": schedule.warmup_steps,
                "opt_learning_rate_decay_start_step": 0,
                "opt_learning_rate_decay_steps": 0,
            },
        )

    def eval_set(self, cfg: DlrmConfig) -> dict:
        return synthetic_batch(cfg, cfg.eval_samples, EVAL_SEED, TASK_SEED)

    def evaluate(self, framework: str, model, eval_set: dict, batch_size: int) -> float:
        """ROC AUC of the logits over all of ``eval_set`` (computed once, not per batch), in
        batches of ``batch_size`` or :data:`EVAL_BATCH` samples, whichever is larger."""
        batch_size = max(batch_size, EVAL_BATCH)
        logits = [
            self.forward(framework, model, {k: v[s : s + batch_size] for k, v in eval_set.items()})[
                "logits"
            ]
            for s in range(0, len(eval_set["labels"]), batch_size)
        ]
        return roc_auc(np.concatenate(logits), eval_set["labels"])

    def info(self, cfg: DlrmConfig) -> dict:
        shapes = canonical_shapes(cfg)
        embedding = sum(math.prod(s) for k, s in shapes.items() if k.startswith("embedding"))
        dense = self.param_count(cfg) - embedding
        # Forward FLOPs per sample: 2 per weight of the MLPs and cross layers, plus the bag sums.
        pooled = sum(cfg.multi_hot_sizes) * cfg.embedding_dim
        forward = 2 * dense + pooled + 2 * cfg.cross_layers * cfg.interaction_dim
        return {
            "workload": self.name,
            "parameters": self.param_count(cfg),
            "embedding parameters": embedding,
            "dense parameters (MLPs, cross layers)": dense,
            "fp32 embedding tables (GB)": 4 * embedding / 1e9,
            "fp32 embeddings + Adagrad accumulators (GB)": 8 * embedding / 1e9,
            "embedding rows gathered per sample": sum(cfg.multi_hot_sizes),
            "embedding bytes gathered per sample (fp32)": 4 * pooled,
            "training FLOPs per sample (3x forward)": 3 * forward,
            "global batch size": cfg.global_batch_size,
        }


WORKLOAD = DlrmWorkload()
