"""The framework-free parallel plan: a mesh of named axes and the split of every parameter.

A :class:`MeshShape` has three named axes, outermost first:

* ``data``: replicas that each hold the whole model and see different examples (DDP, JAX's
  batch split, ``tf.distribute.MirroredStrategy``, Keras ``DataParallel``);
* ``fsdp``: devices that see different examples *and* each hold a slice of every parameter,
  gradient and optimizer state, gathering a layer's weights just before they are used (FSDP2's
  ``fully_shard``, ZeRO-3; in JAX, parameters split over the axis and GSPMD's all-gathers);
* ``tensor``: devices that see the same examples and split each layer's heads and MLP width
  between them (Megatron's tensor parallelism: ``ColwiseParallel``/``RowwiseParallel``).

The batch is split over ``data`` × ``fsdp``. :func:`plan` gives each canonical parameter a
*partition*: for each of its dimensions, the mesh axes that split it (outermost first), from the
workload's logical axes (``Workload.logical_axes``: :mod:`mlperf_tutor.layers.axes` for the
transformers, embedding rows for DLRM) through :data:`MESH_AXES`. A dimension is split only
where the axes' sizes divide it evenly. A parameter no rule splits over ``fsdp`` is split over it
by its largest dimension that no other axis splits and that ``fsdp`` divides (so that FSDP holds
a slice of every parameter that can be sliced, one mesh axis per dimension); the rest is
replicated. The three frameworks realise the same partition
(``mlperf_tutor.parallel.{torch,jax,tf}``), and a test checks each device's shard shapes
against :meth:`Plan.shard_shape`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

AXES = ("data", "fsdp", "tensor")  # outermost first; a device's rank counts tensor fastest

# Which mesh axes split each logical axis (see mlperf_tutor.layers.axes for their meaning).
MESH_AXES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "embed": ("fsdp",),
    "rows": ("data", "fsdp", "tensor"),  # DLRM's row-wise embedding tables: over every device
}


class ParallelError(ValueError):
    """A mesh or plan that cannot be realised (bad mesh text, wrong device count)."""


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Sizes of the three mesh axes (each at least 1)."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        for axis in AXES:
            size = getattr(self, axis)
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ParallelError(f"mesh axis {axis} must be a positive integer, got {size!r}")

    @classmethod
    def parse(cls, text: str, devices: int | None = None) -> MeshShape:
        """``"data=2,fsdp=2,tensor=2"``; axes left out are 1, and one axis may be ``-1``: the
        devices the others leave (``devices`` is then required).

        Raises:
            ParallelError: an unknown axis, a repeated one, a size that is not a positive
                integer (or -1), more than one -1, or sizes whose product is not ``devices``.
        """
        sizes: dict[str, int] = {}
        for part in text.split(","):
            axis, eq, value = part.strip().partition("=")
            axis = axis.strip()
            if not eq or axis not in AXES:
                raise ParallelError(
                    f"mesh {text!r}: expected AXIS=SIZE parts with AXIS one of {list(AXES)}, "
                    f"got {part.strip()!r}"
                )
            if axis in sizes:
                raise ParallelError(f"mesh {text!r}: axis {axis} is given twice")
            if not re.fullmatch(r"\s*(-1|[1-9][0-9]{0,5})\s*", value):
                raise ParallelError(
                    f"mesh {text!r}: {axis} must be a positive integer or -1, got {value!r}"
                )
            sizes[axis] = int(value)
        rest = [axis for axis, size in sizes.items() if size == -1]
        if len(rest) > 1:
            raise ParallelError(f"mesh {text!r}: only one axis can be -1, got {rest}")
        known = math.prod(size for size in sizes.values() if size != -1)
        if rest:
            if devices is None:
                raise ParallelError(f"mesh {text!r}: -1 needs the device count")
            if devices % known:
                raise ParallelError(
                    f"mesh {text!r}: the other axes ({known} devices) do not divide the "
                    f"{devices} devices"
                )
            sizes[rest[0]] = devices // known
        mesh = cls(**sizes)
        if devices is not None and mesh.devices != devices:
            raise ParallelError(
                f"mesh {mesh} needs {mesh.devices} devices, but there are {devices}"
            )
        return mesh

    @property
    def sizes(self) -> dict[str, int]:
        """Axis name -> size, outermost first (all three axes)."""
        return {axis: getattr(self, axis) for axis in AXES}

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def batch_shards(self) -> int:
        """How many slices the batch is split into (``data`` × ``fsdp``)."""
        return self.data * self.fsdp

    def coords(self, rank: int) -> dict[str, int]:
        """The index of device ``rank`` on each axis (ranks count ``tensor`` fastest, then
        ``fsdp``, then ``data``, as the frameworks' meshes lay devices out).

        Raises:
            ParallelError: ``rank`` is not a device of the mesh.
        """
        if not 0 <= rank < self.devices:
            raise ParallelError(f"mesh {self} has devices 0 to {self.devices - 1}, not {rank}")
        out = {}
        for axis in reversed(AXES):
            rank, out[axis] = divmod(rank, getattr(self, axis))
        return {axis: out[axis] for axis in AXES}

    def __str__(self) -> str:
        return ",".join(f"{axis}={size}" for axis, size in self.sizes.items())


Partition = tuple[tuple[str, ...], ...]  # per dimension, the mesh axes that split it


def partition(
    shape: tuple[int, ...], logical: tuple[str | None, ...], mesh: MeshShape
) -> Partition:
    """The mesh axes that split each dimension of a parameter of ``shape`` whose dimensions have
    the logical axes ``logical`` (see the module docstring for the rules)."""
    used: set[str] = set()
    out: list[tuple[str, ...]] = []
    for size, axis in zip(shape, logical, strict=True):
        split: list[str] = []
        for mesh_axis in MESH_AXES.get(axis, ()) if axis else ():
            n = mesh.sizes[mesh_axis]
            if (
                n > 1
                and mesh_axis not in used
                and size % (math.prod(map(mesh.sizes.get, split)) * n) == 0
            ):
                split.append(mesh_axis)
        used.update(split)
        out.append(tuple(split))
    if mesh.fsdp > 1 and "fsdp" not in used:  # FSDP's slice of what no rule splits over it
        free = [d for d in range(len(shape)) if not out[d] and shape[d] % mesh.fsdp == 0]
        if free:
            dim = max(free, key=lambda d: (shape[d], -d))
            out[dim] = ("fsdp",)
    return tuple(out)


def shard_shape(shape: tuple[int, ...], part: Partition, mesh: MeshShape) -> tuple[int, ...]:
    """The shape of one device's slice of a parameter of ``shape`` split as ``part``."""
    return tuple(
        size // math.prod(mesh.sizes[a] for a in axes)
        for size, axes in zip(shape, part, strict=True)
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    """A mesh and the partition of every canonical parameter of one model.

    Attributes:
        mesh: the mesh.
        shapes: canonical name -> full shape.
        partitions: canonical name -> per dimension, the mesh axes that split it.
    """

    mesh: MeshShape
    shapes: Mapping[str, tuple[int, ...]]
    partitions: Mapping[str, Partition]

    def shard_shape(self, name: str) -> tuple[int, ...]:
        """One device's slice of parameter ``name``."""
        return shard_shape(self.shapes[name], self.partitions[name], self.mesh)

    def device_slices(self, name: str, rank: int) -> tuple[slice, ...]:
        """Which part of parameter ``name`` device ``rank`` holds: a slice per dimension (the
        axes splitting a dimension index it outermost first, as a row-major grid)."""
        coords = self.mesh.coords(rank)
        out = []
        for size, axes in zip(self.shapes[name], self.partitions[name], strict=True):
            index = 0
            for axis in axes:
                index = index * self.mesh.sizes[axis] + coords[axis]
            step = size // math.prod(self.mesh.sizes[a] for a in axes)
            out.append(slice(index * step, (index + 1) * step))
        return tuple(out)

    def split_over(self, name: str, axis: str) -> int | None:
        """The dimension of ``name`` that mesh axis ``axis`` splits (None: replicated on it)."""
        for dim, axes in enumerate(self.partitions[name]):
            if axis in axes:
                return dim
        return None


def plan(wl, cfg, mesh: MeshShape) -> Plan:
    """The plan of workload ``wl``'s model ``cfg`` on ``mesh`` (see the module docstring).

    Raises:
        ValueError: ``mesh`` splits what the workload cannot split evenly (for example a
            ``tensor`` size that does not divide the attention heads).
    """
    wl.check_mesh(cfg, mesh)
    shapes = {name: tuple(shape) for name, (shape, _) in wl.canonical_specs(cfg).items()}
    logical = wl.logical_axes(cfg)
    return Plan(
        mesh,
        shapes,
        {name: partition(shape, logical[name], mesh) for name, shape in shapes.items()},
    )
