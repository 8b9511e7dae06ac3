"""Full-integer int8 TFLite: int8 matrix products calibrated on images, float32 decisions.

A model trained on synthetic scenes (so that its predictions have margins a
real model has) is exported in float32 and in full int8; the int8 file must
segment like the float one. Quantization is a TensorFlow conversion property
(under JAX and PyTorch the exporter converts a saved `.keras` file under
TensorFlow, as in the TensorFlow session), so those checks run once, in the
TensorFlow session; every backend exports its own model in full int8, with
calibration batches handed over from its session.
"""

import os

import keras
import numpy as np
import pytest
from conftest import conversion_checked_once, varied_images
from train_for_export import export_test_model

from keras_dtop.cli import main as cli_main
from keras_dtop.data import synthetic_segmentation
from keras_dtop.export import LiteRTSegmenter, export_tflite, int8_operators, tflite_operators

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def scenes():
    train = synthetic_segmentation(192, image_size=(64, 64), num_classes=NUM_CLASSES, seed=1)
    test = synthetic_segmentation(16, image_size=(64, 64), num_classes=NUM_CLASSES, seed=2)
    return train[0].astype("float32"), train[1].astype("int32"), test[0].astype("float32")


@pytest.fixture(scope="module")
def trained(scenes):
    images, labels, _ = scenes
    keras.utils.set_random_seed(0)
    model = export_test_model(num_classes=NUM_CLASSES)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.fit(images, labels, batch_size=16, epochs=12, verbose=0)
    # The paper's p0. About half of the tokens exit after stage 1 (asserted below);
    # a p0 at the median confidence instead (`set_threshold_between_tokens`)
    # puts many tokens within int8 rounding of it: 96-98% of labels agreed then.
    model.prune_threshold = 0.9
    return model


@pytest.fixture(scope="module")
def exported(trained, scenes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8")
    float_path = export_tflite(trained, folder / "float32.tflite")
    # The calibration set as a user has it: a dataset of (images, labels) batches.
    calibration = [(scenes[0][i : i + 32], scenes[1][i : i + 32]) for i in range(0, 192, 32)]
    int8_path = export_tflite(trained, folder / "int8.tflite", quantization="full_int8", calibration_data=calibration)
    return float_path, int8_path


@conversion_checked_once
def test_full_int8_computes_the_matrix_products_in_int8(exported):
    float_path, int8_path = exported
    assert int8_operators(float_path) == []
    assert {"FULLY_CONNECTED", "BATCH_MATMUL", "CONV_2D"} <= set(int8_operators(int8_path))
    # The rule, ranking and gathers stay float32; the file is builtins only.
    assert not {"TOPK_V2", "GREATER", "GATHER", "CUMSUM"} & set(int8_operators(int8_path))
    assert {"QUANTIZE", "DEQUANTIZE"} <= set(tflite_operators(int8_path))
    runner = LiteRTSegmenter(str(int8_path))
    assert runner.input_dtype == np.float32
    int8_weights = [t for t in runner.interpreter.get_tensor_details() if t["dtype"] == np.int8]
    assert len(int8_weights) > 20
    assert os.path.getsize(int8_path) < os.path.getsize(float_path)


@conversion_checked_once
def test_full_int8_segments_like_float32(exported, scenes):
    float_path, int8_path = exported
    test_images = scenes[2]
    reference = LiteRTSegmenter(str(float_path))(test_images)
    outputs = LiteRTSegmenter(str(int8_path))(test_images)
    assert outputs["scores"].dtype == np.float32
    agreement = np.mean(outputs["labels"] == reference["labels"])
    same_exits = np.mean(outputs["exit_stage"] == reference["exit_stage"])
    print(f"labels agree {agreement:.4f}, exit stages agree {same_exits:.4f}")
    assert agreement >= 0.97
    assert same_exits >= 0.9
    assert reference["alive_tokens"][:, 1:].mean() < 48, "the float model should prune these scenes"


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(quantization="full_int8"), ValueError, "needs calibration_data"),
        (dict(quantization="full_int8", calibration_data=np.zeros((4, 32, 32, 3))), ValueError, r"\(count, 64, 64, 3\)"),
        (dict(quantization="full_int8", calibration_data=np.zeros((4, 64, 64))), ValueError, r"got \(4, 64, 64\)"),
        (dict(quantization="full_int8", calibration_data=np.full((2, 64, 64, 3), np.nan)), ValueError, "NaN"),
        (dict(quantization="full_int8", calibration_data=np.full((2, 64, 64, 3), 300.0)), ValueError, r"\[0, 255\]"),
        (dict(quantization="full_int8", calibration_data=np.zeros((0, 64, 64, 3))), ValueError, "no images"),
        (dict(quantization="full_int8", calibration_data=np.zeros((1, 64, 64, 3)), batch_size=2), ValueError, "fewer than"),
        (dict(quantization="full_int8", calibration_data="missing.npy"), FileNotFoundError, "missing.npy"),
        (dict(quantization="full_int8", calibration_data=42), ValueError, "got int"),
        (dict(quantization="int8", calibration_data=np.zeros((4, 64, 64, 3))), ValueError, "only used by"),
    ],
)
def test_bad_calibration_data_is_refused_before_tracing(options, error, message, tmp_path):
    with pytest.raises(error, match=message):
        export_tflite(export_test_model(), tmp_path / "never.tflite", **options)
    assert not (tmp_path / "never.tflite").exists()


def test_this_backends_model_exports_in_full_int8(trained_export_model, tmp_path):
    images = varied_images(8, seed=4)
    labels = np.zeros((4, 64, 64), "int32")
    calibration = [(images[:4], labels), (images[4:], labels)]  # (images, labels) batches from this session
    path = export_tflite(trained_export_model, tmp_path / "int8.tflite", quantization="full_int8",
                         calibration_data=calibration)  # fmt: skip
    assert {"FULLY_CONNECTED", "BATCH_MATMUL"} <= set(int8_operators(str(path)))
    outputs = LiteRTSegmenter(str(path))(images[:2])
    assert outputs["scores"].shape == (2, 64, 64, trained_export_model.num_classes)


@conversion_checked_once
def test_cli_full_int8_from_an_npy_file(trained, scenes, tmp_path, capsys):
    source, calibration = tmp_path / "model.keras", tmp_path / "calibration.npy"
    trained.save(source)
    np.save(calibration, scenes[0][:32])
    out = tmp_path / "cli_int8.tflite"
    args = ["export", str(source), "--out", str(out), "--quantization", "full_int8"]
    assert cli_main([*args, "--calibration-data", str(calibration)]) == 0
    assert "FULLY_CONNECTED" in int8_operators(str(out))
    capsys.readouterr()
    assert cli_main(args) == 2
    assert "needs calibration_data" in capsys.readouterr().err
