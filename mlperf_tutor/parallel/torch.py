"""The parallel plan realised in PyTorch: DeviceMesh, tensor parallelism, FSDP2, DCP.

Everything here is one of torch's own engines, driven by the framework-free
:class:`~mlperf_tutor.parallel.plan.Plan`:

* :func:`device_mesh`: ``init_device_mesh`` with all three named axes ("data", "fsdp",
  "tensor"; size-1 axes included, so that code can always ask for ``mesh["tensor"]``);
* :func:`parallelize`: the ``tensor`` axis through ``parallelize_module``
  (``ColwiseParallel`` for the layers whose output rows the plan splits over ``tensor``: q, k,
  v, ``fc_in``, ``fc_gate``, an untied LM head; ``RowwiseParallel`` for those whose input columns
  it splits: ``o_proj``, ``fc_out``; ``RowwiseParallel`` on an ``nn.Embedding`` split by rows is
  the vocabulary-parallel embedding). Llama's fused ``qkv_proj`` is whole on every ``tensor``
  device, as the plan says, so its ``o_proj`` takes a replicated input and slices it.
  A head that reads the split embedding matrix (GPT's tied one) computes on DTensors and its
  cross-entropy runs under ``loss_parallel``. Then the ``data`` and ``fsdp`` axes through
  FSDP2's ``fully_shard``, per transformer block and then the root, with
  ``shard_placement_fn`` putting each parameter's FSDP slice on the dimension the plan names;
  with ``data`` > 1 the mesh given to ``fully_shard`` is 2-D (data, fsdp): HSDP, which
  replicates over ``data`` and all-reduces gradients there (with fsdp=1 that is DDP's
  arithmetic on the engine that composes with tensor-parallel DTensors). A data-only mesh is
  ``DistributedDataParallel``. Under "bf16", ``fully_shard`` gets a ``MixedPrecisionPolicy``
  (bf16 compute, float32 parameters and reductions);
* :class:`ShardedTrainer`: :class:`~mlperf_tutor.frameworks.torch.Trainer`'s interface on a
  mesh (a subclass: every state method changes, so a ``plan=`` branch in each of the Trainer's
  would be longer); it takes the global batch, trains on its slice and reports the global
  batch's loss; full canonical weights and optimizer state through
  ``torch.distributed.checkpoint.state_dict`` (``get_/set_model_state_dict``,
  ``get_/set_optimizer_state_dict`` with ``full_state_dict``), sharded checkpoints through
  ``torch.distributed.checkpoint`` (DCP), which reshards on load (a checkpoint written on
  fsdp=2,tensor=2 reads on fsdp=2, tensor=2 or data=2).

Where FSDP2 departs from the plan: ``fully_shard`` shards *every* parameter it manages. A
parameter the plan leaves whole on ``fsdp`` (a tensor-split bias, a dimension ``fsdp`` does not
divide) gets FSDP2's default, dimension 0 in padded chunks; :func:`local_shard_shapes` reports
what is really held, and the tests name these parameters (see :func:`fsdp_departures`).

Limits: a column-parallel LoRA layer has no style here (Llama's adapters sit on the whole
``qkv_proj`` and on the row-parallel ``o_proj``); a model whose code computes on the embedding
matrix with plain-tensor operations beyond the loss (BERT's tied MLM head: ``x @ W.T + bias``,
then a masked weighted sum) cannot take a vocabulary-split matrix, so it has no tensor mesh.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleOutput,
    RowwiseParallel,
    loss_parallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel

from mlperf_tutor.core.batch import check_model_batch
from mlperf_tutor.core.checkpoint import CheckpointError, Tree, check_tree
from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec, state_key
from mlperf_tutor.frameworks.torch import (
    PRECISIONS,
    Optimizer,
    Trainer,
    from_numpy,
    to_numpy,
)
from mlperf_tutor.layers.torch.block import TransformerBlock
from mlperf_tutor.layers.torch.lora import LoRALinear
from mlperf_tutor.parallel.plan import AXES, MeshShape, ParallelError, Plan
from mlperf_tutor.workloads.base import LossTerm, examples

# --- the mesh -------------------------------------------------------------------------------


def device_mesh(mesh: MeshShape, device_type: str = "cpu") -> DeviceMesh:
    """The ``DeviceMesh`` of ``mesh`` over the initialised process group: shape (data, fsdp,
    tensor), all three named (size-1 axes too), ranks counting tensor fastest.

    Args:
        mesh: the mesh; its size must be the world size.
        device_type: "cpu" (gloo) or "cuda" (NCCL).

    Raises:
        ParallelError: no process group is initialised (launch with torchrun, or call
            ``torch.distributed.init_process_group`` first), or the mesh does not use exactly
            the world's processes.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ParallelError(
            f"mesh {mesh}: no torch.distributed process group; launch with torchrun "
            "(python -m torch.distributed.run --nproc-per-node N) or call "
            'torch.distributed.init_process_group("gloo") first'
        )
    world = dist.get_world_size()
    if mesh.devices != world:
        raise ParallelError(
            f"mesh {mesh} needs {mesh.devices} processes, but the process group has {world}; "
            "launch as many processes as the mesh has devices"
        )
    sizes = mesh.sizes
    return init_device_mesh(device_type, tuple(sizes[a] for a in AXES), mesh_dim_names=AXES)


