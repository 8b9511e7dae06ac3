"""Training beyond one device: data parallelism on every backend (2 virtual
CPU devices / 2 gloo processes, in a fresh process), model parallelism on JAX,
mixed precision and gradient accumulation."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from test_training import NUM_CLASSES, small_model

import keras_dtop

BACKEND = keras.backend.backend()
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def two_device_run(tmp_path_factory):
    """`distributed_steps.py` in a fresh process on 2 devices: its arrays."""
    out = tmp_path_factory.mktemp("distributed") / "steps.npz"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    if BACKEND == "jax":
        # First: XLA stops reading flags at a malformed one.
        env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 " + env.get("XLA_FLAGS", "")).strip()
    result = subprocess.run(
        [sys.executable, str(HERE / "distributed_steps.py"), str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    with np.load(out) as arrays:
        return dict(arrays)


def test_two_devices_make_the_one_device_update_in_both_phases(two_device_run):
    """One dense step then one pruning step: the global batch of 8 split over 2
    devices (JAX DataParallel, TF MirroredStrategy, torch DDP via fit_ddp)
    gives the losses and weights of one device on the whole batch."""
    run = two_device_run
    np.testing.assert_allclose(run["losses_2"], run["losses_1"], rtol=1e-5)
    assert run["losses_1"][1] != run["losses_1"][0]
    count = len([k for k in run if k.startswith("w1_")])
    assert count == len(small_model().weights)
    for i in range(count):
        np.testing.assert_allclose(run[f"w2_{i}"], run[f"w1_{i}"], atol=1e-5, rtol=0, err_msg=f"weight {i}")
    if BACKEND == "tensorflow":
        assert int(run["replicas"]) == 2
    if BACKEND == "jax":
        assert bool(run["replicated"])  # DataParallel keeps a full copy of the weights per device


def test_steps_really_changed_the_weights(two_device_run):
    """Guards the comparison above: the two steps moved the weights (a run
    that trained nothing would compare equal too)."""
    keras.utils.set_random_seed(0)  # the script's seed: the same initial weights
    initial = small_model(prune_threshold=1.0).get_weights()
    changed = [np.abs(two_device_run[f"w1_{i}"] - w).max() for i, w in enumerate(initial)]
    assert max(changed) > 1e-4


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on the JAX backend")
def test_model_parallel_shards_the_big_kernels_and_predicts_alike(two_device_run):
    run = two_device_run
    specs = dict(zip(run["paths"], run["specs"]))
    assert specs["encoder_block_0/query/kernel"] == "(None, 'model', None)"
    assert specs["encoder_block_1/dense_1/kernel"] == "(None, 'model')"
    assert specs["encoder_block_1/dense_2/kernel"] == "('model', None)"
    assert specs["grading_head_1/decoder_layer_0/linear1/kernel"] == "(None, 'model')"
    assert specs["grading_head_0/decoder_layer_0/self_attn/attention_output/kernel"] == "('model', None, None)"
    assert specs["encoder_block_0/ln_1/gamma"] == "(None,)"  # norms stay replicated
    sharded = [p for p, s in specs.items() if "model" in s]
    assert len(sharded) == 2 * 10 + 2 * 17  # every block's 10 and every head's 17 kernels and biases
    for mode in ("auto", "masked"):  # pruned (gathered) and reference inference
        np.testing.assert_allclose(run[f"model_parallel_{mode}"], run["single"], atol=1e-5)
    np.testing.assert_allclose(run["data_parallel"], run["single"], atol=1e-5)


def test_model_parallel_rejects_a_model_size_that_does_not_divide_the_devices():
    with pytest.raises(ValueError, match="model_size must divide the device count"):
        keras_dtop.distribute.model_parallel(model_size=3, devices=["cpu:0", "cpu:1"])


@pytest.mark.skipif(BACKEND != "torch", reason="fit_ddp is the PyTorch backend's entry point")
def test_fit_ddp_needs_a_process_group():
    model = small_model()
    model.compile()
    images = np.zeros((2, 32, 32, 3), "uint8")
    with pytest.raises(RuntimeError, match="init_process_group"):
        keras_dtop.distribute.fit_ddp(model, images, np.zeros((2, 32, 32), "int32"))


# --- Gradient accumulation ---


def two_class_labels(count, seed=0):
    """Labels with exactly two classes per image (left and right halves): every
    micro-batch then has the same loss normalisers as the whole batch."""
    rng = np.random.default_rng(seed)
    labels = np.empty((count, 32, 32), "int32")
    for label in labels:
        a, b = rng.choice(NUM_CLASSES, size=2, replace=False)
        label[:, :16], label[:, 16:] = a, b
    return labels


def damped_adamw(**kwargs):
    """DToPAdamW with epsilon 1e-3: Adam turns a gradient that is float noise
    (|g| << 1e-8) into a full +-lr step, so two equal sums rounded differently
    would move such weights apart by 2·lr; a larger epsilon damps only those."""
    return keras_dtop.optimizers.DToPAdamW(learning_rate=1e-3, epsilon=1e-3, **kwargs)


@pytest.mark.parametrize("prune_threshold", [1.0, 0.3], ids=["dense phase", "pruning phase"])
def test_gradient_accumulation_equals_one_large_batch(prune_threshold):
    images = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3)).astype("uint8")
    labels = two_class_labels(8)
    keras.utils.set_random_seed(0)
    large = small_model(prune_threshold=prune_threshold)
    initial = large.get_weights()
    large.compile(optimizer=damped_adamw())
    large.fit(images, labels, batch_size=8, epochs=1, shuffle=False, verbose=0)

    accumulated = small_model(prune_threshold=prune_threshold)
    accumulated.set_weights(initial)
    accumulated.compile(optimizer=damped_adamw(gradient_accumulation_steps=4))
    accumulated.fit(images, labels, batch_size=2, epochs=1, shuffle=False, verbose=0)
    largest_step = 0.0
    for before, want, got in zip(initial, large.get_weights(), accumulated.get_weights()):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        largest_step = max(largest_step, np.abs(want - before).max())
    assert largest_step > 1e-4  # the update is real (heads at 10x the rate)
    assert int(keras.ops.convert_to_numpy(accumulated.optimizer.iterations)) == 1  # one update from 4 micro-batches


def test_gradient_accumulation_round_trips_in_the_optimizer_config():
    optimizer = keras_dtop.optimizers.DToPAdamW(gradient_accumulation_steps=4)
    restored = keras_dtop.optimizers.DToPAdamW.from_config(optimizer.get_config())
    assert restored.gradient_accumulation_steps == 4 and restored.head_lr_multiplier == 10.0


# --- Mixed precision ---

POLICIES = ["mixed_bfloat16"] + (["mixed_float16"] if BACKEND in ("tensorflow", "torch") else [])
# Largest score difference to the float32 model (scores are in (0, 1)): bfloat16
# keeps 8 mantissa bits, float16 11.
SCORE_TOLERANCE = {"mixed_bfloat16": 0.05, "mixed_float16": 0.01}


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    try:
        yield request.param
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_mixed_precision_trains_both_phases_and_predicts_close_to_float32(policy, tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (8, 32, 32, 3)).astype("uint8")
    labels = two_class_labels(8, seed=2)
    model = small_model()
    assert model.dtype_policy.name == policy and model.grading_heads[0].compute_dtype != "float32"
    model.compile(optimizer=keras_dtop.optimizers.DToPAdamW(learning_rate=1e-3))
    if policy == "mixed_float16":  # Keras wraps the optimizer for loss scaling
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    dense = model.fit(images, labels, batch_size=4, epochs=1, verbose=0).history["loss"]
    model.prune_threshold = 0.3
    pruned = model.fit(images, labels, batch_size=4, epochs=1, verbose=0).history
    assert np.isfinite(dense).all() and np.isfinite(pruned["loss"]).all()
    assert pruned["alive_stage_1"][0] < 1.0  # the pruning phase pruned

    scores = model.predict(images, verbose=0)
    assert scores.dtype == np.float32  # scores and the rule's inputs are float32
    path = tmp_path / "mixed.keras"
    model.save(path)
    keras.mixed_precision.set_global_policy("float32")
    full = small_model(prune_threshold=0.3)
    full.set_weights(model.get_weights())
    full.pruning_mode = model.pruning_mode = "masked"  # same exits are not guaranteed: compare masked
    model.prune_threshold = full.prune_threshold = 1.0
    np.testing.assert_allclose(model.predict(images, verbose=0), full.predict(images, verbose=0),
                               atol=SCORE_TOLERANCE[policy], rtol=0)  # fmt: skip

    restored = keras.saving.load_model(path)
    assert restored.dtype_policy.name == policy
    assert restored.backbone.get_layer("encoder_block_0").dtype_policy.name == policy
    assert restored.grading_heads[1].dtype_policy.name == policy
    np.testing.assert_array_equal(restored.predict(images, verbose=0), scores)
