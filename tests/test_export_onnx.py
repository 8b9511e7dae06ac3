"""ONNX export: the graph prunes like Keras, passes onnx.checker, has a dynamic batch.

Every session exports the model it trained (under JAX and PyTorch through the
exporter's rebuild under TensorFlow) and runs the file in ONNX Runtime.
"""

import sys

import keras
import numpy as np
import onnx
import pytest
from conftest import conversion_checked_once, varied_images
from train_for_export import export_test_model

from keras_dtop.cli import main as cli_main
from keras_dtop.export import ONNXRuntimeSegmenter, export_onnx

IMAGE_SHAPE = (64, 64, 3)


@pytest.fixture(scope="module")
def trained(trained_export_model):
    return trained_export_model


@pytest.fixture(scope="module")
def onnx_path(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "dtop.onnx"
    trained.export(str(path), format="onnx")  # Keras' own entry point routes to export_onnx
    return path


def _assert_equal_to_keras(outputs, reference):
    np.testing.assert_allclose(outputs["scores"], reference["scores"], atol=1e-4, rtol=0)
    assert np.mean(outputs["labels"] == reference["scores"].argmax(-1)) >= 0.999
    np.testing.assert_array_equal(outputs["alive_tokens"], reference["alive_counts"])
    np.testing.assert_array_equal(outputs["exit_stage"], reference["exit_stage"])


def test_onnx_equals_keras_on_varied_images(trained, onnx_path):
    images = varied_images(8, seed=5)
    outputs = ONNXRuntimeSegmenter(str(onnx_path))(images)
    assert outputs["scores"].shape == (8, 64, 64, trained.num_classes)
    assert outputs["labels"].dtype == np.int32 and outputs["exit_stage"].shape == (8, 8, 8)
    _assert_equal_to_keras(outputs, trained.predict_details(images))
    # The images really prune, and differently from one another.
    assert outputs["alive_tokens"][:, -1].max() < 64
    assert len(np.unique(outputs["alive_tokens"][:, -1])) > 1


def test_onnx_file_is_valid_with_a_dynamic_batch(trained, onnx_path):
    onnx.checker.check_model(str(onnx_path), full_check=True)
    model = onnx.load(str(onnx_path))
    assert [i.name for i in model.graph.input] == ["images"]
    assert sorted(o.name for o in model.graph.output) == ["alive_tokens", "exit_stage", "labels", "scores"]
    batch_axis = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param == "batch" and not batch_axis.HasField("dim_value")
    # The pruning machinery is in the graph: ranking, row gathers, running counts.
    assert {"TopK", "Gather", "CumSum"} <= {node.op_type for node in model.graph.node}
    runner = ONNXRuntimeSegmenter(str(onnx_path))
    assert runner.input_shape == (None, *IMAGE_SHAPE)
    for count in (1, 3):
        images = varied_images(count, seed=20 + count)
        _assert_equal_to_keras(runner(images), trained.predict_details(images))


@conversion_checked_once
@pytest.mark.filterwarnings("ignore:pruning_mode='capacity'")
def test_onnx_capacity_export_with_a_fixed_batch_equals_keras(trained, tmp_path):
    path = export_onnx(
        trained, tmp_path / "capacity.onnx", pruning_mode="capacity", stage_capacity=(24, 12), batch_size=2
    )
    assert onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    images = varied_images(4, seed=9)
    previous = trained.pruning_mode, trained.stage_capacity
    trained.stage_capacity, trained.pruning_mode = (24, 12), "capacity"
    try:
        reference = trained.predict_details(images)
    finally:
        trained.pruning_mode, trained.stage_capacity = previous
    outputs = ONNXRuntimeSegmenter(path)(images)  # two chunks of the fixed batch 2
    _assert_equal_to_keras(outputs, reference)
    assert outputs["alive_tokens"][:, 1:].max() <= 24


@conversion_checked_once
@pytest.mark.parametrize("prune_threshold, expected", [(1e-6, [64, 1, 1]), (0.99, [64, 64, 64])])
def test_onnx_one_token_left_and_no_token_exiting(prune_threshold, expected, tmp_path):
    """The extremes: k = 0 and a tiny p0 leave each image its most confident
    token; a high p0 on an untrained model exits nothing. (A tf2onnx graph
    optimisation made both crash in ONNX Runtime: see `convert_function`.)"""
    keras.utils.set_random_seed(1)
    model = export_test_model(prune_threshold=prune_threshold, keep_top_k=0)
    path = export_onnx(model, tmp_path / "extreme.onnx")
    images = varied_images(2, seed=8)
    outputs = ONNXRuntimeSegmenter(path)(images)
    np.testing.assert_array_equal(outputs["alive_tokens"], [expected] * 2)
    _assert_equal_to_keras(outputs, model.predict_details(images))


@conversion_checked_once
def test_onnx_dense_export_and_uint8_input(trained, tmp_path):
    path = export_onnx(trained, tmp_path / "dense.onnx", pruning_enabled=False, input_dtype="uint8")
    images = varied_images(3, seed=4).astype(np.uint8)
    outputs = ONNXRuntimeSegmenter(path)(images)
    previous, trained.pruning_enabled = trained.pruning_enabled, False
    try:
        reference = trained.predict(images.astype("float32"), verbose=0)
    finally:
        trained.pruning_enabled = previous
    np.testing.assert_allclose(outputs["scores"], reference, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(outputs["alive_tokens"], [[64, 64, 64]] * 3)


def test_cli_exports_onnx(trained, tmp_path, capsys):
    source = tmp_path / "model.keras"
    trained.save(source)
    out = tmp_path / "cli.onnx"
    assert cli_main(["export", str(source), "--format", "onnx", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    images = varied_images(2, seed=12)
    _assert_equal_to_keras(ONNXRuntimeSegmenter(str(out))(images), trained.predict_details(images))
    assert cli_main(["export", str(source), "--format", "onnx", "--quantization", "int8", "--out", str(out)]) == 2
    assert "apply to --format tflite only" in capsys.readouterr().err


def test_cli_predict_and_info_run_an_onnx_file(trained, onnx_path, tmp_path, capsys):
    from PIL import Image

    from keras_dtop.data.folder import read_mask

    images = varied_images(3, seed=5).astype(np.uint8)
    files = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    out = tmp_path / "out"
    assert cli_main(["predict", str(onnx_path), *files, "--out", str(out), "--exit-map", "--quiet"]) == 0
    reference = trained.predict_details(images.astype("float32"))
    for i in range(3):
        assert np.mean(read_mask(out / f"{i}.png") == reference["scores"][i].argmax(-1)) >= 0.999
    assert (out / "0_exit.png").exists()
    assert cli_main(["info", str(onnx_path)]) == 0
    info = capsys.readouterr().out
    assert "ONNX graph" in info and "images (batch, 64, 64, 3) float32" in info and "TopK" in info
    assert cli_main(["predict", str(onnx_path), files[0], "--out", str(out), "--p0", "0.5"]) == 2
    assert "a .onnx file has p0 built in" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(opset=9), ValueError, "opset must be an int >= 13"),
        (dict(opset=999), ValueError, "newer than the installed onnx"),
        (dict(image_size=(60, 64)), ValueError, "multiples of the patch size 8"),
        (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
        (dict(input_dtype="int64"), TypeError, "input_dtype must be one of"),
        (dict(pruning_mode="capacity"), ValueError, "needs stage_capacity"),
        (dict(input_signature=[keras.InputSpec(shape=(None, 64, 64, 1))]), ValueError, "width, 3"),
    ],
)
def test_onnx_exporter_rejects_bad_settings_before_tracing(options, error, message, tmp_path):
    with pytest.raises(error, match=message):
        export_onnx(export_test_model(), tmp_path / "never.onnx", **options)
    assert not (tmp_path / "never.onnx").exists()


def test_missing_converter_and_bad_files_get_clear_errors(monkeypatch, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.onnx is not a readable .onnx model"):
        ONNXRuntimeSegmenter(str(junk))
    with pytest.raises(FileNotFoundError, match="No .onnx file"):
        ONNXRuntimeSegmenter(str(tmp_path / "missing.onnx"))
    monkeypatch.setitem(sys.modules, "tf2onnx", None)
    with pytest.raises(ImportError, match=r"pip install 'keras-dtop\[onnx\]'"):
        export_onnx(export_test_model(), tmp_path / "never.onnx")
