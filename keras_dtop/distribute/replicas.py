"""Sums over the replicas of a data-parallel step: the loss's global normalisers.

The DToP loss divides by batch-wide counts (present masks, presence-class
weights). For a step on R devices to make the same update as one device on
the whole batch, those counts must cover the global batch, and every replica
then returns its share of the global loss (the shares sum to it):

- JAX (`keras.distribution`): one SPMD program sees the global batch; sums are
  already global, nothing to do.
- TensorFlow (`tf.distribute`): each replica runs the step on its slice and
  Keras sums the replicas' gradients: the counts are all-reduced here.
- PyTorch (`torch.distributed`): each process runs the step on its slice and
  DDP averages gradients; inside `keras_dtop.distribute.fit_ddp` (which
  multiplies the share by the process count) the counts are all-reduced here.

This is the only backend-specific code of the training path.
"""

import contextlib

import keras

_TORCH_PROCESS_SUMS = [False]


@contextlib.contextmanager
def summed_over_torch_processes():
    """Inside it, `cross_replica_sum` all-reduces over the torch process group."""
    previous, _TORCH_PROCESS_SUMS[0] = _TORCH_PROCESS_SUMS[0], True
    try:
        yield
    finally:
        _TORCH_PROCESS_SUMS[0] = previous


def _tf_replica_context():
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        return context
    return None


def _torch_group_size():
    import torch.distributed as dist

    if _TORCH_PROCESS_SUMS[0] and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def replica_count():
    """How many replicas each compute a share of this step's loss (1 on JAX)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        context = _tf_replica_context()
        return 1 if context is None else context.num_replicas_in_sync
    if backend == "torch":
        return _torch_group_size()
    return 1


def cross_replica_sum(value):
    """`value` summed over the replicas of the running step (a constant: no gradient).

    value: a tensor computed from labels only (counts, weights). Outside a
    multi-replica step it comes back unchanged.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        context = _tf_replica_context()
        if context is not None:
            import tensorflow as tf

            return context.all_reduce(tf.distribute.ReduceOp.SUM, value)
    elif backend == "torch" and _torch_group_size() > 1:
        import torch.distributed as dist

        total = value.detach().clone()
        dist.all_reduce(total)
        return total
    return value