def _check_mesh(plan: Plan, mesh: DeviceMesh) -> None:
    sizes = dict(zip(mesh.mesh_dim_names or (), mesh.mesh.shape, strict=True))
    if sizes != plan.mesh.sizes:
        raise ParallelError(
            f"the device mesh {sizes} is not the plan's mesh {plan.mesh}; build it with "
            "device_mesh(plan.mesh)"
        )


# --- tensor parallelism ---------------------------------------------------------------------


def _tensor_dim(plan: Plan, name: str) -> int | None:
    return plan.split_over(name, "tensor") if name in plan.partitions else None


def tensor_parallel_styles(model: nn.Module, plan: Plan) -> dict[str, Any]:
    """Module name -> ``parallelize_module`` style realising the plan's ``tensor`` splits.

    A Linear whose weight rows the plan splits is column-parallel: its output stays split
    (``Shard(-1)``, local) when a row-parallel sibling reads it (q/k/v before ``o_proj``,
    ``fc_in``/``fc_gate`` before ``fc_out``), and is gathered otherwise (an untied LM head). A
    Linear whose weight columns are split is row-parallel: its input is split when a sibling
    made it so, else replicated and sliced (``o_proj`` after Llama's whole ``qkv_proj``). An
    Embedding split by rows is vocabulary-parallel. A model whose head reads the split
    embedding matrix directly (GPT's tied head) gets its ``final_norm`` output as a replicated
    DTensor, so that the head's matmul runs on DTensors.
    """
    columns, rows, embeddings = {}, {}, []
    for name, module in model.named_modules():
        dim = _tensor_dim(plan, f"{name}.weight")
        if dim is None:
            continue
        if isinstance(module, nn.Embedding) and dim == 0:
            embeddings.append(name)
        elif isinstance(module, nn.Linear) and dim == 0:
            columns[name] = name.rpartition(".")[0]
        elif isinstance(module, nn.Linear) and dim == 1:
            rows[name] = name.rpartition(".")[0]
    # Adapters ("o_proj.lora_a") follow their layer's style, set by apply_tensor_parallel.
    columns = {n: p for n, p in columns.items() if not n.endswith((".lora_a", ".lora_b"))}
    rows = {n: p for n, p in rows.items() if not n.endswith((".lora_a", ".lora_b"))}
    styles: dict[str, Any] = {}
    for name, parent in columns.items():
        feeds_row = parent in rows.values()
        styles[name] = ColwiseParallel(output_layouts=Shard(-1) if feeds_row else Replicate())
    for name, parent in rows.items():
        from_column = parent in columns.values()
        styles[name] = RowwiseParallel(input_layouts=Shard(-1) if from_column else Replicate())
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and name in styles:
            if name in columns:
                raise ParallelError(
                    f"{name}: a column-parallel LoRA layer has no tensor-parallel style here; "
                    "keep its weight whole on the tensor axis"
                )
            styles[name] = _RowwiseLoRA(styles[name].input_layouts[0], plan, name)
    for name in embeddings:
        styles[name] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    tied_head = embeddings and not any(n.endswith("lm_head.weight") for n in plan.shapes)
    if tied_head and isinstance(getattr(model, "final_norm", None), nn.Module):
        styles["final_norm"] = PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=Replicate(), use_local_output=False
        )
    return styles


