"""Train a DToP segmenter on several devices with the backend's own engine, both phases.

    KERAS_BACKEND=jax python examples/train_distributed.py --devices 2
    KERAS_BACKEND=tensorflow python examples/train_distributed.py --devices 2 --policy mixed_bfloat16
    KERAS_BACKEND=torch python examples/train_distributed.py --devices 2
    KERAS_BACKEND=torch torchrun --nproc_per_node=8 examples/train_distributed.py   # one process per GPU

Picks the mechanism for the backend (README "Training on many devices"):
JAX `keras.distribution` (DataParallel, or ModelParallel with `--model-size`),
TensorFlow `tf.distribute.MirroredStrategy`, PyTorch DDP (`fit_ddp`, one process
per device: started here with --devices on CPU, or by torchrun). On a machine
with fewer devices than --devices, the CPU is split into virtual devices (JAX,
TensorFlow) or gloo processes (PyTorch), so the set-up runs anywhere.

Trains on the built-in synthetic data: a dense phase, then the pruning
fine-tune (p0 --threshold), and prints the device count, the per-device batch
and images/s of each phase; the last line is the same as JSON.
"""

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=None, help="devices to train on (default: all)")
    parser.add_argument("--batch-per-device", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="steps per phase (after 1 warm-up step)")
    parser.add_argument("--threshold", type=float, default=0.5, help="p0 of the pruning phase")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--policy", default="float32", help="Keras dtype policy, e.g. mixed_bfloat16")
    parser.add_argument("--model-size", type=int, default=1, help="JAX: devices per model replica")
    parser.add_argument("--preset", default=None, help="a keras-dtop preset instead of the small default model")
    parser.add_argument("--image-size", type=int, default=64)
    return parser.parse_args(argv)


def prepare_devices(args):
    """Before any backend starts: virtual CPU devices for JAX when asked for
    (the flag only splits the CPU platform; GPUs and TPUs are unaffected)."""
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "jax" and args.devices and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = f"{flag} {os.environ.get('XLA_FLAGS', '')}".strip()
    return backend


def build_model(args):
    import keras_dtop

    size = (args.image_size, args.image_size)
    if args.preset:
        return keras_dtop.DToPSegmenter.from_preset(
            args.preset, load_weights=False, image_size=size, num_classes=6, prune_threshold=1.0
        )
    backbone = keras_dtop.DToPBackbone(
        patch_size=8, hidden_dim=96, num_layers=6, num_heads=4, mlp_dim=192, image_size=size,
        stage_ends=(1, 3, 5),
    )  # fmt: skip
    return keras_dtop.DToPSegmenter(
        backbone, num_classes=6, prune_threshold=1.0, keep_top_k=5, head_hidden_dim=48,
        head_num_heads=4, head_num_layers=2,
        preprocessor=keras_dtop.DToPImageSegmenterPreprocessor(
            image_converter=keras_dtop.DToPImageConverter.from_mean_std()
        ),
    )  # fmt: skip


def data(args, count, seed=0):
    from keras_dtop.data import synthetic_segmentation

    return synthetic_segmentation(count, image_size=(args.image_size,) * 2, num_classes=6, seed=seed)


def timed_phases(args, fit, model, global_batch):
    """Dense phase then pruning phase; images/s of each (after two warm-up steps)."""
    result = {}
    for phase, threshold in (("dense", 1.0), ("pruning", args.threshold)):
        model.prune_threshold = threshold
        # Warm-up with the timed call's length: compiles this phase's step.
        # Under a JAX distribution Keras compiles again on the second call and
        # whenever the number of steps changes.
        fit(args.steps)
        fit(args.steps)
        start = time.perf_counter()
        logs = fit(args.steps)
        seconds = time.perf_counter() - start
        result[phase] = {"images_per_second": args.steps * global_batch / seconds, "loss": logs["loss"][-1]}
        if "alive_stage_1" in logs:
            result[phase]["alive_stage_1"] = logs["alive_stage_1"][-1]
    return result


