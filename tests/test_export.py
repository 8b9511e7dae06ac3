"""Export to TF SavedModel and TFLite: outputs equal Keras', pruning stays in the graph.

Every test exports from the backend the suite runs on (a model trained there),
so under JAX and PyTorch the exporter's rebuild under TensorFlow is what is tested.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import conversion_checked_once, set_threshold_between_tokens, varied_images
from train_for_export import export_test_model

from keras_dtop.cli import main as cli_main
from keras_dtop.export import (
    LiteRTSegmenter,
    custom_operators,
    export_saved_model,
    export_tflite,
    tflite_operators,
)

BACKENDS = ("tensorflow", "jax", "torch")
IMAGE_SHAPE = (64, 64, 3)


@pytest.fixture(scope="module")
def trained(trained_export_model):
    return trained_export_model


@pytest.fixture(scope="module")
def tflite_path(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("tflite") / "dtop.tflite"
    # Through Keras' own `model.export`, which routes to keras_dtop.export.
    trained.export(str(path), format="litert", input_signature=[keras.InputSpec(shape=(1, *IMAGE_SHAPE))])
    return path


# Conversion properties run once, in the TensorFlow session
# (`conversion_checked_once`); every session still exports its own model (the
# tests without this mark), and
# `test_tflite_identical_whichever_backend_trained_the_model` exports models
# trained on all three backends.
def _assert_same_segmentation(outputs, reference, atol=1e-4):
    np.testing.assert_allclose(outputs["scores"], reference["scores"], atol=atol, rtol=0)
    labels = np.argmax(reference["scores"], axis=-1)
    assert np.mean(outputs["labels"] == labels) >= 0.999


def test_tflite_float32_equals_keras_on_varied_images(trained, tflite_path):
    images = varied_images(8, seed=5)
    reference = trained.predict_details(images)
    outputs = LiteRTSegmenter(str(tflite_path))(images)
    assert outputs["scores"].shape == (8, 64, 64, trained.num_classes)
    assert outputs["labels"].dtype == np.int32
    _assert_same_segmentation(outputs, reference)
    np.testing.assert_array_equal(outputs["alive_tokens"], reference["alive_counts"])
    np.testing.assert_array_equal(outputs["exit_stage"], reference["exit_stage"])
    # The images really prune, and differently from one another.
    assert outputs["alive_tokens"][:, -1].max() < 64
    assert len(np.unique(outputs["alive_tokens"][:, -1])) > 1


def test_tflite_uses_builtin_operators_only(tflite_path):
    operators = tflite_operators(str(tflite_path))
    assert custom_operators(str(tflite_path)) == []
    assert not [op for op in operators if op.startswith("Flex") or op == "CUSTOM"]
    # The pruning machinery is in the graph: ranking and row gathers.
    assert {"TOPK_V2", "GATHER", "CUMSUM"} <= set(operators)


def _encoder_attention_lengths(interpreter):
    """Block index -> key length of each encoder block's softmax as the interpreter ran it."""
    lengths = {}
    for tensor in interpreter.get_tensor_details():
        match = re.search(r"encoder_block_(\d+)[^/]*/Softmax", tensor["name"])
        if match:
            lengths.setdefault(int(match.group(1)), set()).add(int(tensor["shape"][-1]))
    return lengths


def test_tflite_runs_later_stages_on_alive_tokens_only(trained, tflite_path):
    """Structural proof of the saving: at run time the attention of every block after
    the first stage spans exactly the alive tokens, not all 64."""
    runner = LiteRTSegmenter(str(tflite_path), experimental_preserve_all_tensors=True)
    stage_of_block = np.searchsorted(np.asarray(trained.stage_ends), np.arange(4))
    checked = 0
    for image in varied_images(4, seed=6):
        alive = runner(image[None])["alive_tokens"][0]
        lengths = _encoder_attention_lengths(runner.interpreter)
        assert sorted(lengths) == [0, 1, 2, 3]
        for block, length in lengths.items():
            assert length == {int(alive[stage_of_block[block]])}
            checked += int(alive[stage_of_block[block]]) < 64
    assert checked > 0  # some block ran on fewer tokens than the image has


def test_saved_model_equals_keras_on_four_images(trained, tmp_path):
    import tensorflow as tf

    path = export_saved_model(trained, tmp_path / "saved_model")  # dynamic batch
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    images = varied_images(4, seed=7)
    outputs = {k: v.numpy() for k, v in serve(images=tf.constant(images)).items()}
    reference = trained.predict_details(images)
    _assert_same_segmentation(outputs, reference, atol=1e-5)
    np.testing.assert_array_equal(outputs["alive_tokens"], reference["alive_counts"])


