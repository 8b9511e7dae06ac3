"""One dense-phase and one pruning-phase training step on 1 device and on 2.

Run as a script in a fresh process (the device count is fixed when a backend
starts): `python tests/distributed_steps.py OUT.npz`, with KERAS_BACKEND set;
JAX needs `XLA_FLAGS=--xla_force_host_platform_device_count=2`, TensorFlow
gets 2 logical CPUs here, PyTorch runs `fit_ddp` in 2 gloo processes
(`torch_ddp_worker`). Writes every step's loss and the weights after both
steps for each run; `test_distributed.py` compares them.
"""

import os
import sys

import numpy as np

BATCH = 8


def batch():
    from keras_dtop.data import synthetic_segmentation

    return synthetic_segmentation(BATCH, image_size=(32, 32), num_classes=6, seed=3)


def build(initial=None):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import keras
    from test_training import small_model

    import keras_dtop

    keras.utils.set_random_seed(0)
    model = small_model(prune_threshold=1.0)
    if initial is not None:
        model.set_weights(initial)
    # epsilon 1e-3: Adam would turn gradients that are float noise into full
    # +-lr steps, and the split batch rounds its sums differently.
    model.compile(optimizer=keras_dtop.optimizers.DToPAdamW(learning_rate=1e-3, epsilon=1e-3))
    return model


def two_steps(model, fit):
    """The dense step, then the pruning step (p0 0.3): losses and final weights."""
    losses = []
    for threshold in (1.0, 0.3):
        model.prune_threshold = threshold
        losses.append(fit(model))
    return np.array(losses), [np.asarray(w) for w in model.get_weights()]


def keras_fit(model):
    images, labels = batch()
    logs = model.fit(images, labels, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return logs.history["loss"][-1]


def save(path, one, two, extra=None):
    arrays = {"losses_1": one[0], "losses_2": two[0], **(extra or {})}
    for i, (a, b) in enumerate(zip(one[1], two[1])):
        arrays[f"w1_{i}"], arrays[f"w2_{i}"] = a, b
    np.savez(path, **arrays)


def run_jax(path):
    import jax
    import keras

    import keras_dtop

    assert len(jax.devices()) == 2, jax.devices()
    pixels = batch()[0]  # raw uint8 images: predict preprocesses them

    def pruned_scores(model, mode="auto"):
        model.prune_threshold, model.pruning_mode = 0.3, mode
        scores = model.predict(pixels, verbose=0)
        model.prune_threshold, model.pruning_mode = 1.0, "auto"
        return scores

    reference = build()
    initial = reference.get_weights()
    extra = {"single": pruned_scores(reference)}
    one = two_steps(reference, keras_fit)

    keras.distribution.set_distribution(keras_dtop.distribute.data_parallel())
    model = build(initial)
    extra["data_parallel"] = pruned_scores(model)
    two = two_steps(model, keras_fit)
    kernel = model.backbone.get_layer("encoder_block_0").trainable_weights[0]
    extra["replicated"] = np.array(kernel.value.sharding.is_fully_replicated)

    keras.distribution.set_distribution(keras_dtop.distribute.model_parallel(model_size=2))
    sharded = build(initial)
    for mode in ("auto", "masked"):
        extra[f"model_parallel_{mode}"] = pruned_scores(sharded, mode)
    extra["paths"] = np.array([v.path for v in sharded.weights])
    extra["specs"] = np.array([str(tuple(v.value.sharding.spec)) for v in sharded.weights])
    save(path, one, two, extra)


def run_tensorflow(path):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    reference = build()
    initial = reference.get_weights()
    one = two_steps(reference, keras_fit)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = build(initial)
    two = two_steps(model, keras_fit)
    save(path, one, two, {"replicas": np.array(strategy.num_replicas_in_sync)})


def torch_ddp_worker(rank, world, path, initial):
    import torch.distributed as dist

    import keras_dtop

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build(initial)
        images, labels = batch()
        share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)

        def ddp_fit(model):
            history = keras_dtop.distribute.fit_ddp(
                model, images[share], labels[share], batch_size=BATCH // world, verbose=0
            )
            return history["loss"][-1]

        losses, weights = two_steps(model, ddp_fit)
        if rank == 0:
            np.savez(path, losses=losses, *weights)
    finally:
        dist.destroy_process_group()


def run_torch(path):
    import torch.multiprocessing as mp

    reference = build()
    initial = reference.get_weights()
    one = two_steps(reference, keras_fit)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    mp.spawn(torch_ddp_worker, args=(2, path + ".ddp.npz", initial), nprocs=2, join=True)
    with np.load(path + ".ddp.npz") as ddp:
        two = (ddp["losses"], [ddp[f"arr_{i}"] for i in range(len(one[1]))])
    save(path, one, two)


if __name__ == "__main__":
    import keras

    {"jax": run_jax, "tensorflow": run_tensorflow, "torch": run_torch}[keras.backend.backend()](sys.argv[1])
