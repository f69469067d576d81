"""The parallel plan in TensorFlow / Keras 3: data parallelism with ``tf.distribute``.

What the TensorFlow backend can and cannot do (Keras 3.15, TensorFlow 2.21):

* ``keras.distribution`` (``DeviceMesh``, ``LayoutMap``, ``DataParallel``, ``ModelParallel``)
  is implemented for JAX only. The TensorFlow backend's ``distribution_lib`` is a prototype
  marked "DO NOT USE" that has ``list_devices``, a ``distribute_value`` whose body is a TODO,
  and mesh/layout converters to DTensor; it lacks ``distribute_variable``,
  ``distribute_tensor``, ``get_device_count``, ``initialize``, ``num_processes`` and
  ``process_id``. Only the JAX variable asks the distribution for a layout
  (``JaxVariable._initialize_layout``); a TensorFlow variable created under
  ``ModelParallel(...).scope()`` is one whole ``tf.Variable`` on the first device, so a
  ``LayoutMap`` is silently ignored, and a layout for a layer's output fails with an
  ``AttributeError`` (no ``distribute_tensor``). Keras' TensorFlow trainer never consults the
  distribution either.
* So the ``fsdp`` and ``tensor`` axes, which need every device to hold a slice of a
  parameter, have no Keras engine on TensorFlow: :func:`strategy` refuses them and points to
  the torch (FSDP2, ``parallelize_module``) and JAX (``NamedSharding``) realisations.
  (TensorFlow's own ``tf.experimental.dtensor`` can shard variables, but Keras 3 variables and
  optimizers do not run on it.)
* The ``data`` axis has TensorFlow's own engine, which Keras 3 supports:
  ``tf.distribute.MirroredStrategy``. Variables created under its scope are
  ``MirroredVariable`` s (one copy per device), Keras' TensorFlow optimizer captures the
  strategy when it is made and applies updates with ``strategy.extended.update``.

:func:`realise` ties a plan to a workload; the :class:`~mlperf_tutor.frameworks.tf.Trainer`
takes the result (``plan=``) and runs each step with ``strategy.run`` on each replica's slice
of the global batch. The gradients are summed across replicas with
``strategy.extended.batch_reduce_to`` and the optimizer applies the sum once, in cross-replica
context, so that global-norm clipping sees the global gradient (Keras' own replica-context
path would clip each replica's gradient before its all-reduce).

Each replica's loss is weighted so that the replicas' sum is the global-batch loss, not a mean
of per-replica means: a language model's loss is a mean over labelled tokens, and slices hold
different counts. Each mean the loss sums (the workload's ``loss_terms``: labelled tokens,
masked positions, examples) is weighted by the replica's share of that mean's count.

Dropout under a strategy: a Keras ``SeedGenerator``'s state is one mirrored variable, so every
replica draws the same masks for its slice (checked: a ``Dropout`` on two replicas gives two
equal masks), where one device would draw independent ones for the whole batch. Replicated
training matches single-device training without dropout (``wl.deterministic``) only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping

# The adapter first: it sets KERAS_BACKEND (and TF's log level) before Keras is imported.
from mlperf_tutor.frameworks import tf as _adapter  # noqa: F401

# isort: split
import numpy as np
import tensorflow as tf

from mlperf_tutor.parallel.plan import MeshShape, ParallelError, Plan
from mlperf_tutor.workloads.base import LossTerm

_STRATEGIES: dict[tuple[str, ...], tf.distribute.MirroredStrategy] = {}


def _devices() -> list[str]:
    """The logical devices replicas run on: the GPUs (or TPUs) if any, else the CPUs."""
    for kind in ("TPU", "GPU", "CPU"):
        found = tf.config.list_logical_devices(kind)
        if found:
            return [d.name for d in found]
    raise ParallelError("TensorFlow sees no device")


def strategy(mesh: MeshShape) -> tf.distribute.MirroredStrategy:
    """The ``tf.distribute.MirroredStrategy`` over the first ``mesh.data`` devices.

    The same mesh gives the same strategy object, so that what :func:`building` creates and
    what the Trainer runs belong to one strategy.

    Raises:
        ParallelError: a mesh with ``fsdp`` or ``tensor`` above 1 (the TensorFlow backend of
            Keras cannot shard a variable; see the module docstring), or more replicas than
            TensorFlow has devices.
    """
    if mesh.fsdp > 1 or mesh.tensor > 1:
        raise ParallelError(
            f"mesh {mesh}: TensorFlow can only replicate (data=N); Keras' ModelParallel and "
            "LayoutMap are not implemented on its TensorFlow backend (its variables ignore "
            "layouts), so fsdp and tensor have no engine here. Train this mesh with the torch "
            "(FSDP2, parallelize_module) or jax (NamedSharding) framework"
        )
    devices = _devices()
    if mesh.data > len(devices):
        raise ParallelError(
            f"mesh {mesh} needs {mesh.data} devices, but TensorFlow sees {len(devices)} "
            f"({devices}); on a CPU, split it into logical devices with "
            "tf.config.set_logical_device_configuration before TensorFlow starts"
        )
    chosen = tuple(devices[: mesh.data])
    if chosen not in _STRATEGIES:
        # On CPUs, TensorFlow would sum with collective ops, whose group keys clash between two
        # strategies of one process over different device counts (a 4-replica strategy joins
        # the 2-replica one's group and aborts); a reduction to one device has no groups, and
        # adds in a fixed order. GPUs keep TensorFlow's choice (NCCL all-reduce).
        on_cpu = tf.DeviceSpec.from_string(chosen[0]).device_type == "CPU"
        _STRATEGIES[chosen] = tf.distribute.MirroredStrategy(
            devices=list(chosen),
            cross_device_ops=tf.distribute.ReductionToOneDevice() if on_cpu else None,
        )
    return _STRATEGIES[chosen]


@contextlib.contextmanager
def building(plan: Plan) -> Iterator[tf.distribute.MirroredStrategy]:
    """The scope to build the model and create its Trainer in: ``strategy(plan.mesh).scope()``.

    Variables created inside are mirrored on every replica's device, and the optimizer the
    Trainer makes captures the strategy.
    """
    chosen = strategy(plan.mesh)
    with chosen.scope():
        yield chosen


@dataclasses.dataclass(frozen=True)
class Replicas:
    """A plan realised for one workload: what the Trainer needs to train data-parallel.

    Made by :func:`realise`; give it to ``frameworks.tf.Trainer(..., plan=...)``.

    Attributes:
        plan: the plan (its mesh is ``data=N``).
        strategy: the ``MirroredStrategy`` of the mesh (see :func:`strategy`).
        terms: the means the model's loss sums, with their counts (``wl.loss_terms(cfg)``).
    """

    plan: Plan
    strategy: tf.distribute.MirroredStrategy
    terms: tuple[LossTerm, ...]

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def split(self, batch: Mapping[str, np.ndarray]):
        """Each replica's contiguous slice of the global host ``batch`` and the weight of each
        of its loss terms (the slice's denominator over the global batch's), as ``PerReplica``
        values on the replicas' devices.

        Raises:
            ParallelError: a batch size that the replicas do not divide, or a slice without
                an item of some loss term (its mean would be 0/0).
        """
        size = len(next(iter(batch.values())))
        n = self.replicas
        if size % n:
            raise ParallelError(
                f"a batch of {size} examples does not split evenly over {n} replicas; make "
                f"the global batch size a multiple of {n}"
            )
        local = size // n
        slices = [{k: v[r * local : (r + 1) * local] for k, v in batch.items()} for r in range(n)]
        counts = np.array([self.counts(s) for s in slices], dtype=np.float64)  # (n, terms)
        if (counts == 0).any():
            raise ParallelError(
                f"a replica's slice of the batch has nothing its loss averages over "
                f"(denominators {counts.tolist()}); its mean would be 0/0"
            )
        weights = (counts / np.array(self.counts(batch), np.float64)).astype(np.float32)

        def value(context):
            r = context.replica_id_in_sync_group
            return {k: tf.convert_to_tensor(v) for k, v in slices[r].items()}, weights[r]

        return self.strategy.experimental_distribute_values_from_function(value)

    def counts(self, batch: Mapping[str, np.ndarray]) -> list[float]:
        """What each loss term of ``batch`` divides by."""
        return [term.count(batch) for term in self.terms]

    def check(self, model) -> None:
        """Refuse a model whose variables this plan's strategy does not mirror.

        Raises:
            ParallelError: naming the first such variables (the model was built outside
                :func:`building`).
        """
        outside = [
            v.path
            for v in model.variables
            if getattr(v.value, "_distribute_strategy", None) is not self.strategy
        ]
        if outside:
            raise ParallelError(
                f"model {model.name!r} has variables that this plan's strategy does not mirror "
                f"({outside[:3]}{' ...' if len(outside) > 3 else ''}); build the model and "
                "create the Trainer inside mlperf_tutor.parallel.tf.building(plan)"
            )

    def compiled_update(self, model, native, variables: list, *, loss_dtype=None):
        """The data-parallel update as one ``tf.function`` of :meth:`split`'s result: each
        replica's forward and gradients of its weighted loss (``strategy.run``), the gradients
        summed over replicas (``batch_reduce_to``, onto the mirrored variables), and
        ``native.apply`` once in cross-replica context. Returns the global-batch loss.

        Args:
            model, native, variables: as for ``frameworks.tf.compiled_update``; the model and
                optimizer must have been made under :func:`building`.
            loss_dtype: the dtype the loss is cast to before differentiating (None: keep).

        Raises:
            ParallelError: a model variable that the strategy does not mirror (the model was
                built outside :func:`building`).
        """
        self.check(model)
        chosen, outputs = self.strategy, [term.output for term in self.terms]

        def replica_step(inputs, weights):
            with tf.GradientTape() as tape:
                out = model(inputs, training=True)
                terms = [out[name] for name in outputs]
                if loss_dtype is not None:
                    terms = [tf.cast(t, loss_dtype) for t in terms]
                loss = tf.add_n([t * tf.cast(weights[i], t.dtype) for i, t in enumerate(terms)])
            grads = tape.gradient(loss, variables)
            grads = [
                tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
                for g, v in zip(grads, variables, strict=True)
            ]
            return loss, grads

        @tf.function(reduce_retracing=True)
        def update(per_replica):
            inputs, weights = per_replica
            losses, grads = chosen.run(replica_step, args=(inputs, weights))
            summed = chosen.extended.batch_reduce_to(
                tf.distribute.ReduceOp.SUM,
                [(g, v.value) for g, v in zip(grads, variables, strict=True)],
            )
            native.apply(summed, variables)
            return chosen.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

        return update


def realise(wl, cfg, plan: Plan) -> Replicas:
    """The TensorFlow realisation of ``plan`` for workload ``wl``'s model ``cfg`` (data
    parallelism), its loss weighted by the workload's ``loss_terms(cfg)``.

    Raises:
        ParallelError: a mesh TensorFlow cannot realise (see :func:`strategy`).
    """
    return Replicas(plan, strategy(plan.mesh), wl.loss_terms(cfg))


__all__ = ["Replicas", "building", "realise", "strategy"]
