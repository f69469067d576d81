"""Scale-out on the frameworks' own engines, from one framework-free plan.

:mod:`.plan` (no framework imported): the mesh (``data``, ``fsdp``, ``tensor``) and the split of
every canonical parameter. :mod:`.memory`: what each device holds and what each step
communicates, from the plan (``mlperf-tutor info --mesh``). Each framework realises the plan
with its own engine, in its own module (imported on use):

* ``mlperf_tutor.parallel.torch``: ``DeviceMesh``, FSDP2 ``fully_shard``, ``parallelize_module``
  for tensor parallelism, DDP for data parallelism, ``torch.distributed.checkpoint``;
* ``mlperf_tutor.parallel.jax``: ``jax.sharding.Mesh`` and ``NamedSharding`` on the jitted step,
  Orbax with shardings;
* ``mlperf_tutor.parallel.tf``: data parallelism only, with ``tf.distribute.MirroredStrategy``
  (Keras 3's ``keras.distribution`` layouts are implemented for JAX only: on the TensorFlow
  backend variables ignore them, so fsdp and tensor meshes are refused);
* ``mlperf_tutor.workloads.dlrm.{torch,jax}_sharded``: DLRM's row- and table-wise sharded
  embedding tables with a sparse Adagrad, from its own embedding plan.

``mlperf_tutor.train.train(..., mesh=)`` and ``mlperf-tutor train --mesh`` train on a mesh.
"""

from mlperf_tutor.parallel.plan import AXES, MESH_AXES, MeshShape, ParallelError, Plan, plan

__all__ = ["AXES", "MESH_AXES", "MeshShape", "ParallelError", "Plan", "plan"]