@conversion_checked_once
def test_every_token_confident_still_runs(tmp_path):
    """k = 0 and a tiny p0: every token is an exit candidate after the first stage.
    The rule keeps each image's most confident token, so later stages run on one
    token (the graph never builds empty tensors, which crash XNNPACK)."""
    model = export_test_model(prune_threshold=1e-6, keep_top_k=0)
    path = export_tflite(model, tmp_path / "all_exit.tflite")
    images = varied_images(2, seed=8)
    reference = model.predict_details(images)
    outputs = LiteRTSegmenter(str(path))(images)
    np.testing.assert_array_equal(outputs["alive_tokens"], [[64, 1, 1]] * 2)
    np.testing.assert_array_equal(reference["alive_counts"], [[64, 1, 1]] * 2)
    _assert_same_segmentation(outputs, reference)


@conversion_checked_once
def test_prefix_tokens_export_and_prune_inside_tflite(tmp_path):
    """A class token, two registers and LayerScale (a DINOv2-style backbone)."""
    prefix = dict(class_token=True, num_register_tokens=2, layer_scale_init=0.5)
    model = export_test_model(backbone_overrides=prefix)
    set_threshold_between_tokens(model, varied_images(16, seed=2))
    path = export_tflite(model, tmp_path / "prefix.tflite")
    images = varied_images(4, seed=9)
    reference = model.predict_details(images)
    outputs = LiteRTSegmenter(str(path))(images)
    assert (reference["alive_counts"][:, -1] < 64).any(), "p0 should prune some tokens"
    np.testing.assert_array_equal(outputs["alive_tokens"], reference["alive_counts"])
    _assert_same_segmentation(outputs, reference)


@conversion_checked_once
@pytest.mark.filterwarnings("ignore:pruning_mode='capacity'")
def test_capacity_export_has_static_shapes_and_equals_keras(trained, tmp_path):
    path = export_tflite(
        trained, tmp_path / "capacity.tflite", pruning_mode="capacity", stage_capacity=(24, 12)
    )
    runner = LiteRTSegmenter(str(path))
    dynamic = [t["name"] for t in runner.interpreter.get_tensor_details() if -1 in t["shape_signature"]]
    assert dynamic == []
    images = varied_images(4, seed=9)
    previous = trained.pruning_mode, trained.stage_capacity
    trained.stage_capacity, trained.pruning_mode = (24, 12), "capacity"
    try:
        reference = trained.predict_details(images)
    finally:
        trained.pruning_mode, trained.stage_capacity = previous
    outputs = runner(images)
    _assert_same_segmentation(outputs, reference)
    assert outputs["alive_tokens"][:, 1:].max() <= 24
    np.testing.assert_array_equal(outputs["alive_tokens"], reference["alive_counts"])


@conversion_checked_once
def test_float16_and_int8_exports_are_smaller_and_close(trained, tflite_path, tmp_path):
    images = varied_images(4, seed=10)
    reference = LiteRTSegmenter(str(tflite_path))(images)
    size = os.path.getsize(tflite_path)
    for quantization in ("float16", "int8"):
        path = export_tflite(trained, tmp_path / f"{quantization}.tflite", quantization=quantization)
        assert custom_operators(str(path)) == []
        assert os.path.getsize(path) < size
        outputs = LiteRTSegmenter(str(path))(images)
        # Rounded weights may flip a few near-threshold exits, which moves those
        # tokens' scores: compare on average, not element by element.
        error = np.abs(outputs["scores"] - reference["scores"])
        agreement = np.mean(outputs["labels"] == reference["labels"])
        print(quantization, os.path.getsize(path) / size, error.mean(), error.max(), agreement)
        assert error.mean() < 0.01
        assert agreement >= 0.95


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(image_size=(60, 64)), ValueError, "multiples of the patch size 8"),
        (dict(image_size=(64,)), ValueError, "image_size must be"),
        (dict(batch_size=None), ValueError, "fixed batch_size"),
        (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
        (dict(input_dtype="int64"), TypeError, "input_dtype must be one of"),
        (dict(input_signature=[keras.InputSpec(shape=(1, 64, 64))]), ValueError, r"\(batch, height, width, 3\)"),
        (dict(input_signature=[keras.InputSpec(shape=(1, 64, 64, 1))]), ValueError, "width, 3"),
        (dict(input_signature=[keras.InputSpec(shape=(1, None, 64, 3))]), ValueError, "fixed image size"),
        (dict(quantization="int4"), ValueError, "quantization must be"),
        (dict(pruning_mode="capacity"), ValueError, "needs stage_capacity"),
        (dict(pruning_mode="fast"), ValueError, "pruning_mode must be"),
        (dict(stage_capacity=(0.5,)), ValueError, "one entry per pruning head"),
    ],
)
def test_exporter_rejects_bad_input_settings(options, error, message, tmp_path):
    model = export_test_model()
    with pytest.raises(error, match=message):
        export_tflite(model, tmp_path / "never.tflite", **options)
    assert not (tmp_path / "never.tflite").exists()