class _RowwiseLoRA(ParallelStyle):
    """``RowwiseParallel`` for a :class:`LoRALinear`: the input sliced by columns, the base
    weight and ``lora_a`` split by columns (``Shard(1)``), ``lora_b`` and the bias whole, the
    partial sums of both branches all-reduced once at the output. ``RowwiseParallel`` itself
    takes a plain ``nn.Linear`` only (it would try to split the adapter's dropout)."""

    def __init__(self, input_layout, plan: Plan, prefix: str):
        super().__init__()
        self.input_layout, self.plan, self.prefix = input_layout, plan, prefix

    def _partition(self, name, module, mesh):
        for pname, param in list(module.named_parameters(recurse=False)):
            dim = _tensor_dim(self.plan, ".".join(p for p in (self.prefix, name, pname) if p))
            placement = Shard(dim) if dim is not None else Replicate()
            dist_param = distribute_tensor(param, mesh, [placement])
            module.register_parameter(
                pname, nn.Parameter(dist_param, requires_grad=param.requires_grad)
            )

    def _input(self, module, inputs, mesh):
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [self.input_layout], run_check=False)
        return (x.redistribute(mesh, [Shard(-1)]), *inputs[1:])

    @staticmethod
    def _output(module, output, mesh):
        return output.redistribute(mesh, [Replicate()]).to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition, self._input, self._output)


def apply_tensor_parallel(model: nn.Module, plan: Plan, tp_mesh: DeviceMesh) -> None:
    """Apply :func:`tensor_parallel_styles` with ``parallelize_module``, then put every
    DTensor parameter on the placement the plan names (a row-parallel LoRA layer's styles
    split its ``lora_b`` too, which the plan keeps whole)."""
    parallelize_module(model, tp_mesh, tensor_parallel_styles(model, plan))
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not isinstance(param, DTensor):
                continue
            dim = _tensor_dim(plan, f"{module_name}.{name}".lstrip("."))
            want = (Shard(dim),) if dim is not None else (Replicate(),)
            if tuple(param.placements) != want:
                moved = param.detach().redistribute(tp_mesh, want)
                module.register_parameter(
                    name, nn.Parameter(moved, requires_grad=param.requires_grad)
                )


# --- FSDP2 ----------------------------------------------------------------------------------


def fsdp_departures(plan: Plan) -> list[str]:
    """Canonical names the plan keeps whole on ``fsdp`` but FSDP2 still shards (on dimension
    0, padded): ``fully_shard`` has no per-parameter "replicate"."""
    if plan.mesh.fsdp == 1:
        return []
    return [name for name in plan.partitions if plan.split_over(name, "fsdp") is None]


def apply_fsdp(
    model: nn.Module,
    plan: Plan,
    dp_mesh: DeviceMesh,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> None:
    """``fully_shard`` each transformer block, then the root, over ``dp_mesh`` (1-D: FSDP;
    2-D (data, fsdp): HSDP), each parameter's slice on the dimension the plan splits over
    ``fsdp`` (``shard_placement_fn``); FSDP2's default, dimension 0, where the plan names
    none."""
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}

    def placement(param: nn.Parameter) -> Shard | None:
        dim = plan.split_over(names[id(param)], "fsdp")
        return None if dim is None else Shard(dim)

    options = {"mesh": dp_mesh, "shard_placement_fn": placement}
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            fully_shard(module, **options)
    fully_shard(model, **options)