def train_keras(args, backend):
    """JAX (keras.distribution) and TensorFlow (MirroredStrategy): Keras' own fit."""
    import contextlib

    import keras

    import keras_dtop

    keras.mixed_precision.set_global_policy(args.policy)
    scope = contextlib.nullcontext()
    if backend == "jax":
        import jax

        devices = jax.devices()[: args.devices or None]
        if args.model_size > 1:
            distribution = keras_dtop.distribute.model_parallel(args.model_size, devices)
        else:
            distribution = keras_dtop.distribute.data_parallel(devices)
        keras.distribution.set_distribution(distribution)
        replicas, mechanism = len(devices) // args.model_size, type(distribution).__name__
    else:
        import tensorflow as tf

        kind = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
        if kind == "CPU" and (args.devices or 1) > 1:
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.devices)
        devices = [d.name for d in tf.config.list_logical_devices(kind)][: args.devices or None]
        strategy = tf.distribute.MirroredStrategy(devices)
        scope, replicas, mechanism = strategy.scope(), strategy.num_replicas_in_sync, "MirroredStrategy"
    with scope:
        model = build_model(args)
        model.compile(optimizer=keras_dtop.optimizers.DToPAdamW(learning_rate=args.learning_rate))
    global_batch = args.batch_per_device * replicas
    images, labels = data(args, global_batch * args.steps)

    def fit(steps):
        count = steps * global_batch
        return model.fit(images[:count], labels[:count], batch_size=global_batch, epochs=1, verbose=0).history

    return dict(mechanism=mechanism, devices=len(devices), replicas=replicas, **_summary(args, model, fit, global_batch))


def _summary(args, model, fit, global_batch):
    return dict(batch_per_device=args.batch_per_device, global_batch=global_batch,
                policy=args.policy, phases=timed_phases(args, fit, model, global_batch))  # fmt: skip


def train_torch_process(rank, world, args):
    """One DDP process (rank of world): its own slice of every global batch."""
    import keras
    import torch.distributed as dist

    import keras_dtop

    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    else:  # processes share the cores: do not oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world)
    try:
        keras.mixed_precision.set_global_policy(args.policy)
        keras.utils.set_random_seed(0)  # the same initial weights in every process
        model = build_model(args)
        model.compile(optimizer=keras_dtop.optimizers.DToPAdamW(learning_rate=args.learning_rate))
        global_batch = args.batch_per_device * world
        images, labels = data(args, global_batch * args.steps)
        mine = slice(rank, None, world)  # every global batch splits across the processes

        def fit(steps):
            count = steps * global_batch
            return keras_dtop.distribute.fit_ddp(
                model, images[:count][mine], labels[:count][mine], batch_size=args.batch_per_device, verbose=0
            )

        summary = dict(mechanism="DistributedDataParallel", devices=world, replicas=world,
                       **_summary(args, model, fit, global_batch))  # fmt: skip
        if rank == 0:
            report(summary)
    finally:
        dist.destroy_process_group()


def train_torch(args):
    if "RANK" in os.environ:  # started by torchrun: this process is one of them
        train_torch_process(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return
    import torch.multiprocessing as mp

    world = args.devices or 1
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
    mp.spawn(train_torch_process, args=(world, args), nprocs=world, join=True)


def report(summary):
    import keras

    print(f"backend {keras.backend.backend()} | {summary['mechanism']} | devices {summary['devices']} | "
          f"batch per device {summary['batch_per_device']} (global {summary['global_batch']}) | {summary['policy']}")  # fmt: skip
    for phase, numbers in summary["phases"].items():
        alive = f", alive after stage 1 {numbers['alive_stage_1']:.2f}" if "alive_stage_1" in numbers else ""
        print(f"  {phase:8s} {numbers['images_per_second']:8.1f} images/s, loss {numbers['loss']:.3f}{alive}")
    print(json.dumps(dict(summary, backend=keras.backend.backend())))
    sys.stdout.flush()


def main(argv=None):
    args = parse_args(argv)
    backend = prepare_devices(args)
    if backend == "torch":
        train_torch(args)
    else:
        report(train_keras(args, backend))


if __name__ == "__main__":
    main()
