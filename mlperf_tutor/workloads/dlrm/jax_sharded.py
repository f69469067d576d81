"""DLRM in JAX with row-wise sharded embedding tables and a sparse Adagrad update.

Each table is one array of the padded table (:func:`~.sharding.row_ranges`) with a
``NamedSharding`` that splits its rows over every device of the mesh (``data``, ``fsdp`` and
``tensor`` together: the ``"rows"`` logical axis of :data:`mlperf_tutor.parallel.plan.MESH_AXES`);
its Adagrad accumulator is sharded the same way. The MLPs and cross layers are replicated
(data parallel: GSPMD sums their gradients over the batch split), with the dense trainer's
optax Adagrad.

One jitted step per batch, for each table:

1. ``jnp.unique`` of the batch's ids with a static size (``min(bag ids in the batch, rows)``),
   padded with an id past the padded table that no device owns;
2. the unique rows and their accumulators gathered from their owners: under ``jax.shard_map``
   each device takes the ids in its block from its own rows and a ``psum`` over the mesh
   assembles them (every other device adds an exact zero);
3. the model's own forward on the gathered rows (its table variables replaced by them and the
   bag ids by their positions in the unique list), the gradient with respect to the rows;
4. Adagrad on those rows only, as ``torch.optim.Adagrad`` and the dense trainer compute it
   (``s += g**2``; ``p += -lr * (g / (sqrt(s) + eps))``), written back by each owner into its
   block (``.at[].set`` with ids outside the block dropped).

Rows no bag of the batch holds are never read or written, nor are their accumulators: the dense
Adagrad leaves them unchanged too (their gradient is an exact zero), so both give the same
numbers, while the sparse step moves ``unique ids x E`` values instead of whole tables (the
``mlperf`` preset's 40M-row tables).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mlperf_tutor.core.batch import check_model_batch
from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec
from mlperf_tutor.frameworks import jax as fj
from mlperf_tutor.frameworks.jax_optim import make_transformation, schedule_fn
from mlperf_tutor.parallel.jax import device_mesh
from mlperf_tutor.parallel.plan import AXES, MeshShape
from mlperf_tutor.workloads.dlrm.config import DlrmConfig
from mlperf_tutor.workloads.dlrm.data import bag_offsets
from mlperf_tutor.workloads.dlrm.sharding import check_sparse_optimizer, rows_per_device

ROWS = AXES  # the mesh axes a row-wise table is split over: all of them
BATCH = ("data", "fsdp")  # the mesh axes the batch is split over


def make_mesh(shape: MeshShape, devices=None) -> Mesh:
    """:func:`mlperf_tutor.parallel.jax.device_mesh` over exactly ``devices`` (default: all of
    the default backend's): every device holds table rows.

    Raises:
        ValueError: the mesh needs another number of devices than there are.
    """
    devices = jax.devices() if devices is None else list(devices)
    if shape.devices != len(devices):
        raise ValueError(
            f"mesh {shape} needs {shape.devices} devices, but there are {len(devices)}"
        )
    return device_mesh(shape, devices)


def _gather(mesh: Mesh, tables, ids):
    """Rows ``ids`` of each row-wise array in ``tables`` (sharded P(ROWS)), replicated; an id no
    device owns gives a zero row."""

    def local(tables, ids):
        start = jax.lax.axis_index(ROWS) * tables[0].shape[0]
        pos = ids - start
        own = (pos >= 0) & (pos < tables[0].shape[0])
        pos = jnp.where(own, pos, 0)
        rows = [jnp.where(own[:, None], jnp.take(t, pos, axis=0), 0) for t in tables]
        return jax.lax.psum(rows, ROWS)

    spec = [P(ROWS)] * len(tables)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, P()), out_specs=[P()] * len(tables))(
        tables, ids
    )


def _scatter(mesh: Mesh, tables, ids, rows):
    """``tables`` with rows ``ids`` set to ``rows``: each device writes the ids of its own
    block; ids it does not own are dropped."""

    def local(tables, ids, rows):
        n = tables[0].shape[0]
        pos = ids - jax.lax.axis_index(ROWS) * n
        pos = jnp.where((pos >= 0) & (pos < n), pos, n)  # n: past the block, dropped
        return [t.at[pos].set(r, mode="drop") for t, r in zip(tables, rows, strict=True)]

    spec = [P(ROWS)] * len(tables)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, P(), [P()] * len(rows)), out_specs=spec)(
        tables, ids, rows
    )


class ShardedTrainer:
    """Trains DLRM on ``mesh`` with every table row-wise sharded and a sparse Adagrad.

    Args:
        model: a float32 DLRM built by ``wl.build("jax", cfg, weights=...)``; its MLP and cross
            weights are read, and written back by :meth:`weights`.
        cfg: its config.
        spec: the optimizer (Adagrad, the workload's).
        schedule: the learning-rate schedule.
        mesh: from :func:`make_mesh`.

    Raises:
        ValueError: an optimizer other than Adagrad, or weight decay (the sparse update leaves
            untouched rows alone, which decay would not).
    """

    def __init__(
        self,
        model: nnx.Module,
        cfg: DlrmConfig,
        spec: OptimizerSpec,
        schedule: ScheduleSpec,
        mesh: Mesh,
    ):
        check_sparse_optimizer(spec)
        self._model = model
        values = self._structure(model, cfg, spec, schedule, mesh)
        replicated = NamedSharding(mesh, P())
        self._dense = jax.device_put(
            {
                name: v
                for name, v in zip(
                    self._dense_names,
                    (v for i, v in enumerate(values) if i not in self._table_slot),
                    strict=True,
                )
            },
            replicated,
        )
        self._dense_opt = jax.device_put(self._tx.init(self._dense), replicated)
        rows = NamedSharding(mesh, P(ROWS))
        tables = [None] * cfg.num_tables
        for i, f in self._table_slot.items():
            tables[f] = values[i]
        self._tables = [
            self._row_wise(rows, f, lambda start, stop, t=t: np.asarray(t[start:stop]))
            for f, t in enumerate(tables)
        ]
        # The model keeps no copy of the tables (weights() writes them back when asked).
        for bag in model.embedding_bags:
            bag.embedding.set_value(jnp.zeros((0, cfg.embedding_dim), jnp.float32))
        start = spec.initial_accumulator
        self._sums = [
            self._row_wise(
                rows, f, lambda a, b: np.full((b - a, cfg.embedding_dim), start, np.float32)
            )
            for f in range(cfg.num_tables)
        ]
        self._step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
        self._update = jax.jit(self._make_update(schedule), donate_argnums=(0, 1, 2, 3))

    def _structure(self, model, cfg, spec, schedule, mesh) -> list:
        """Set what the step is built from (the split model, the names of the dense leaves,
        the dense optax transformation, the row blocks); returns the model's leaves, which
        may be abstract (:func:`step_memory`)."""
        self.cfg, self.spec, self.mesh = cfg, spec, mesh
        self.devices = mesh.size
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self._graphdef, self._rest = graphdef, rest
        paths = [path for path, _ in nnx.to_flat_state(params)]
        values, self._treedef = jax.tree.flatten(params)
        self._table_slot = {
            i: int(path[1]) for i, path in enumerate(paths) if path[0] == "embedding_bags"
        }
        self._dense_names = tuple(
            ".".join(map(str, p)) for i, p in enumerate(paths) if i not in self._table_slot
        )
        self._tx = make_transformation(spec, schedule, self._dense_names)
        self.local_rows = tuple(rows_per_device(n, self.devices) for n in cfg.table_sizes)
        self._batch_sharding = NamedSharding(mesh, P(BATCH))
        return values

    def _row_wise(self, sharding: NamedSharding, f: int, rows) -> jax.Array:
        """The padded table ``f`` split row-wise, each device's block made on its own from
        ``rows(start, stop)`` (the table's real rows in that range) and zero padding: no
        padded copy of the whole table is made."""
        dim = self.cfg.embedding_dim
        padded = self.devices * self.local_rows[f]

        def block(index) -> np.ndarray:
            start, stop, _ = index[0].indices(padded)
            out = np.zeros((stop - start, dim), np.float32)
            real = rows(min(start, self.cfg.table_sizes[f]), min(stop, self.cfg.table_sizes[f]))
            out[: len(real)] = real
            return out

        return jax.make_array_from_callback((padded, dim), sharding, block)

    def _make_update(self, schedule: ScheduleSpec):
        cfg, mesh, eps = self.cfg, self.mesh, self.spec.eps
        offsets = [int(o) for o in bag_offsets(cfg.multi_hot_sizes)]
        lr_at = schedule_fn(schedule)
        treedef, table_slot, names = self._treedef, self._table_slot, self._dense_names
        graphdef, rest, tx = self._graphdef, self._rest, self._tx
        padded = [self.devices * n for n in self.local_rows]

        def loss_fn(dense, rows, batch):
            dense_values = iter(dense[name] for name in names)
            values = [
                rows[table_slot[i]] if i in table_slot else next(dense_values)
                for i in range(treedef.num_leaves)
            ]
            model = nnx.merge(graphdef, treedef.unflatten(values), rest)
            return model(batch)["loss"]

        def update(dense, dense_opt, tables, sums, step, batch):
            sparse = batch["sparse"]
            uniques, positions = [], []
            for f, (start, stop) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
                ids = sparse[:, start:stop]
                size = min(ids.size, cfg.table_sizes[f])
                # Filled with padded[f]: an id past the padded table, owned by no device.
                uniq, inverse = jnp.unique(
                    ids, size=size, fill_value=padded[f], return_inverse=True
                )
                uniques.append(uniq)
                positions.append(inverse.reshape(ids.shape))
            gathered = [
                _gather(mesh, [t, s], u) for t, s, u in zip(tables, sums, uniques, strict=True)
            ]
            rows = [g[0] for g in gathered]
            local = dict(batch, sparse=jnp.concatenate(positions, axis=1))
            loss, (dense_grads, row_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
                dense, rows, local
            )
            updates, dense_opt = tx.update(dense_grads, dense_opt, dense)
            dense = optax.apply_updates(dense, updates)
            lr = lr_at(step).astype(jnp.float32)
            new_tables, new_sums = [], []
            for (p, s), g, u, t, acc in zip(
                gathered, row_grads, uniques, tables, sums, strict=True
            ):
                s = s + g * g
                p = p + (-lr) * (g / (jnp.sqrt(s) + eps))
                t, acc = _scatter(mesh, [t, acc], u, [p, s])
                new_tables.append(t)
                new_sums.append(acc)
            return dense, dense_opt, new_tables, new_sums, step + 1, loss

        return update

    def step(self, batch: Mapping[str, np.ndarray]) -> jax.Array:
        """One update on the global ``batch`` (split over the data and fsdp axes); returns the
        loss before it (the global batch's mean)."""
        check_model_batch(self._model, batch)  # an id past its table: one BatchError
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if len(batch["labels"]) % shards:
            raise ValueError(
                f"the batch of {len(batch['labels'])} samples does not split over the "
                f"{shards} batch shards (data x fsdp) of the mesh"
            )
        arrays = jax.device_put(dict(batch), self._batch_sharding)
        self._dense, self._dense_opt, self._tables, self._sums, self._step, loss = self._update(
            self._dense, self._dense_opt, self._tables, self._sums, self._step, arrays
        )
        return loss

    @property
    def tables(self) -> list[jax.Array]:
        """The padded, row-sharded tables (read only: the next step donates them)."""
        return self._tables

    @property
    def accumulators(self) -> list[jax.Array]:
        """The padded, row-sharded Adagrad accumulators of the tables."""
        return self._sums

    def weights(self) -> dict[str, np.ndarray]:
        """Canonical weights (numpy copies; the tables without their padding rows)."""
        values = [None] * self._treedef.num_leaves
        dense = iter(self._dense[name] for name in self._dense_names)
        for i in range(self._treedef.num_leaves):
            values[i] = self._tables[self._table_slot[i]] if i in self._table_slot else next(dense)
        host = [np.asarray(v) for v in values]
        for i, f in self._table_slot.items():
            host[i] = host[i][: self.cfg.table_sizes[f]]
        nnx.update(self._model, self._treedef.unflatten([jnp.asarray(v) for v in host]))
        return fj.to_canonical(self._model)

    def table_accumulators(self) -> dict[str, np.ndarray]:
        """Canonical name -> Adagrad accumulator of each table (without padding rows)."""
        return {
            f"embedding_bags.{f}.weight": np.asarray(s)[: self.cfg.table_sizes[f]]
            for f, s in enumerate(self._sums)
        }


def step_memory(
    cfg: DlrmConfig, spec: OptimizerSpec, schedule: ScheduleSpec, mesh: Mesh, batch_size: int
) -> dict[str, int]:
    """Per-device bytes of :class:`ShardedTrainer`'s compiled step for ``cfg`` on ``mesh``,
    from XLA's memory analysis of the step compiled for abstract arrays: nothing is allocated,
    so the ``mlperf`` preset's 40M-row tables can be checked on a laptop.

    Returns:
        ``arguments`` (tables, accumulators, MLPs, their optimizer state and the batch slice
        one device holds), ``outputs``, ``aliased`` (outputs written into donated arguments)
        and ``temporaries`` (the step's working memory: gathered rows, activations, gradients).
    """
    from mlperf_tutor.workloads.dlrm.jax_model import Dlrm

    model = nnx.eval_shape(lambda: Dlrm(cfg, rngs=nnx.Rngs(0)))
    tr = ShardedTrainer.__new__(ShardedTrainer)
    values = tr._structure(model, cfg, spec, schedule, mesh)
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(ROWS))

    def abstract(x, sharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    dense = {
        name: abstract(v, replicated)
        for name, v in zip(
            tr._dense_names,
            (v for i, v in enumerate(values) if i not in tr._table_slot),
            strict=True,
        )
    }
    dense_opt = jax.tree.map(lambda x: abstract(x, replicated), jax.eval_shape(tr._tx.init, dense))
    tables = [
        jax.ShapeDtypeStruct((tr.devices * n, cfg.embedding_dim), jnp.float32, sharding=rows)
        for n in tr.local_rows
    ]
    batch = {
        "dense": jax.ShapeDtypeStruct((batch_size, cfg.num_dense), jnp.float32),
        "sparse": jax.ShapeDtypeStruct((batch_size, sum(cfg.multi_hot_sizes)), jnp.int32),
        "labels": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
    }
    batch = jax.tree.map(lambda x: abstract(x, tr._batch_sharding), batch)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    compiled = (
        jax.jit(tr._make_update(schedule), donate_argnums=(0, 1, 2, 3))
        .lower(dense, dense_opt, tables, tables, step, batch)
        .compile()
    )
    stats = compiled.memory_analysis()
    return {
        "arguments": int(stats.argument_size_in_bytes),
        "outputs": int(stats.output_size_in_bytes),
        "aliased": int(stats.alias_size_in_bytes),
        "temporaries": int(stats.temp_size_in_bytes),
    }