def parallelize(
    model: nn.Module, plan: Plan, mesh: DeviceMesh, *, precision: str = "fp32"
) -> nn.Module:
    """Shard ``model`` (a workload's torch model, canonical names) in place as ``plan`` says:
    tensor parallelism first, then FSDP2/HSDP over (data, fsdp); on a data-only mesh,
    ``DistributedDataParallel``. See the module docstring.

    Args:
        model: float32, on the mesh's device type.
        plan: ``mlperf_tutor.parallel.plan(wl, cfg, mesh_shape)``.
        mesh: :func:`device_mesh` of ``plan.mesh``.
        precision: "bf16" gives ``fully_shard`` the mixed-precision policy (bf16 compute,
            float32 parameters and gradient reductions).

    Returns:
        The module to call: the model itself, or on a data-only mesh its
        ``DistributedDataParallel`` wrapper (``.module`` is the model, whose parameters and
        names are unchanged).

    Raises:
        ParallelError: ``mesh`` is not the plan's.
    """
    _check_mesh(plan, mesh)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    shape = plan.mesh
    if shape.data > 1 and shape.fsdp == 1 and shape.tensor == 1:
        # Whole parameters, gradients all-reduced in buckets during the backward. bf16 runs
        # under the trainer's autocast (DDP has no mixed-precision policy of its own).
        # find_unused_parameters: a parameter the loss never reaches (the attention's detached
        # key bias, whose gradient is exactly zero) would otherwise stall DDP's buckets.
        return DistributedDataParallel(
            model, process_group=mesh["data"].get_group(), find_unused_parameters=True
        )
    if shape.tensor > 1:
        apply_tensor_parallel(model, plan, mesh["tensor"])
    if shape.batch_shards > 1:
        dp_mesh = mesh["data", "fsdp"] if shape.data > 1 else mesh["fsdp"]
        policy = None
        if precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        apply_fsdp(model, plan, dp_mesh, policy)
    return model