def test_exporter_rejects_bad_sources_and_runner_inputs(tflite_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.keras"):
        export_saved_model(str(tmp_path / "missing.keras"), tmp_path / "out")
    with pytest.raises(TypeError, match="DToPSegmenter"):
        export_tflite(keras.Sequential([keras.layers.Dense(1)]), tmp_path / "x.tflite")
    runner = LiteRTSegmenter(str(tflite_path))
    with pytest.raises(ValueError, match=r"shape \(count, 64, 64, 3\)"):
        runner(np.zeros((1, 32, 32, 3), "float32"))


def test_cli_predict_and_info_run_a_tflite_file(trained, tflite_path, tmp_path, capsys):
    from PIL import Image

    from keras_dtop.data.folder import read_mask

    images = varied_images(3, seed=5).astype(np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "small.png")
    out = tmp_path / "out"
    files = [str(tmp_path / f"{i}.png") for i in range(3)]
    assert cli_main(["predict", str(tflite_path), *files, "--out", str(out), "--exit-map", "--quiet"]) == 0
    reference = trained.predict_details(images.astype("float32"))
    for i in range(3):
        assert np.mean(read_mask(out / f"{i}.png") == reference["scores"][i].argmax(-1)) >= 0.999
    assert (out / "0_exit.png").exists()
    assert cli_main(["info", str(tflite_path)]) == 0
    assert "images (1, 64, 64, 3)" in capsys.readouterr().out
    assert cli_main(["predict", str(tflite_path), str(tmp_path / "small.png"), "--out", str(out)]) == 2
    assert "differs from the .tflite model's input 64x64" in capsys.readouterr().err
    assert cli_main(["predict", str(tflite_path), files[0], "--out", str(out), "--p0", "0.5"]) == 2
    assert "a .tflite file has p0 built in" in capsys.readouterr().err


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    code = cli_main(["export", str(tmp_path / "missing.keras"), "--out", str(tmp_path / "m.tflite")])
    assert code == 2
    assert "error: FileNotFoundError" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["export", "m.keras", "--format", "coreml", "--out", "x"])


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="trains on all three backends in subprocesses itself: run once, in the TensorFlow session",
)
def test_tflite_identical_whichever_backend_trained_the_model(tmp_path):
    """The same training run on each backend (same initial weights and steps),
    saved as .keras: loaded here, the three models segment alike; the one
    PyTorch trained, exported with the `keras-dtop` CLI in a fresh process,
    equals them. (Every session also exports its own backend's model: the
    `tflite_path` fixture.)"""
    here = Path(__file__).parent
    images = varied_images(8, seed=11)
    # Every backend trains with its default thread pools, whatever this session
    # uses (.ci/run limits its suites to one thread): the thread count changes
    # reduction order, and two SGD steps amplify that enough to move a
    # near-threshold exit between backends.
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_DTOP_TEST_THREADS", "OMP_NUM_THREADS", "XLA_FLAGS")}

    def run(backend, *command):
        result = subprocess.run(
            [sys.executable, *command], env=dict(env, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2"),
            capture_output=True, text=True, cwd=here,
        )
        assert result.returncode == 0, result.stderr[-3000:]

    details = {}
    for backend in BACKENDS:
        run(backend, str(here / "train_for_export.py"), str(tmp_path / f"{backend}.keras"))
        details[backend] = keras.saving.load_model(tmp_path / f"{backend}.keras").predict_details(images)
    for backend in BACKENDS[1:]:
        np.testing.assert_allclose(details[backend]["scores"], details["tensorflow"]["scores"], atol=1e-4, rtol=0)
        np.testing.assert_array_equal(details[backend]["alive_counts"], details["tensorflow"]["alive_counts"])
    tflite = tmp_path / "torch.tflite"
    run("torch", "-m", "keras_dtop.cli", "export", str(tmp_path / "torch.keras"), "--out", str(tflite))
    outputs = LiteRTSegmenter(str(tflite))(images)
    _assert_same_segmentation(outputs, details["torch"])
    np.testing.assert_array_equal(outputs["alive_tokens"], details["torch"]["alive_counts"])
    assert len(np.unique(outputs["alive_tokens"][:, -1])) > 1  # pruning varies across the images
