"""DLRM in PyTorch with sharded embedding tables (row-wise and table-wise) and a sparse Adagrad.

TorchRec's ``ROW_WISE`` and ``TABLE_WISE`` sharding built from torch's own pieces (TorchRec does
not import on this stack: see the chapter), following :func:`~.sharding.embedding_plan`:

* a row-wise table is one ``DTensor`` of the padded table with ``Shard(0)`` on every mesh
  dimension: each rank holds block ``rank`` of :func:`~.sharding.row_ranges`. A table-wise
  table lives whole on its owner (an empty block elsewhere). The trained parameter of a rank is
  its local block (``DTensor.to_local()``, sharing storage), which
  ``torch.nn.functional.embedding_bag(..., sparse=True)`` reads and
  ``torch.optim.Adagrad`` updates from a sparse gradient: only the rows a batch holds are
  read, and only they and their accumulators are written.
* the lookup (TorchRec's row-wise pipeline): one ``all_gather`` of every rank's bag ids; each
  rank sums, for every sample of the global batch, the ids of the bag it owns (``embedding_bag``
  with per-bag offsets; a bag with none of its rows gives zeros); one ``all_to_all`` sends each
  rank the partial sums of its own samples, which it adds up (a reduce-scatter). The
  ``all_to_all`` is differentiable, so the backward returns each owner the gradient of its
  rows for the whole batch.
* the MLPs and cross layers are data parallel under ``DistributedDataParallel``, with the
  dense trainer's optimizer (:func:`mlperf_tutor.frameworks.torch.make_optimizer`).

The loss a rank differentiates is its local batch's mean; DDP averages the dense gradients over
the ranks, and a hook scales the pooled embeddings' gradient by ``1 / world`` so that the
tables get the global batch's mean gradient too (exact: a power of two for 2, 4, 8 ranks).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import _functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel

from mlperf_tutor.core.batch import check_model_batch
from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec
from mlperf_tutor.frameworks import torch as ft
from mlperf_tutor.workloads.dlrm.config import DlrmConfig
from mlperf_tutor.workloads.dlrm.sharding import EmbeddingPlan, check_sparse_optimizer
from mlperf_tutor.workloads.dlrm.torch_model import Dlrm


class DenseArch(nn.Module):
    """The data-parallel part of :class:`~.torch_model.Dlrm`: the bottom MLP, the DCNv2
    interaction and the top MLP on the pooled embeddings (the model's forward after its bags).

    Args:
        model: the DLRM whose modules it shares.
    """

    def __init__(self, model: Dlrm):
        super().__init__()
        self.bottom_mlp, self.interaction, self.top_mlp = (
            model.bottom_mlp,
            model.interaction,
            model.top_mlp,
        )

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor, labels: torch.Tensor):
        x0 = torch.cat([self.bottom_mlp(dense), pooled], dim=1)  # (B, (F + 1) E)
        logits = self.top_mlp(self.interaction(x0)).squeeze(1)  # (B,)
        return F.binary_cross_entropy_with_logits(logits, labels)


class ShardedTrainer:
    """Trains DLRM over every rank of ``mesh`` with the tables sharded as ``plan`` says.

    Each rank calls :meth:`step` with its own slice of the global batch (equal sizes).

    Args:
        model: a float32 DLRM built by ``wl.build("torch", cfg, weights=...)`` (every rank the
            same weights); each rank copies its blocks of the tables and then drops the model's
            tables (they become ``meta`` tensors), and trains its dense modules in place.
        cfg: its config.
        spec: the optimizer (Adagrad without weight decay or clipping: the workload's).
        schedule: the learning-rate schedule.
        mesh: a CPU or GPU ``DeviceMesh`` over every rank (any number of dimensions: row-wise
            tables are split over all of them, rank-major).
        plan: :func:`~.sharding.embedding_plan` for ``mesh.size()`` devices.

    Raises:
        ValueError: another optimizer, or a plan for another number of devices.
    """

    def __init__(
        self,
        model: Dlrm,
        cfg: DlrmConfig,
        spec: OptimizerSpec,
        schedule: ScheduleSpec,
        mesh: DeviceMesh,
        plan: EmbeddingPlan,
    ):
        check_sparse_optimizer(spec)
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        if plan.devices != self.world or mesh.size() != self.world:
            raise ValueError(
                f"plan for {plan.devices} devices, mesh of {mesh.size()}, {self.world} ranks"
            )
        self.cfg, self.plan, self.mesh, self.schedule = cfg, plan, mesh, schedule
        self.model = model
        self.device = mesh.device_type
        self.placements = [Shard(0)] * mesh.ndim
        self.sharded: dict[int, DTensor] = {}  # row-wise table -> its DTensor
        self.shards: list[nn.Parameter] = []  # this rank's block of every table (maybe empty)
        for f, bag in enumerate(model.embedding_bags):
            block = plan.ranges[f][self.rank]
            # This rank's block only (its rows, then zero padding): no rank copies a whole
            # row-wise table.
            local = bag.weight.new_zeros(block.local_rows, cfg.embedding_dim)
            local[: block.real_rows] = bag.weight.detach()[block.start : block.stop]
            if f in plan.row_wise:
                self.sharded[f] = DTensor.from_local(
                    local,
                    mesh,
                    self.placements,
                    run_check=False,
                    shape=(self.world * block.local_rows, cfg.embedding_dim),
                    stride=(cfg.embedding_dim, 1),
                )
                local = self.sharded[f].to_local()
            self.shards.append(nn.Parameter(local.to(self.device)))
            # The model keeps the table's shape but no longer its rows (the shards hold them).
            bag.weight = nn.Parameter(torch.empty_like(bag.weight, device="meta"))
        self.dense = DistributedDataParallel(DenseArch(model).to(self.device))
        self.dense_optimizer = ft.make_optimizer(spec, schedule, self.dense.module)
        owned = [p for p in self.shards if p.shape[0]]
        self.sparse_optimizer = torch.optim.Adagrad(
            owned,
            lr=schedule.lr_at(0),
            lr_decay=0.0,
            weight_decay=0.0,
            initial_accumulator_value=spec.initial_accumulator,
            eps=spec.eps,
        )
        self.steps = 0

    def _pooled(self, sparse: torch.Tensor) -> torch.Tensor:
        """(B_local, F E): every table's pooled bags of this rank's samples."""
        local = sparse.shape[0]
        everyone = [torch.empty_like(sparse) for _ in range(self.world)]
        dist.all_gather(everyone, sparse.contiguous())
        ids = torch.cat(everyone).to(torch.int64)  # (B_global, H), rank-major
        partial = []
        column = 0
        for f, hot in enumerate(self.cfg.multi_hot_sizes):
            bags = ids[:, column : column + hot]
            column += hot
            block = self.plan.ranges[f][self.rank]
            owned = (bags >= block.start) & (bags < block.stop)
            offsets = bags.new_zeros(len(bags))
            offsets[1:] = owned.sum(1).cumsum(0)[:-1]
            if self.shards[f].shape[0]:
                partial.append(
                    F.embedding_bag(
                        bags[owned] - block.start,
                        self.shards[f],
                        offsets,
                        mode="sum",
                        sparse=True,
                    )
                )
            else:
                partial.append(self.shards[f].new_zeros(len(bags), self.cfg.embedding_dim))
        partial = torch.cat(partial, dim=1)  # (B_global, F E): this rank's rows only
        received = funcol.all_to_all_single(partial, None, None, dist.group.WORLD)
        pooled = received.view(self.world, local, -1).sum(0)  # (B_local, F E)
        if pooled.requires_grad:
            # The tables' gradient of the global batch's mean, not the sum of the local means.
            pooled.register_hook(lambda g: g / self.world)
        return pooled

    def step(self, batch: Mapping[str, np.ndarray]) -> torch.Tensor:
        """One update on this rank's ``batch``; returns the global batch's mean loss."""
        check_model_batch(self.model, batch)  # an id past its table: one BatchError
        self.dense.train(True)
        self.dense_optimizer.zero_grad()
        self.sparse_optimizer.zero_grad(set_to_none=True)
        dense, sparse, labels = (
            torch.as_tensor(np.asarray(batch[k])).to(self.device)
            for k in ("dense", "sparse", "labels")
        )
        loss = self.dense(dense.float(), self._pooled(sparse), labels.float())
        loss.backward()
        self.dense_optimizer.step()
        for group in self.sparse_optimizer.param_groups:
            group["lr"] = self.schedule.lr_at(self.steps)
        self.sparse_optimizer.step()
        self.steps += 1
        total = loss.detach().clone()
        dist.all_reduce(total)
        return total / self.world

    def accumulator(self, table: int) -> torch.Tensor:
        """This rank's Adagrad accumulator of its block of ``table`` (zeros: not stepped)."""
        p = self.shards[table]
        state = self.sparse_optimizer.state.get(p, {})
        return state.get(
            "sum", torch.full_like(p, self.sparse_optimizer.defaults["initial_accumulator_value"])
        )

    def full_table(self, table: int, *, accumulator: bool = False) -> torch.Tensor:
        """The whole table (or its accumulator), without padding, on every rank (a
        collective: every rank calls it)."""
        local = self.accumulator(table) if accumulator else self.shards[table].detach()
        rows = self.cfg.table_sizes[table]
        if table in self.plan.row_wise:
            full = DTensor.from_local(local, self.mesh, self.placements).full_tensor()
            return full[:rows]
        owner = self.plan.table_device[table]
        out = local.clone() if self.rank == owner else torch.empty(rows, self.cfg.embedding_dim)
        dist.broadcast(out, src=owner)
        return out

    def weights(self) -> dict[str, np.ndarray]:
        """Canonical weights (a collective: every rank calls it and gets them all)."""
        tree = {
            f"embedding_bags.{f}.weight": ft.to_numpy(self.full_table(f))
            for f in range(self.cfg.num_tables)
        }
        tree |= {k: ft.to_numpy(v) for k, v in self.dense.module.state_dict().items()}
        return tree
