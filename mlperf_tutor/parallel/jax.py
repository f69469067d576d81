"""The parallel plan realised in JAX: a ``jax.sharding.Mesh``, a ``NamedSharding`` per parameter,
and GSPMD's partitioner in the jitted step.

JAX needs no wrapper around the model: the step is written for the whole (global) arrays, each
array carries its sharding, and ``jax.jit`` with input and output shardings lets XLA's SPMD
partitioner insert the all-gathers, reduce-scatters and all-reduces that the plan implies
(``fsdp``: parameters gathered before use, gradients reduce-scattered; ``tensor``: Megatron's
column/row splits, one all-reduce after ``o_proj`` and ``fc_out``; ``data`` × ``fsdp``: the batch
split). A loss that is a mean over labelled tokens stays the global-batch mean, because the
program computes it on the global arrays.

* :func:`device_mesh`: the mesh (axes ``data``, ``fsdp``, ``tensor``; tensor fastest).
* :func:`shardings`: canonical name -> ``NamedSharding`` from :class:`~.plan.Plan`'s partitions,
  permuted to the JAX leaf's layout where it differs from the canonical (PyTorch) one (a Linear
  kernel is ``(in, out)``) by the adapter's layout rules.
* :func:`batch_sharding`: dimension 0 over ``data`` × ``fsdp``.
* Training: ``frameworks.jax.Trainer(model, spec, schedule, plan=plan)`` places parameters,
  optimizer state (like its parameter) and batches with these shardings and compiles its step
  with them; its Orbax ``save`` writes the sharded arrays and ``restore`` reads them onto the
  trainer's own mesh (any mesh, or one device).
* :func:`local_shard_shapes`: one device's slice of each parameter, to check against
  :meth:`~.plan.Plan.shard_shape`.

On a CPU, JAX sees several devices only when ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
is set before it is imported.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mlperf_tutor.frameworks import jax as fj
from mlperf_tutor.parallel.plan import AXES, MeshShape, ParallelError, Partition, Plan

BATCH_AXES = ("data", "fsdp")  # the mesh axes that split the batch (plan.MESH_AXES["batch"])


def device_mesh(mesh: MeshShape, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``jax.sharding.Mesh`` of shape ``mesh`` over the first ``mesh.devices`` devices.

    Args:
        mesh: the axis sizes.
        devices: the devices to use (None: ``jax.devices()``, the default backend's).

    Returns:
        The mesh, axes named ``("data", "fsdp", "tensor")``; consecutive devices differ in
        ``tensor`` first (the plan's rank order).

    Raises:
        ParallelError: fewer devices than the mesh needs.
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < mesh.devices:
        platform = devices[0].platform if devices else "jax"
        raise ParallelError(
            f"mesh {mesh} needs {mesh.devices} devices, but there are {len(devices)} "
            f"({platform}); choose a smaller mesh (on a CPU, set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={mesh.devices} before jax is "
            "imported)"
        )
    grid = np.empty(mesh.devices, dtype=object)
    grid[:] = devices[: mesh.devices]
    return Mesh(grid.reshape(mesh.data, mesh.fsdp, mesh.tensor), AXES)


def check_mesh(jax_mesh: Mesh, mesh: MeshShape) -> Mesh:
    """``jax_mesh`` if its axes are ``("data", "fsdp", "tensor")`` with ``mesh``'s sizes.

    Raises:
        ParallelError: other axis names or sizes.
    """
    sizes = dict(zip(jax_mesh.axis_names, jax_mesh.devices.shape, strict=True))
    if tuple(jax_mesh.axis_names) != AXES or sizes != mesh.sizes:
        raise ParallelError(
            f"the jax mesh has axes {sizes}, but the plan is for mesh {mesh}; make it with "
            "mlperf_tutor.parallel.jax.device_mesh(plan.mesh)"
        )
    return jax_mesh


def partition_spec(part: Partition) -> PartitionSpec:
    """The ``PartitionSpec`` of a plan partition: one entry per dimension, None where nothing
    splits it, one axis name, or a tuple of names (outermost first) where several do."""
    return PartitionSpec(
        *(None if not axes else axes[0] if len(axes) == 1 else axes for axes in part)
    )


def _layout(part: Partition, perm: tuple[int, ...] | None) -> Partition:
    """A canonical-layout partition in the JAX leaf's layout. ``perm`` takes the JAX layout to
    the canonical one (canonical dimension i is JAX dimension ``perm[i]``)."""
    if not perm:
        return part
    return tuple(part[i] for i in np.argsort(perm))


def shardings(
    plan: Plan, jax_mesh: Mesh, model: nnx.Module | None = None
) -> dict[str, NamedSharding]:
    """Canonical name -> ``NamedSharding`` of each parameter of ``plan``.

    Args:
        plan: the plan (canonical names, canonical layouts).
        jax_mesh: a mesh of ``plan.mesh``'s shape (:func:`device_mesh`).
        model: the NNX model whose leaves are placed. Given, each spec is in the JAX leaf's
            layout (permuted by the adapter's layout rules, e.g. a Linear kernel's ``(in, out)``),
            and the model's canonical names must be the plan's; None: canonical layouts (for
            canonical numpy arrays).

    Raises:
        ParallelError: a mesh of another shape, or a model whose parameters are not the plan's.
    """
    check_mesh(jax_mesh, plan.mesh)
    perms: dict[str, tuple[int, ...] | None] = {}
    if model is not None:
        perms = {leaf.name: leaf.perm for leaf in fj._leaves(model)}
        if set(perms) != set(plan.partitions):
            missing = sorted(set(plan.partitions) - set(perms))
            extra = sorted(set(perms) - set(plan.partitions))
            raise ParallelError(
                f"the model's parameters are not the plan's (plan only: {missing[:5]}, model "
                f"only: {extra[:5]}); make the plan from the model's workload and config"
            )
    return {
        name: NamedSharding(jax_mesh, partition_spec(_layout(part, perms.get(name))))
        for name, part in plan.partitions.items()
    }


def batch_sharding(jax_mesh: Mesh) -> NamedSharding:
    """Dimension 0 (the examples) split over ``data`` × ``fsdp``; replicated over ``tensor``."""
    return NamedSharding(jax_mesh, PartitionSpec(BATCH_AXES))


def replicated(jax_mesh: Mesh) -> NamedSharding:
    """A whole copy on every device of ``jax_mesh`` (RNG streams, step counters, the loss)."""
    return NamedSharding(jax_mesh, PartitionSpec())


def local_shard_shapes(trainer_or_model) -> dict[str, tuple[int, ...]]:
    """Canonical name -> the shape of one device's shard of each parameter (from the arrays'
    ``addressable_shards``), in the canonical layout, so it compares with
    :meth:`Plan.shard_shape`.

    Args:
        trainer_or_model: a ``frameworks.jax.Trainer`` or an NNX model.

    Raises:
        ParallelError: a parameter whose addressable shards differ in shape (an uneven split).
    """
    model = trainer_or_model
    if not isinstance(model, nnx.Module):  # a Trainer: its model holds its arrays
        model = trainer_or_model.model
    out = {}
    for leaf in fj._leaves(model):
        shapes = {tuple(s.data.shape) for s in leaf.variable.get_value().addressable_shards}
        if len(shapes) != 1:
            raise ParallelError(f"{leaf.name}: shards of unequal shapes {sorted(shapes)}")
        (shape,) = shapes
        out[leaf.name] = tuple(shape[i] for i in leaf.perm) if leaf.perm else shape
    return out
