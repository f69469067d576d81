"""What each device of a plan holds and what each step communicates, from the plan alone.

Nothing is allocated: the numbers come from the canonical shapes, the plan's partitions, the
optimizer's state per parameter and the workload's activation estimate, so ``mlperf-tutor info
gpt3 --preset mlperf --mesh ...`` works for a 175B model on a laptop.

Per device:

* **weights**: each parameter's shard, float32 (the master weights); under bf16 a frozen
  parameter (LoRA's base) is stored in bf16 (2 bytes);
* **gradients**: the trainable parameters' shards, float32 (FSDP reduce-scatters them into
  shards like the parameters; data-parallel replicas each hold a whole one);
* **optimizer state**: float32 slots per trainable value (Adam, AdamW, LAMB: 2; Adagrad: 1;
  SGD: 1 with momentum, else 0), sharded like the parameters;
* **activations**: what the workload estimates per sequence (:meth:`Workload.activation_bytes`,
  16-bit activations without recomputation) times the sequences a device runs
  (``batch / (data * fsdp)``); None where the workload has no estimate.

Per step, the bytes each device *sends* on each axis (ring collectives: an all-reduce of ``B``
bytes over ``n`` devices sends ``2 (n - 1) / n * B``; an all-gather or a reduce-scatter
``(n - 1) / n * B``):

* **data**: the all-reduce of the gradients of what a replica holds (DLRM's embedding rows,
  split over every device, are not replicated: their lookups' all-to-all is not counted);
* **fsdp**: FSDP2's two all-gathers of every parameter shard (forward, and again in the
  backward, as ``reshard_after_forward=True`` does) in the compute precision, and one
  reduce-scatter of the gradients in float32;
* **tensor**: Megatron's four all-reduces of a block's activations per layer (two in the
  forward, after attention and after the MLP; two in the backward), 16-bit, per local sequence.
"""

from __future__ import annotations

import dataclasses
import math

from mlperf_tutor.layers.spec import is_adapter
from mlperf_tutor.parallel.plan import Plan

# float32 slots of optimizer state per trainable value
OPTIMIZER_SLOTS = {"adam": 2, "adamw": 2, "lamb": 2, "adagrad": 1}


def optimizer_slots(spec) -> int:
    """Float32 values of optimizer state per trainable value of ``spec`` (an OptimizerSpec)."""
    if spec.name == "sgd":
        return 1 if spec.momentum > 0 else 0
    return OPTIMIZER_SLOTS[spec.name]


def trainable_names(names) -> set[str]:
    """The parameters a run trains: the LoRA adapters where there are any, else all."""
    names = list(names)
    adapters = {n for n in names if is_adapter(n)}
    return adapters or set(names)


def transformer_activation_bytes(
    layers: int, seq: int, hidden: int, heads: int, tensor: int = 1
) -> float:
    """Activation bytes of one sequence in mixed-precision training without recomputation:
    ``s h (10 + 24 / t + 5 a s / (h t))`` per layer with tensor parallelism of size ``t`` and
    no sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in
    Large Transformer Models", https://arxiv.org/abs/2205.05198, section 4.2.1; ``t = 1`` gives
    their ``s h (34 + 5 a s / h)``)."""
    return layers * seq * hidden * (10 + 24 / tensor + 5 * heads * seq / (hidden * tensor))


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """Bytes one device holds (the most loaded one where shards differ)."""

    weights: int
    gradients: int
    optimizer_state: int
    activations: float | None

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer_state + (self.activations or 0)


def device_memory(wl, cfg, plan: Plan, batch_size: int, precision: str = "fp32") -> DeviceMemory:
    """What each device holds under ``plan`` for steps of ``batch_size`` examples (global).

    Raises:
        ValueError: ``batch_size`` is not a multiple of the mesh's batch shards.
    """
    check_batch(batch_size, plan)
    spec, _ = wl.optimizer(cfg)
    trainable = trainable_names(plan.shapes)
    weights = gradients = 0
    for name in plan.shapes:
        values = math.prod(plan.shard_shape(name))
        if name in trainable:
            weights += 4 * values
            gradients += 4 * values
        else:
            weights += (2 if precision == "bf16" else 4) * values
    per_sequence = wl.activation_bytes(cfg, tensor=plan.mesh.tensor)
    local = batch_size // plan.mesh.batch_shards
    return DeviceMemory(
        weights=weights,
        gradients=gradients,
        optimizer_state=optimizer_slots(spec) * gradients,
        activations=None if per_sequence is None else per_sequence * local,
    )


def check_batch(batch_size: int, plan: Plan) -> None:
    if batch_size < 1 or batch_size % plan.mesh.batch_shards:
        raise ValueError(
            f"batch size {batch_size} must be a positive multiple of data x fsdp = "
            f"{plan.mesh.batch_shards} (mesh {plan.mesh}): each of those devices takes an "
            "equal slice"
        )


def communication(
    wl, cfg, plan: Plan, batch_size: int, precision: str = "fp32"
) -> dict[str, float]:
    """Bytes each device sends per step on each mesh axis of size > 1 (see the module
    docstring for the collectives counted)."""
    check_batch(batch_size, plan)
    mesh = plan.mesh
    compute = 2 if precision == "bf16" else 4
    trainable = trainable_names(plan.shapes)
    out: dict[str, float] = {}
    if mesh.data > 1:  # all-reduce of each replica's gradients
        held = sum(
            4 * math.prod(plan.shard_shape(n))
            for n in trainable
            if plan.split_over(n, "data") is None  # rows split over data are not replicas
        )
        out["data"] = 2 * (mesh.data - 1) / mesh.data * held
    if mesh.fsdp > 1:
        weights = gradients = 0  # full bytes of what the fsdp axis splits
        for name in plan.shapes:
            if plan.split_over(name, "fsdp") is None:
                continue
            full = math.prod(plan.shard_shape(name)) * mesh.fsdp
            weights += compute * full  # gathered in the compute dtype (bf16 frozen: stored so)
            if name in trainable:
                gradients += 4 * full
        fraction = (mesh.fsdp - 1) / mesh.fsdp
        out["fsdp"] = fraction * (2 * weights + gradients)
    if mesh.tensor > 1:
        seq, hidden = getattr(cfg, "seq_len", None), getattr(cfg, "hidden", None)
        if seq is not None and hidden is not None:
            local = batch_size // mesh.batch_shards
            activation = local * seq * hidden * 2  # 16-bit
            out["tensor"] = 4 * cfg.num_layers * 2 * (mesh.tensor - 1) / mesh.tensor * activation
    return out
