"""Data-parallel training on the PyTorch backend: one process per device, DDP.

Keras' `fit` has no multi-process mode on PyTorch, so, as Keras' own guide
for this backend does, the model is wrapped in
`torch.nn.parallel.DistributedDataParallel` and driven by a short loop: the
forward runs through DDP, DDP averages the gradients across processes during
`backward`, and the model's own Keras optimizer applies them. Launch one
process per device (`torchrun --nproc_per_node=N script.py`) and give each its
own slice of the data.
"""

import time

import keras
import numpy as np

from keras_dtop.distribute.replicas import cross_replica_sum, summed_over_torch_processes


def _batches(model, x, y, batch_size):
    """Preprocessed `(images, labels)` NumPy batches of arrays or a tf.data dataset."""
    import tensorflow as tf

    if y is not None:
        x = tf.data.Dataset.from_tensor_slices((np.asarray(x), np.asarray(y))).batch(batch_size or 32)
    elif not hasattr(x, "element_spec"):
        raise TypeError(f"fit_ddp takes arrays (x, y) or a tf.data.Dataset of (images, labels), got {type(x).__name__}.")
    if model.preprocessor is not None:
        x = x.map(model.preprocess_samples, num_parallel_calls=tf.data.AUTOTUNE)
    return x


def fit_ddp(model, x, y=None, batch_size=None, epochs=1, steps_per_epoch=None, verbose=1):
    """Train a compiled `DToPSegmenter` in this process of a `torch.distributed` group.

    x, y: this process's images `(count, H, W, 3)` and labels `(count, H, W)`,
        or a tf.data dataset of `(images, labels)` batches (this process's shard).
    batch_size: the per-device batch (arrays only).
    Every process must run the same number of steps. The loss of a step is
    the loss of the global batch (normalisers summed over the processes), so
    N processes at batch b make the same update as one at batch N·b. Both
    phases work: set `model.prune_threshold` between calls. Returns a dict
    of per-epoch lists: `loss` (global), the model's metrics (this process's
    batches) and `images_per_second` (all processes).
    """
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if keras.backend.backend() != "torch":
        raise RuntimeError(f"fit_ddp needs KERAS_BACKEND=torch, not {keras.backend.backend()!r}.")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fit_ddp needs torch.distributed.init_process_group() first (e.g. under torchrun).")
    if getattr(model, "optimizer", None) is None:
        raise RuntimeError("Compile the model before fit_ddp (model.compile(...)).")
    model._check_training_data(x, y)
    world = dist.get_world_size()
    ddp = DistributedDataParallel(model)
    variables = model.trainable_variables
    batches = _batches(model, x, y, batch_size)
    history = {}
    for _ in range(epochs):
        for metric in model.metrics:
            metric.reset_state()
        loss_sum, steps, images_seen, start = 0.0, 0, 0, time.perf_counter()
        for images, labels in batches.as_numpy_iterator():
            if steps_per_epoch is not None and steps >= steps_per_epoch:
                break
            images = keras.ops.convert_to_tensor(images)
            labels = keras.ops.convert_to_tensor(labels)
            model.zero_grad()
            with summed_over_torch_processes():
                outputs = ddp(images, training=True, return_details=True)
                share = model.compute_loss(images, labels, outputs, training=True)
                global_loss = float(cross_replica_sum(share.detach()))
            # DDP averages gradients over the processes; the shares must be summed.
            model.optimizer.scale_loss(share * world).backward()
            with torch.no_grad():
                model.optimizer.apply([v.value.grad for v in variables], variables)
            logs = model.compute_metrics(images, labels, outputs)
            loss_sum, steps, images_seen = loss_sum + global_loss, steps + 1, images_seen + len(images) * world
        seconds = time.perf_counter() - start
        logs = {k: float(keras.ops.convert_to_numpy(v)) for k, v in logs.items()} if steps else {}
        logs.update(loss=loss_sum / max(steps, 1), images_per_second=images_seen / max(seconds, 1e-9))
        for key, value in logs.items():
            history.setdefault(key, []).append(value)
        if verbose and dist.get_rank() == 0:
            print(" - ".join(f"{k}: {v:.4g}" for k, v in logs.items()))
    return history
