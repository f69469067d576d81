"""The PyTorch adapter: arrays, precision, devices, canonical layout, steps and optimizers.

Canonical names and layouts *are* PyTorch's ``state_dict`` (minus the BatchNorm counter
``num_batches_tracked``, which only matters for ``momentum=None`` and is never exported), so the
layout rules here are copies with a strict check. See :mod:`mlperf_tutor.frameworks` for the
contract every adapter meets. :class:`Trainer` is the training path's side of it: placement,
bf16 autocast, ``torch.compile`` and safetensors checkpoints of the whole training state.
"""

from __future__ import annotations

import contextlib
import functools
import pathlib
import types
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np
import safetensors
import safetensors.torch
import torch

from mlperf_tutor.core.batch import check_model_batch
from mlperf_tutor.core.checkpoint import CheckpointError, Tree, check_tree
from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec, state_key
from mlperf_tutor.frameworks import torch_optim

NAME = "torch"

# Dtypes numpy lacks: moved through an integer view of the same width, typed by ml_dtypes.
_VIA_INT = {
    torch.bfloat16: (ml_dtypes.bfloat16, np.int16, torch.int16),
    torch.float8_e4m3fn: (ml_dtypes.float8_e4m3fn, np.uint8, torch.uint8),
    torch.float8_e5m2: (ml_dtypes.float8_e5m2, np.uint8, torch.uint8),
}
_FROM_ML = {np.dtype(ml): (t, np_int) for t, (ml, np_int, _) in _VIA_INT.items()}

# --- arrays, seeding, precision, devices ---------------------------------------------------


def to_numpy(x: Any) -> np.ndarray:
    """A numpy copy of a tensor (any device); bf16/fp8 come out as ml_dtypes arrays."""
    if not isinstance(x, torch.Tensor):
        return np.array(x)
    t = x.detach().to("cpu", copy=True)
    if t.dtype in _VIA_INT:
        ml_dtype, _, int_dtype = _VIA_INT[t.dtype]
        return t.view(int_dtype).numpy().view(ml_dtype)
    return t.numpy()


def from_numpy(a: Any, dtype: Any = None) -> torch.Tensor:
    """A CPU tensor holding a copy of ``a`` (ml_dtypes bf16/fp8 included).

    Args:
        a: numpy array or array-like.
        dtype: optional target dtype: a ``torch.dtype``, numpy dtype or name ("bfloat16").
    """
    a = np.asarray(a)
    # A copy, so the tensor never aliases (or writes into) the caller's array.
    if a.dtype in _FROM_ML:
        torch_dtype, np_int = _FROM_ML[a.dtype]
        t = torch.from_numpy(np.array(a.view(np_int), order="C", copy=True)).view(torch_dtype)
    else:
        t = torch.from_numpy(np.array(a, order="C", copy=True))
    return t if dtype is None else t.to(torch_dtype_of(dtype))


def torch_dtype_of(dtype: Any) -> torch.dtype:
    """The ``torch.dtype`` of a torch dtype, numpy dtype (ml_dtypes included) or dtype name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    result = getattr(torch, name, None)
    if not isinstance(result, torch.dtype):
        raise ValueError(f"dtype {dtype!r} has no torch equivalent; use e.g. 'float32'")
    return result


@functools.cache
def numpy_dtype_of(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype that :func:`to_numpy` gives a tensor of ``dtype``."""
    if dtype in _VIA_INT:
        return np.dtype(_VIA_INT[dtype][0])
    return torch.empty((), dtype=dtype).numpy().dtype


def seed(n: int) -> None:
    """Seed torch's global generators (CPU and every accelerator)."""
    torch.manual_seed(n)