def local_shard_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Canonical name -> the shape of the slice of each parameter this process holds (the
    DTensor's local tensor; the whole shape for a plain parameter)."""
    return {
        name: tuple((p.to_local() if isinstance(p, DTensor) else p).shape)
        for name, p in model.named_parameters()
    }


# --- the sharded trainer --------------------------------------------------------------------


class ShardedOptimizer(Optimizer):
    """:class:`~mlperf_tutor.frameworks.torch.Optimizer` over DTensor parameters: the global
    gradient norm of the clip is summed over every shard (``full_tensor``); the update is
    torch's own, per shard."""

    def step(self, grads=None) -> None:
        if grads is not None:
            raise ValueError("a sharded optimizer steps on the gradients of its parameters")
        for p in self.named.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.spec.clip_norm is not None:
            _clip_grad_norm(list(self.named.values()), self.spec.clip_norm)
        self.native.step()
        self.scheduler.step()


@torch.no_grad()
def _clip_grad_norm(params: list[torch.Tensor], clip_norm: float) -> None:
    # The spec's clip (clip_norm / max(norm, clip_norm), float64 norm), on sharded gradients.
    squares = 0.0
    for p in params:
        norm = torch.linalg.vector_norm(p.grad, 2, dtype=torch.float64)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares += float(norm) ** 2
    scale = clip_norm / max(math.sqrt(squares), clip_norm)
    for p in params:
        p.grad.mul_(scale)


def _float32(value: torch.Tensor) -> torch.Tensor:
    """A loss term as a plain float32 tensor (a DTensor's full value)."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.to(torch.float32)


class ShardedTrainer(Trainer):
    """:class:`~mlperf_tutor.frameworks.torch.Trainer` on a mesh: every process builds the same
    model, :func:`parallelize` shards it, and :meth:`step` takes the *global* batch, of which
    each process trains on its slice (the batch is split over data x fsdp; tensor devices share
    a slice).

    The loss is the global batch's: each mean the loss sums (the workload's
    :meth:`~mlperf_tutor.workloads.base.Workload.loss_terms`: labelled tokens, masked positions,
    examples) is weighted by the slice's share of its count, so that FSDP's (or DDP's) average
    of the gradients over the slices is the gradient of the global loss.

    Args:
        model: a workload model (float32, CPU), as for ``Trainer``.
        spec, schedule: the optimizer and its schedule.
        plan: the model's :class:`Plan`.
        mesh: :func:`device_mesh` of ``plan.mesh`` (None: built here).
        terms: the means the model's loss sums, with their counts (``wl.loss_terms(cfg)``;
            default: one mean over examples).
        precision: "fp32", or "bf16" (FSDP2's ``MixedPrecisionPolicy`` and the Trainer's
            autocast; frozen parameters stay float32 here).
        seed: seeds torch's generators.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: OptimizerSpec,
        schedule: ScheduleSpec,
        plan: Plan,
        mesh: DeviceMesh | None = None,
        *,
        terms: Sequence[LossTerm] = (LossTerm("loss", examples),),
        precision: str = "fp32",
        seed: int = 0,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
        self.plan = plan
        self.mesh = device_mesh(plan.mesh) if mesh is None else mesh
        self.precision = precision
        self.device = torch.device(self.mesh.device_type)
        self._bf16_frozen: set[str] = set()
        self._forward = parallelize(model.to(self.device), plan, self.mesh, precision=precision)
        self._model = model
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.optimizer = ShardedOptimizer(spec, schedule, named)
        self.compiled = False
        self.terms = tuple(terms)
        shape = plan.mesh
        self._slice_index = self.mesh.get_local_rank(
            "data"
        ) * shape.fsdp + self.mesh.get_local_rank("fsdp")
        torch.manual_seed(seed)

    def _slices(self, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        # Every process's slice of the global batch, in slice order (data-major).
        shards = self.plan.mesh.batch_shards
        sizes = {len(v) for v in batch.values()}
        size = sizes.pop() if len(sizes) == 1 else None
        if size is None or size % shards:
            raise ParallelError(
                f"mesh {self.plan.mesh} splits the batch into {shards} slices; the global batch "
                f"size ({sorted({len(v) for v in batch.values()})}) must be one multiple of it"
            )
        per = size // shards
        return [{k: v[i * per : (i + 1) * per] for k, v in batch.items()} for i in range(shards)]

    def step(self, batch: Mapping[str, np.ndarray]) -> torch.Tensor:
        """One update on the global ``batch`` (every process passes the same one).

        Returns:
            The global batch's loss before the update (a detached float32 tensor, the same on
            every process).
        """
        check_model_batch(self._model, batch)
        slices = self._slices(batch)
        # Every process counts every slice, so that all of them refuse the same batch together.
        counts = [[term.count(piece) for piece in slices] for term in self.terms]
        for term, per_slice in zip(self.terms, counts, strict=True):
            if min(per_slice) <= 0:
                raise ParallelError(
                    f"slice {per_slice.index(min(per_slice))} of the global batch has nothing "
                    f"the loss's {term.output!r} averages over (counts per slice {per_slice}); "
                    "its mean would be 0/0"
                )
        shares = [per_slice[self._slice_index] / sum(per_slice) for per_slice in counts]
        self._model.train(True)
        self.optimizer.zero_grad()
        inputs = self._inputs(slices[self._slice_index])
        # The backward runs under loss_parallel too (see evaluating), outside the autocast.
        with self._loss_parallel():
            with super().evaluating():
                out = self._forward(inputs)
            loss = sum(
                _float32(out[term.output]) * share
                for term, share in zip(self.terms, shares, strict=True)
            )
            # FSDP and DDP average the gradients over the batch_shards slices: scaled so that
            # the average is the share-weighted sum, the global loss's gradient.
            (loss * self.plan.mesh.batch_shards).backward()
        self.optimizer.step()
        total = loss.detach()
        dist.all_reduce(total)  # every tensor device holds its slice's loss: divide them out
        return total / self.plan.mesh.tensor

    def evaluating(self) -> contextlib.AbstractContextManager:
        """A context for forwards outside :meth:`step` (and the step's own): the Trainer's
        autocast under "bf16", and with a ``tensor`` axis ``loss_parallel``, the cross-entropy
        of logits split over the vocabulary (a head that reads the vocabulary-parallel
        embedding, GPT's tied one) without gathering them; it changes nothing for plain
        logits."""
        stack = contextlib.ExitStack()
        stack.enter_context(super().evaluating())
        stack.enter_context(self._loss_parallel())
        return stack

    def _loss_parallel(self) -> contextlib.AbstractContextManager:
        return loss_parallel() if self.plan.mesh.tensor > 1 else contextlib.nullcontext()

    # --- full canonical state (gathered on every process) -----------------------------------

    def weights(self) -> Tree:
        """The full canonical weights (numpy), gathered on every process."""
        options = StateDictOptions(full_state_dict=True)
        state = get_model_state_dict(self._model, options=options)
        return {k: to_numpy(v) for k, v in state.items() if not k.endswith("num_batches_tracked")}

    def optimizer_state(self) -> Tree:
        """The full canonical optimizer state (:meth:`Optimizer.state_dict`'s keys), gathered
        on every process."""
        options = StateDictOptions(full_state_dict=True)
        native = get_optimizer_state_dict(self._model, self.optimizer.native, options=options)
        state = {"step": np.array(self.steps, dtype=np.int64)}
        for name in self.optimizer.named:
            per_param = native["state"].get(name, {})
            for slot in self.optimizer.spec.slots:
                value = per_param.get(slot)
                if value is None:
                    param = self.optimizer.named[name]
                    shape = tuple(param.shape)
                    value = np.full(shape, self.optimizer.spec.initial_slot_value(slot), "f4")
                state[state_key(slot, name)] = to_numpy(value)
        return state

    def load_state(
        self, weights: Mapping[str, np.ndarray], optimizer_state: Mapping | None
    ) -> None:
        """Load full canonical weights and, unless None, a canonical optimizer state; each
        process keeps its slices (``set_model_state_dict``/``set_optimizer_state_dict``).

        Raises:
            CheckpointMismatch: keys or shapes differ (every key named); nothing is changed.
        """
        full = StateDictOptions(full_state_dict=True)
        current = get_model_state_dict(self._model, options=full)
        expected = {k: (tuple(v.shape), "float32") for k, v in current.items()}
        check_tree(expected, weights, where="canonical tree", check_dtype=False)
        native = None
        if optimizer_state is not None:
            slots = self.optimizer.spec.slots
            want = {"step": ((), "int64")}
            for name, p in self.optimizer.named.items():
                for slot in slots:
                    want[state_key(slot, name)] = (tuple(p.shape), "float32")
            check_tree(want, optimizer_state, where="optimizer state", check_dtype=False)
            step = int(optimizer_state["step"])
            if step < 0:
                raise ValueError(f"optimizer state has step {step}; it must be >= 0")
            native = get_optimizer_state_dict(self._model, self.optimizer.native, options=full)
            for name in self.optimizer.named:
                entry = {s: from_numpy(optimizer_state[state_key(s, name)]) for s in slots}
                if self.optimizer.spec.name != "sgd":
                    entry["step"] = torch.tensor(float(step))
                native["state"][name] = entry
        set_model_state_dict(
            self._model, {k: from_numpy(v) for k, v in weights.items()}, options=full
        )
        if native is not None:
            set_optimizer_state_dict(self._model, self.optimizer.native, native, options=full)
            self.optimizer.scheduler.jump_to(int(optimizer_state["step"]))

    # --- sharded checkpoints (DCP) ----------------------------------------------------------

    def _dcp_state(self) -> dict[str, Any]:
        return {
            "model": get_model_state_dict(self._model),
            "optimizer": get_optimizer_state_dict(self._model, self.optimizer.native),
            "trainer": {"steps": torch.tensor(self.steps, dtype=torch.int64)},
        }

    def save(self, directory: pathlib.Path) -> None:
        """Write the sharded training state with ``torch.distributed.checkpoint`` (every
        process writes its slices; collective). The generators are not saved: the sharded
        path is for deterministic configs (no dropout) here.

        Raises:
            ValueError: the directory is missing or already holds a checkpoint.
        """
        directory = pathlib.Path(directory)
        if not directory.is_dir():
            raise ValueError(f"checkpoint directory {directory} does not exist; create it first")
        if (directory / ".metadata").exists():
            raise ValueError(f"{directory} holds a DCP checkpoint; save into an empty directory")
        dist.barrier()  # nobody writes before everyone has checked
        dcp.save(self._dcp_state(), checkpoint_id=os.fspath(directory))

    def restore(self, directory: pathlib.Path) -> None:
        """Read what :meth:`save` wrote, on this trainer's mesh, whatever mesh wrote it (DCP
        reshards: each process reads the pieces its slices need).

        Raises:
            CheckpointError: the directory holds no DCP checkpoint, or one of another model.
        """
        directory = pathlib.Path(directory)
        if not (directory / ".metadata").is_file():
            raise CheckpointError(
                f"checkpoint {directory} has no .metadata; is it a ShardedTrainer's (DCP)?"
            )
        state = self._dcp_state()
        try:
            dcp.load(state, checkpoint_id=os.fspath(directory))
        except Exception as e:  # DCP raises CheckpointException and RuntimeErrors
            raise CheckpointError(f"checkpoint {directory}: cannot load it ({e})") from e
        set_model_state_dict(self._model, state["model"])
        set_optimizer_state_dict(self._model, self.optimizer.native, state["optimizer"])
        self.optimizer.scheduler.jump_to(int(state["trainer"]["steps"]))
