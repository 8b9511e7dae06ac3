"""Shared test helpers: tiny models, the authors' fixture, backend-neutral conversions.

The backend is chosen by KERAS_BACKEND before keras is imported (`.ci/run`
runs the suite once per backend).
"""

import os
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_dtop

FIXTURE_DIR = Path(
    os.environ.get(
        "KERAS_DTOP_FIXTURES",
        Path(__file__).resolve().parent / "fixtures" / "authors-dtop",
    )
)


if os.environ.get("KERAS_DTOP_TEST_THREADS"):
    # CI runs two suites side by side on 2 cores, one thread each (.ci/run);
    # JAX takes its thread count from XLA_FLAGS there.
    threads = int(os.environ["KERAS_DTOP_TEST_THREADS"])
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    if keras.config.backend() == "torch":
        import torch

        torch.set_num_threads(threads)


if keras.config.backend() == "jax" and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    # Tests build many identical tiny models (every fresh `fit` traces the same
    # train step again): JAX's persistent compilation cache, kept for this
    # session only, turns their repeated XLA compiles into cache reads (about
    # 3x quicker on the fault tests). Tracing still happens every time.
    import atexit
    import shutil
    import tempfile

    import jax

    _jax_cache = tempfile.mkdtemp(prefix="keras-dtop-jax-cache-")
    atexit.register(shutil.rmtree, _jax_cache, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _jax_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def to_numpy(structure):
    return keras.tree.map_structure(keras.ops.convert_to_numpy, structure)


def tiny_backbone(**overrides):
    config = dict(
        patch_size=16,
        hidden_dim=32,
        num_layers=4,
        num_heads=2,
        mlp_dim=64,
        image_size=(64, 64),
        stage_ends=(1, 2, 3),
    )
    config.update(overrides)
    return keras_dtop.DToPBackbone(**config)


def tiny_segmenter(backbone=None, **overrides):
    config = dict(
        num_classes=4,
        head_hidden_dim=16,
        head_num_heads=2,
        head_num_layers=2,
        prune_threshold=0.2,
        keep_top_k=1,
    )
    config.update(overrides)
    return keras_dtop.DToPSegmenter(backbone or tiny_backbone(), **config)


def random_images(batch=2, height=64, width=64, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, height, width, 3)).astype("float32")


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield


def load_fixture(name):
    path = FIXTURE_DIR / name
    if not path.exists():
        raise FileNotFoundError(
            f"Authors' reference fixture not found at {path}: the repository keeps it under "
            "tests/fixtures/authors-dtop/; KERAS_DTOP_FIXTURES points the tests elsewhere."
        )
    return np.load(path)


def gradient(fn, x):
    """d sum(fn(x)) / dx with the active backend's autodiff, as NumPy."""
    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(fn(x))
        return tape.gradient(y, x).numpy()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda v: fn(v).sum())(keras.ops.convert_to_tensor(x)))
    if backend == "torch":
        import torch

        x = torch.tensor(np.asarray(x), requires_grad=True)
        fn(x).sum().backward()
        return x.grad.numpy()
    raise NotImplementedError(backend)


def traced(fn):
    """`fn` compiled the way each backend traces a whole program (tf.function,
    jax.jit, torch.compile is not used: PyTorch runs eagerly)."""
    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    return fn


def varied_images(count=8, size=64, seed=0):
    """`count` raw RGB images in [0, 255] of different kinds (noise, flat colour,
    gradients, stripes, checkerboard, halves, blobs) so that the pruning rule
    keeps different numbers of tokens per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    kinds = [
        lambda: rng.uniform(0, 255, (size, size, 3)),
        lambda: np.broadcast_to(rng.uniform(0, 255, 3), (size, size, 3)),
        lambda: xx[..., None] * rng.uniform(0, 255, 3),
        lambda: (np.sin(yy * rng.uniform(5, 30))[..., None] > 0) * rng.uniform(0, 255, 3),
        lambda: ((xx * 8).astype(int) + (yy * 8).astype(int))[..., None] % 2 * 255.0,
        lambda: np.where((xx < 0.5)[..., None], rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)),
        lambda: np.exp(-((xx - rng.random()) ** 2 + (yy - rng.random()) ** 2) * 20)[..., None] * 255,
        lambda: rng.uniform(0, 64, (size, size, 3)) + 128,
    ]
    images = [np.broadcast_to(kinds[i % len(kinds)](), (size, size, 3)) for i in range(count)]
    return np.clip(np.stack(images), 0, 255).astype("float32")


def set_threshold_between_tokens(model, images, candidate_fraction=0.5):
    """Set p0 so that about `candidate_fraction` of the first stage's tokens are
    exit candidates, halfway between two tokens' confidences: no token sits
    within rounding error of p0, so every backend and runtime decides alike."""
    scores = model.predict_details(images)["heads"][0]["token_scores"]
    confidence = np.unique(scores.max(axis=1))
    i = int(np.clip(round((1 - candidate_fraction) * len(confidence)), 1, len(confidence) - 1))
    model.prune_threshold = float((confidence[i - 1] + confidence[i]) / 2)
    return model.prune_threshold


# --- Export tests: one trained model per session, conversion properties checked once ---


@pytest.fixture(scope="session")
def trained_export_model():
    """The export tests' model, trained on this session's backend; p0 set so that
    images prune differently. Tests that change its settings restore them."""
    from train_for_export import export_test_model, train_deterministically

    keras.utils.set_random_seed(3)
    return train_deterministically(export_test_model())


# Conversion properties (quantization, capacity shapes, prefix tokens, the
# extremes of the rule) do not depend on the backend a model comes from: under
# JAX and PyTorch the exporter saves a .keras file and converts it under
# TensorFlow, exactly as in the TensorFlow session. They run once, there.
conversion_checked_once = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="a TensorFlow conversion property: checked once, in the TensorFlow session",
)


# --- Time per test file, printed at the end of every run (CI keeps an eye on its budget) ---

_FILE_SECONDS = {}


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if not _FILE_SECONDS:
        return
    terminalreporter.section(f"seconds per test file ({keras.config.backend()})")
    for path, seconds in sorted(_FILE_SECONDS.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{seconds:8.1f}  {path}")
    terminalreporter.write_line(f"{sum(_FILE_SECONDS.values()):8.1f}  total")