def pin_precision() -> None:
    """Full float32 matmuls and convolutions: TF32 off (parity mode)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def devices() -> list[str]:
    """Device strings torch can use here, e.g. ``["cpu", "cuda:0"]``."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def device_summary() -> str:
    """One line for notebooks: torch version, devices (with accelerator names), TF32 state."""
    names = []
    for dev in devices():
        if dev.startswith("cuda"):
            names.append(f"{dev} ({torch.cuda.get_device_name(int(dev.split(':')[1]))})")
        else:
            names.append(dev)
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    return f"torch {torch.__version__}: {', '.join(names)}; TF32 {'on' if tf32 else 'off'}"


DEVICE_CHOICES = ("auto", "cpu", "gpu", "tpu")


def _accelerator() -> torch.device | None:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return None


def resolve_device(device: str | torch.device) -> torch.device:
    """The ``torch.device`` that ``device`` names here.

    Args:
        device: "auto" (the accelerator if there is one, else the CPU), "cpu", "gpu" (the
            current CUDA device, or Apple's MPS), "tpu", or a torch device string such as
            "cuda:1" (what :func:`use_device` returns).

    Raises:
        ValueError: the device is not visible here, or the name is unknown.
    """
    name = str(device)
    if name == "auto":
        return _accelerator() or torch.device("cpu")
    if name in ("gpu", "tpu"):
        # torch reaches TPUs only through torch_xla, which this adapter does not drive.
        found = _accelerator() if name == "gpu" else None
        if found is None:
            raise ValueError(
                f"device {name!r}: no {name.upper()} visible to torch; use --device cpu or auto"
            )
        return found
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(
            f"unknown device {name!r}; choose one of {list(DEVICE_CHOICES)} "
            "(or a torch device such as 'cuda:0')"
        )
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {name!r}: no GPU visible to torch; use --device cpu or auto")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= count:
            raise ValueError(
                f"device {name!r}: torch sees {count} CUDA device(s); use --device cpu or auto"
            )
        return torch.device("cuda", index)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available; use --device cpu or auto")
    return torch.device(dev.type)


def use_device(device: str = "auto") -> str:
    """Resolve ``device`` (see :func:`resolve_device`) and make it the default for what follows
    (for CUDA: the current device); return the torch device string the Trainer moves to, e.g.
    "cpu" or "cuda:0".

    Raises:
        ValueError: the device is not visible here ("gpu" without one), or the name is unknown.
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return str(dev)


# --- layout ---------------------------------------------------------------------------------


def _is_bookkeeping(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "num_batches_tracked"


def _canonical_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # state_dict() tensors are detached but share storage with the model's.
    return {k: v for k, v in model.state_dict().items() if not _is_bookkeeping(k)}


def to_canonical(model: torch.nn.Module) -> Tree:
    """The model's parameters and buffers as canonical numpy copies (dtypes kept).

    Args:
        model: any ``nn.Module``; its ``state_dict`` names are the canonical names.
    """
    return {k: to_numpy(v) for k, v in _canonical_tensors(model).items()}


def load_canonical(model: torch.nn.Module, tree: Mapping[str, np.ndarray]) -> None:
    """Copy a canonical tree into the model, all or nothing.

    Args:
        model: the model to fill (any device; values are copied there).
        tree: canonical name -> numpy array; ``num_batches_tracked`` is not expected.

    Raises:
        CheckpointMismatch: keys, shapes or dtypes differ; lists every offending key, and the
            model is unchanged.
    """
    targets = _canonical_tensors(model)
    expected = {k: (tuple(v.shape), numpy_dtype_of(v.dtype).name) for k, v in targets.items()}
    check_tree(expected, tree, where="canonical tree")
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(from_numpy(tree[name]))


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Canonical names of the parameters that require gradients."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def set_trainable(model: torch.nn.Module, trainable: Callable[[str], bool]) -> None:
    """Train only the parameters whose canonical name ``trainable`` accepts; the others are
    frozen (``requires_grad`` off): no gradient, no optimizer state (LoRA's base weights)."""
    for name, p in model.named_parameters():
        p.requires_grad_(bool(trainable(name)))


# --- models ---------------------------------------------------------------------------------


def _device_of(model: torch.nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _to_tensors(batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    return {
        k: (v if isinstance(v, torch.Tensor) else from_numpy(v)).to(device)
        for k, v in batch.items()
    }


def forward(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    train: bool = False,
    outputs: tuple[str, ...] | None = None,
) -> Tree:
    """Named outputs (numpy) of one forward pass without gradients.

    Args:
        model: a workload model (takes a dict of tensors, returns a dict with "loss").
        batch: name -> numpy array, moved to the model's device.
        train: training mode (BatchNorm batch statistics, which also update its running ones).
        outputs: the names to copy to the host (None: all). An evaluation that needs only the
            loss leaves the logits on the device.
    """
    check_model_batch(model, batch)
    model.train(train)
    with torch.no_grad():
        out = model(_to_tensors(batch, _device_of(model)))
    return {k: to_numpy(v) for k, v in out.items() if outputs is None or k in outputs}


def loss_and_grads(
    model: torch.nn.Module, batch: Mapping[str, Any], train: bool = True
) -> tuple[float, Tree]:
    """The loss and the gradient of every trainable parameter, canonical names and layouts.

    The parameters' ``.grad`` are replaced (not accumulated) and left set afterwards.

    Args:
        model: a workload model.
        batch: name -> numpy array.
        train: training mode for the forward pass.
    """
    check_model_batch(model, batch)
    model.train(train)
    model.zero_grad(set_to_none=True)
    loss = model(_to_tensors(batch, _device_of(model)))["loss"]
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            # A parameter the loss does not use has no .grad; its gradient is zero.
            grads[name] = to_numpy(p.grad) if p.grad is not None else to_numpy(torch.zeros_like(p))
    return float(loss.detach()), grads


def train_step(model: torch.nn.Module, optimizer: Optimizer, batch: Mapping[str, Any]) -> float:
    """One training update in place (forward in train mode, backward, optimizer step).

    Args:
        model: a workload model.
        optimizer: from :func:`make_optimizer` over this model.
        batch: name -> numpy array.

    Returns:
        The loss before the update.
    """
    check_model_batch(model, batch)
    model.train(True)
    optimizer.zero_grad()
    loss = model(_to_tensors(batch, _device_of(model)))["loss"]
    loss.backward()
    optimizer.step()
    return float(loss.detach())


# --- optimizers -----------------------------------------------------------------------------


class Optimizer:
    """A ``torch.optim`` optimizer and LR scheduler realising an OptimizerSpec + ScheduleSpec.

    Attributes:
        spec: the optimizer spec.
        schedule: the learning-rate schedule.
        named: canonical name -> parameter being optimized.
        native: the ``torch.optim.Optimizer``.
        scheduler: the ``LRScheduler`` setting the rate of each update.

    Args:
        spec: the optimizer.
        schedule: the learning-rate schedule.
        named_params: canonical name -> parameter.
    """

    def __init__(
        self,
        spec: OptimizerSpec,
        schedule: ScheduleSpec,
        named_params: Mapping[str, torch.nn.Parameter],
    ):
        if not named_params:
            raise ValueError("the optimizer got no trainable parameters; check requires_grad")
        self.spec = spec
        self.schedule = schedule
        self.named = dict(named_params)
        self.native = torch_optim.build_native(spec, self.named, schedule.lr_at(0))
        self.scheduler = torch_optim.ScheduleLR(self.native, schedule)

    @property
    def step_count(self) -> int:
        """Number of updates applied (the scheduler counts them)."""
        return self.scheduler.last_epoch

    def zero_grad(self) -> None:
        """Drop every parameter's gradient."""
        self.native.zero_grad(set_to_none=True)

    def step(self, grads: Mapping[str, np.ndarray] | None = None) -> None:
        """One update: clip, optimizer step, scheduler step.

        Args:
            grads: canonical name -> gradient to use; without it the ``.grad`` already on the
                parameters is used.
        """
        if grads is not None:
            self._set_grads(grads)
        for p in self.named.values():
            # torch.optim skips a parameter without .grad (no decay, no moment update); the spec,
            # optax and Keras update it with a zero gradient, so give it one.
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.spec.clip_norm is not None:
            torch_optim.clip_grad_norm(self.named.values(), self.spec.clip_norm)
        self.native.step()
        self.scheduler.step()

    def _set_grads(self, grads: Mapping[str, np.ndarray]) -> None:
        check_tree(self._specs(), grads, where="gradients", check_dtype=False)
        for name, p in self.named.items():
            p.grad = from_numpy(grads[name]).to(device=p.device, dtype=p.dtype)

    def _specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {k: (tuple(p.shape), numpy_dtype_of(p.dtype).name) for k, p in self.named.items()}

    def state_dict(self) -> Tree:
        """The canonical optimizer state (keys documented in :mod:`mlperf_tutor.core.optim`).

        Slots torch has not created yet (before the first update) export as their initial value.
        """
        state = {"step": np.array(self.step_count, dtype=np.int64)}
        for name, p in self.named.items():
            per_param = self.native.state.get(p, {})
            for slot in self.spec.slots:
                value = per_param.get(slot)
                if value is None:
                    value = torch.full_like(p, self.spec.initial_slot_value(slot))
                state[state_key(slot, name)] = to_numpy(value)
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore a canonical optimizer state; the schedule continues at its ``step``.

        Args:
            state: from :meth:`state_dict` of any framework's optimizer with the same spec.

        Raises:
            CheckpointMismatch: (a ValueError) missing, unexpected or misshapen keys; nothing
                is changed.
        """
        expected = {"step": ((), "int64")}
        for name, shape_dtype in self._specs().items():
            for slot in self.spec.slots:
                expected[state_key(slot, name)] = shape_dtype
        check_tree(expected, state, where="optimizer state", check_dtype=False)
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"optimizer state has step {step}; it must be >= 0")
        # Through torch's own load_state_dict, which casts each slot to its parameter's dtype
        # and device and keeps the per-parameter `step` counters where torch expects them.
        index = {id(p): i for i, p in enumerate(_params_in_order(self.native))}
        native_state = {}
        for name, p in self.named.items():
            entry = {slot: from_numpy(state[state_key(slot, name)]) for slot in self.spec.slots}
            if self.spec.name != "sgd":  # Adam(W), Adagrad and Lamb count steps per parameter
                entry["step"] = torch.tensor(float(step), dtype=torch_optim.scalar_dtype())
            if entry:
                native_state[index[id(p)]] = entry
        native = self.native.state_dict()
        native["state"] = native_state
        self.native.load_state_dict(native)
        self.scheduler.jump_to(step)


def _params_in_order(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    # The order torch numbers parameters in its state_dict: group by group.
    return [p for group in optimizer.param_groups for p in group["params"]]


class ArrayOptimizer(Optimizer):
    """An :class:`Optimizer` over free-standing parameters made from numpy arrays.

    Args:
        spec: the optimizer.
        schedule: the learning-rate schedule.
        params: canonical name -> initial value; the parameters keep its dtype (float64 too).
    """

    def __init__(
        self, spec: OptimizerSpec, schedule: ScheduleSpec, params: Mapping[str, np.ndarray]
    ):
        named = {k: torch.nn.Parameter(from_numpy(v)) for k, v in params.items()}
        super().__init__(spec, schedule, named)

    def params(self) -> Tree:
        """The current parameters as numpy copies."""
        return {k: to_numpy(p) for k, p in self.named.items()}


def make_optimizer(
    spec: OptimizerSpec, schedule: ScheduleSpec, model: torch.nn.Module
) -> Optimizer:
    """The optimizer of ``spec`` + ``schedule`` over the model's trainable parameters."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return Optimizer(spec, schedule, named)


def make_array_optimizer(
    spec: OptimizerSpec, schedule: ScheduleSpec, params: Mapping[str, np.ndarray]
) -> ArrayOptimizer:
    """The optimizer of ``spec`` + ``schedule`` over parameters created from numpy arrays."""
    return ArrayOptimizer(spec, schedule, params)


# --- the training path ----------------------------------------------------------------------

PRECISIONS = ("fp32", "bf16")
CHECKPOINT_FILE = "trainer.safetensors"
CHECKPOINT_FORMAT = "mlperf_tutor.frameworks.torch.Trainer/1"
# Prefixes of the checkpoint's keys: a weight, an optimizer entry ("step", "exp_avg/fc.weight")
# and an RNG state can never share a key.
_WEIGHTS, _OPTIMIZER, _RNG = "weights/", "optimizer/", "rng/"


def _host_tensor(value: Any) -> torch.Tensor:
    """A CPU (or already placed) tensor of a batch entry; numpy arrays torch can wrap are
    wrapped without a copy (the move to the device copies), the others copied."""
    if isinstance(value, torch.Tensor):
        return value
    a = np.asarray(value)
    if a.dtype in _FROM_ML or not (a.flags.writeable and a.flags.c_contiguous):
        return from_numpy(a)
    return torch.from_numpy(a)


def _spec(t: torch.Tensor) -> types.SimpleNamespace:
    # What check_tree reads of an array (shape, numpy dtype), without copying the tensor.
    return types.SimpleNamespace(shape=tuple(t.shape), dtype=numpy_dtype_of(t.dtype))


class Trainer:
    """Trains one model: placement, precision, the update, RNG streams, native checkpoints.

    The update is :func:`train_step`'s (forward in train mode, backward, the
    :func:`make_optimizer` optimizer's step), so "fp32" gives its numbers bit for bit.

    Args:
        model: a workload model built by ``wl.build("torch", cfg, weights=...)`` (float32, on
            the host). It is moved to ``device`` in place and stays the object that
            :attr:`model` returns; under "bf16" its frozen parameters are cast to bf16 in place.
        spec: the optimizer.
        schedule: the learning-rate schedule.
        precision: "fp32" (float32 everywhere; matmul precision left as it is set) or "bf16":
            float32 master weights and optimizer state, the forward under
            ``torch.autocast(..., dtype=torch.bfloat16)`` (the models keep losses, softmax and
            norm statistics in float32), the backward outside it, the loss cast to float32, and
            frozen parameters (LoRA's base) stored in bf16.
        device: what :func:`use_device` returned, or a name :func:`resolve_device` accepts.
        seed: seeds torch's global generators (CPU and every CUDA device), which the forward's
            dropout draws from.
        compile: run the forward through ``torch.compile(model)`` (GPU benchmarks and training
            on accelerators; slow to compile on a CPU).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        spec: OptimizerSpec,
        schedule: ScheduleSpec,
        *,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
        seed: int = 0,
        compile: bool = False,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
        self.precision = precision
        self.device = resolve_device(device)
        if precision == "bf16":
            wrong = [
                n
                for n, p in model.named_parameters()
                if p.requires_grad and p.dtype != torch.float32
            ]
            if wrong:
                raise ValueError(
                    f"precision 'bf16' keeps float32 master weights, but the trainable "
                    f"parameters {wrong[:5]} are not float32; build the model in float32"
                )
        # Names of the frozen parameters stored in bf16 here; weights() gives them as float32.
        # Cast before the move, so that the device never holds a float32 copy of them.
        self._bf16_frozen: set[str] = set()
        if precision == "bf16":
            for name, p in model.named_parameters():
                if not p.requires_grad and p.dtype == torch.float32:
                    p.data = p.data.to(torch.bfloat16)
                    self._bf16_frozen.add(name)
        self._model = model.to(self.device)
        # After the move: the optimizer's state lives where its parameters are (and on CUDA,
        # Adam(W) takes its fused kernel).
        self.optimizer = make_optimizer(spec, schedule, model)
        self.compiled = compile
        self._forward = torch.compile(model) if compile else model
        torch.manual_seed(seed)  # as seed(): the CPU generator and every CUDA device's

    @property
    def model(self) -> torch.nn.Module:
        """The model being trained (the object passed in, with the current weights)."""
        return self._model

    @property
    def steps(self) -> int:
        """Updates applied so far (the learning-rate schedule's position)."""
        return self.optimizer.step_count

    def _inputs(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        out = {}
        for name, value in batch.items():
            t = _host_tensor(value)
            pinned = t.device.type == "cpu" and self.device.type == "cuda" and t.is_pinned()
            out[name] = t.to(self.device, non_blocking=pinned)
        return out

    def step(self, batch: Mapping[str, np.ndarray]) -> torch.Tensor:
        """One update (train mode: dropout on, BatchNorm statistics updated).

        Args:
            batch: name -> numpy array (or tensor; pinned host tensors move asynchronously).

        Returns:
            The loss before the update: a detached float32 tensor on the device, not
            synchronised (see :meth:`loss_value`).
        """
        check_model_batch(self._model, batch)
        self._model.train(True)
        self.optimizer.zero_grad()
        inputs = self._inputs(batch)
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = self._forward(inputs)["loss"]
            loss = loss.to(torch.float32)
        else:
            loss = self._forward(inputs)["loss"]
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def evaluating(self) -> contextlib.AbstractContextManager:
        """A context for forwards outside :meth:`step` (evaluation): the step's autocast under
        "bf16", where frozen weights are bf16 and the trained ones float32."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss_value(self, handle: torch.Tensor) -> float:
        """The float of a loss :meth:`step` returned (synchronises with the device)."""
        return float(handle)

    def weights(self) -> Tree:
        """Canonical weights (numpy copies). Frozen parameters stored in bf16 under "bf16" come
        back as float32 (exactly their bf16 values), the dtype the canonical tree declares."""
        tree = to_canonical(self._model)
        for name in self._bf16_frozen:
            tree[name] = tree[name].astype(np.float32)
        return tree

    def optimizer_state(self) -> Tree:
        """The canonical optimizer state (:meth:`Optimizer.state_dict`), "step" included."""
        return self.optimizer.state_dict()

    def _weight_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        # As stored in the model: frozen bf16 parameters as bf16.
        return {
            k: (tuple(v.shape), numpy_dtype_of(v.dtype).name)
            for k, v in _canonical_tensors(self._model).items()
        }

    def load_state(
        self, weights: Mapping[str, np.ndarray], optimizer_state: Mapping | None
    ) -> None:
        """Load canonical weights and, unless None, a canonical optimizer state (the schedule
        continues at its "step"); e.g. a checkpoint another framework wrote. All or nothing.

        Without an optimizer state the optimizer is left as it is. Frozen bf16 parameters take
        the float32 values rounded to bf16.

        Raises:
            CheckpointMismatch: keys, shapes or dtypes of either differ (every key named);
                nothing is changed.
        """
        expected = {
            k: (shape, "float32" if k in self._bf16_frozen else dtype)
            for k, (shape, dtype) in self._weight_specs().items()
        }
        check_tree(expected, weights, where="canonical tree")
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)  # checks before it changes anything
        with torch.no_grad():
            for name, target in _canonical_tensors(self._model).items():
                target.copy_(from_numpy(weights[name]))

    def _rng_states(self) -> dict[str, torch.Tensor]:
        states = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            for i, state in enumerate(torch.cuda.get_rng_state_all()):
                states[f"cuda/{i}"] = state
        return states

    def save(self, directory: pathlib.Path) -> None:
        """Write the whole training state to ``directory``/``trainer.safetensors``: canonical
        weights (as stored: frozen bf16 ones in bf16), the canonical optimizer state (its
        "step" is the step count) and the generator states (uint8), under the key prefixes
        "weights/", "optimizer/" and "rng/". Safetensors only: reading it runs no pickle.

        Args:
            directory: an existing directory (the caller makes it atomic).

        Raises:
            ValueError: the directory is missing or already holds a trainer checkpoint.
        """
        directory = pathlib.Path(directory)
        path = directory / CHECKPOINT_FILE
        if not directory.is_dir():
            raise ValueError(f"checkpoint directory {directory} does not exist; create it first")
        if path.exists():
            raise ValueError(f"{path} exists; save into an empty directory")
        tensors = {}
        for name, value in _canonical_tensors(self._model).items():
            tensors[_WEIGHTS + name] = value.detach().to("cpu").contiguous()
        for key, value in self.optimizer.state_dict().items():
            tensors[_OPTIMIZER + key] = from_numpy(value)
        for key, value in self._rng_states().items():
            tensors[_RNG + key] = value.to("cpu")
        metadata = {
            "format": CHECKPOINT_FORMAT,
            "precision": self.precision,
            "steps": str(self.steps),
        }
        safetensors.torch.save_file(tensors, str(path), metadata=metadata)

    def _expected(self) -> dict[str, tuple[tuple[int, ...], str]]:
        # Every key of a checkpoint this trainer would write, with its shape and dtype.
        expected = {_WEIGHTS + k: v for k, v in self._weight_specs().items()}
        expected[_OPTIMIZER + "step"] = ((), "int64")
        for name, p in self.optimizer.named.items():
            for slot in self.optimizer.spec.slots:
                key = _OPTIMIZER + state_key(slot, name)
                expected[key] = (tuple(p.shape), numpy_dtype_of(p.dtype).name)
        for key, value in self._rng_states().items():
            expected[_RNG + key] = (tuple(value.shape), "uint8")
        return expected

    def restore(self, directory: pathlib.Path) -> None:
        """Read back what :meth:`save` wrote (same model structure, precision and device kind).

        Raises:
            CheckpointError: (a ValueError) naming the directory: the file is missing or
                corrupt, or its keys, shapes or dtypes do not fit this trainer (every key
                named); the trainer is unchanged.
        """
        directory = pathlib.Path(directory)
        path = directory / CHECKPOINT_FILE
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint {directory} has no {CHECKPOINT_FILE}; is it a torch Trainer's?"
            )
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types, and OSError
            raise CheckpointError(f"checkpoint {directory}: cannot read {path.name} ({e})") from e
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"checkpoint {directory}: {path.name} has format {metadata.get('format')!r}, "
                f"not {CHECKPOINT_FORMAT!r}"
            )
        check_tree(
            self._expected(),
            {k: _spec(v) for k, v in tensors.items()},
            where=f"checkpoint {directory}",
            hint=(
                "check that a Trainer of the same workload, preset and precision "
                f"({self.precision}) on a {self.device.type} device saved it"
            ),
        )
        optimizer_state = {
            k.removeprefix(_OPTIMIZER): to_numpy(v)
            for k, v in tensors.items()
            if k.startswith(_OPTIMIZER)
        }
        try:
            self.optimizer.load_state_dict(optimizer_state)
        except ValueError as e:  # a negative step: the keys and shapes were checked above
            raise CheckpointError(f"checkpoint {directory}: {e}") from e
        with torch.no_grad():
            for name, target in _canonical_tensors(self._model).items():
                target.copy_(tensors[_WEIGHTS + name])
        torch.set_rng_state(tensors[_RNG + "cpu"])
        if self.device.type == "cuda":
            count = torch.cuda.device_count()
            torch.cuda.set_rng_state_all([tensors[f"{_RNG}cuda/{i}"] for i in range(count)])
