"""Bad and odd input through the public API: clear errors, pinned behaviour.

Every bad kind must raise a `ValueError`/`TypeError`/`FileNotFoundError`
whose message names the problem (the README's "Errors" table lists them);
odd-but-valid kinds have a documented result that a test pins. One small
model serves the whole module.
"""

import numpy as np
import pytest
from conftest import tiny_segmenter

import keras_dtop
from keras_dtop.convert import read_state_dict
from keras_dtop.models.presets import mean_std_preprocessor

BACKEND_TRACES = ("Traceback", "tensorflow.python", "jaxlib", "torch._", "UnimplementedError")


@pytest.fixture(scope="module")
def model():
    model = tiny_segmenter(prune_threshold=0.3)
    model.preprocessor = mean_std_preprocessor((127.5,) * 3, (127.5,) * 3)
    return model


@pytest.fixture(scope="module")
def rgb():
    return np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")


def assert_clear(error_types, message, fn, *args, **kwargs):
    """`fn(*args)` raises one of `error_types`, the message matches, no backend trace in it."""
    with pytest.raises(error_types, match=message) as info:
        fn(*args, **kwargs)
    text = str(info.value)
    assert not any(trace in text for trace in BACKEND_TRACES), text
    return text


def _with_nan(rgb):
    bad = rgb.copy()
    bad[0, 3, 5, 1] = np.nan
    return bad


def _with_inf(rgb):
    bad = rgb.copy()
    bad[1, 0, 0, 0] = np.inf
    return bad


# --- predict: bad images ---

BAD_IMAGES = {
    "five channels": (lambda rgb: np.zeros((2, 64, 64, 5), "float32"), ValueError, r"3 image channels.*\(2, 64, 64, 5\)"),
    "two channels, one image": (lambda rgb: np.zeros((64, 64, 2)), ValueError, r"\(64, 64, 2\) are ambiguous"),
    "strings": (lambda rgb: np.full((1, 64, 64, 3), "a"), TypeError, "real-valued numbers.*<U1"),
    "bytes": (lambda rgb: np.full((1, 64, 64, 3), b"a"), TypeError, "real-valued numbers"),
    "objects": (lambda rgb: np.empty((1, 64, 64, 3), object), TypeError, "real-valued numbers.*object"),
    "booleans": (lambda rgb: rgb > 100, TypeError, "dtype bool"),
    "complex": (lambda rgb: rgb.astype("complex64"), TypeError, "complex64"),
    "NaN pixels": (_with_nan, ValueError, "1 NaN or Inf pixel values"),
    "Inf pixels": (_with_inf, ValueError, "1 NaN or Inf pixel values"),
    "rank 5": (lambda rgb: rgb[None], ValueError, r"got shape \(1, 2, 64, 64, 3\)"),
    "rank 1": (lambda rgb: np.zeros(12), ValueError, r"got shape \(12,\)"),
    "height not a patch multiple": (lambda rgb: rgb[:, :60], ValueError, "height must be a positive multiple of the patch size 16, got 60"),
    "smaller than a patch": (lambda rgb: rgb[:, :8, :8], ValueError, "height must be a positive multiple of the patch size 16, got 8"),
    "images of different sizes": (lambda rgb: [rgb[0], rgb[1, :32, :32]], ValueError, "different shapes"),
    "empty list": (lambda rgb: [], ValueError, "empty list"),
    "None": (lambda rgb: None, TypeError, "NoneType"),
    "a string": (lambda rgb: "image.png", TypeError, "str"),
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_predict_refuses_bad_images(model, rgb, kind):
    make, error, message = BAD_IMAGES[kind]
    assert_clear(error, message, model.predict, make(rgb), verbose=0)


@pytest.mark.parametrize("kind", ["five channels", "NaN pixels", "strings", "height not a patch multiple"])
def test_predict_details_refuses_bad_images(model, rgb, kind):
    make, error, message = BAD_IMAGES[kind]
    assert_clear(error, message, model.predict_details, make(rgb))


# --- predict: odd but valid images ---


def test_empty_batch_gives_empty_scores(model):
    scores = model.predict(np.zeros((0, 64, 64, 3), "float32"), verbose=0)
    assert scores.shape == (0, 64, 64, model.num_classes)
    assert_clear(ValueError, "empty batch", model.predict_details, np.zeros((0, 64, 64, 3)))


def test_one_image_a_list_and_a_batch_agree(model, rgb):
    batch = model.predict(rgb, verbose=0)
    np.testing.assert_allclose(model.predict(list(rgb), verbose=0), batch, atol=1e-5)
    np.testing.assert_allclose(model.predict(rgb[1], verbose=0), batch[1:], atol=1e-5)


def test_grayscale_images_are_repeated_to_rgb(model, rgb):
    gray = rgb[..., 0]
    expected = model.predict(np.repeat(gray[..., None], 3, axis=-1), verbose=0)
    np.testing.assert_allclose(model.predict(gray[..., None], verbose=0), expected, atol=1e-5)
    np.testing.assert_allclose(model.predict(gray[0], verbose=0), expected[:1], atol=1e-5)
    np.testing.assert_allclose(model.predict(list(gray), verbose=0), expected, atol=1e-5)


def test_uint8_and_float_pixels_give_the_same_scores(model, rgb):
    pixels = rgb.astype("uint8")
    np.testing.assert_allclose(
        model.predict(pixels, verbose=0), model.predict(pixels.astype("float64"), verbose=0), atol=1e-5
    )


def test_model_call_names_shape_problems(model):
    assert_clear(ValueError, "rank 3", model, np.zeros((2, 64, 64), "float32"))
    assert_clear(TypeError, "dtype bool", model, np.zeros((1, 64, 64, 3), bool))


# --- settings ---

BAD_SETTINGS = {
    "p0 zero": ("prune_threshold", 0.0, ValueError, r"prune_threshold \(p0\) must be in \(0, 1\].*got 0.0"),
    "p0 above one": ("prune_threshold", 1.5, ValueError, "prune_threshold.*1.5"),
    "p0 NaN": ("prune_threshold", float("nan"), ValueError, "prune_threshold.*nan"),
    "p0 string": ("prune_threshold", "0.9", TypeError, "prune_threshold.*'0.9'"),
    "k negative": ("keep_top_k", -1, ValueError, "keep_top_k must be >= 0, got -1"),
    "k float": ("keep_top_k", 2.5, TypeError, "keep_top_k.*2.5"),
    "unknown mode": ("pruning_mode", "fast", ValueError, "pruning_mode must be one of.*'fast'"),
    "capacity zero": ("stage_capacity", (0, 3), ValueError, "stage_capacity ints must be >= 1 token, got 0"),
    "capacity too long": ("stage_capacity", (3, 3, 3), ValueError, r"one entry per pruning head \(2\)"),
    "capacity fraction above one": ("stage_capacity", (0.5, 1.5), ValueError, "fractions in.*1.5"),
    "capacity string": ("stage_capacity", ("a", 2), TypeError, "stage_capacity entries.*'a'"),
    "bucket zero": ("token_bucket", 0, ValueError, "token_bucket.*0"),
    "policy": ("execution_policy", "fast", TypeError, "execution_policy must be an ExecutionPolicy"),
}


@pytest.mark.parametrize("kind", sorted(BAD_SETTINGS))
def test_bad_settings_are_refused_and_change_nothing(kind):
    model = tiny_segmenter()
    name, value, error, message = BAD_SETTINGS[kind]
    before = getattr(model, name)
    assert_clear(error, message, setattr, model, name, value)
    assert getattr(model, name) == before


def test_capacity_mode_without_capacities(model, rgb):
    model.pruning_mode = "capacity"
    try:
        assert_clear(ValueError, "needs stage_capacity", model.predict, rgb, verbose=0)
    finally:
        model.pruning_mode = "auto"


# --- presets, pretrained weights, checkpoints ---


def test_from_preset_errors():
    assert_clear(ValueError, "num_classes must be >= 1", keras_dtop.DToPSegmenter.from_preset,
                 "dtop_vit_tiny", num_classes=0, load_weights=False)  # fmt: skip
    assert_clear(TypeError, "stage_ends", keras_dtop.DToPSegmenter.from_preset,
                 "dtop_vit_tiny", num_classes=2, stage_ends="last", load_weights=False)  # fmt: skip


def test_from_pretrained_missing_and_junk_files(tmp_path):
    assert_clear(FileNotFoundError, "missing.safetensors", keras_dtop.DToPBackbone.from_pretrained,
                 str(tmp_path / "missing.safetensors"))  # fmt: skip
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    assert_clear(ValueError, "junk.safetensors.*not a readable .safetensors file", read_state_dict, junk)
    assert_clear(ValueError, "not a readable .safetensors file",
                 keras_dtop.DToPSegmenter.from_pretrained_backbone, str(junk), num_classes=3)  # fmt: skip


def test_torch_files_that_are_not_checkpoints(tmp_path):
    pytest.importorskip("torch")
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights")
    message = assert_clear(ValueError, "notes.pth is not a PyTorch checkpoint", read_state_dict, text)
    assert "Python objects" not in message
    truncated = tmp_path / "cut.pth"
    import torch

    torch.save({"w": torch.zeros(100)}, tmp_path / "whole.pth")
    truncated.write_bytes((tmp_path / "whole.pth").read_bytes()[:200])
    assert_clear(ValueError, "cut.pth is not a PyTorch checkpoint", read_state_dict, truncated)


def test_npz_without_arrays_and_unknown_suffix(tmp_path):
    np.savez(tmp_path / "empty.npz")
    assert_clear(ValueError, "holds no arrays", read_state_dict, tmp_path / "empty.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    assert_clear(ValueError, "broken.npz is not a readable .npz file", read_state_dict, tmp_path / "broken.npz")
    (tmp_path / "w.h5").write_bytes(b"")
    assert_clear(ValueError, "Unknown checkpoint format '.h5'", read_state_dict, tmp_path / "w.h5")


# --- saved models ---


def test_truncated_and_foreign_keras_files(tmp_path, model):
    import keras

    path = tmp_path / "model.keras"
    model.save(path)
    (tmp_path / "cut.keras").write_bytes(path.read_bytes()[:1000])
    (tmp_path / "foreign.keras").write_text("hello")
    load = keras_dtop.models.load_segmenter
    assert_clear(ValueError, "cut.keras is not a readable .keras file", load, tmp_path / "cut.keras")
    assert_clear(ValueError, "foreign.keras is not a readable .keras file", load, tmp_path / "foreign.keras")
    assert_clear(FileNotFoundError, "nothing.keras", load, tmp_path / "nothing.keras")
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    other.save(tmp_path / "dense.keras")
    assert_clear(TypeError, "dense.keras holds a Sequential, not a DToPSegmenter", load, tmp_path / "dense.keras")
    assert isinstance(load(path), keras_dtop.DToPSegmenter)


def test_litert_missing_and_junk_files(tmp_path):
    from keras_dtop.export import LiteRTSegmenter

    assert_clear(FileNotFoundError, "No .tflite file", LiteRTSegmenter, tmp_path / "none.tflite")
    (tmp_path / "junk.tflite").write_bytes(b"\x00" * 64)
    assert_clear(ValueError, "junk.tflite is not a readable .tflite model", LiteRTSegmenter, tmp_path / "junk.tflite")


# --- training data ---


def test_fit_refuses_bad_labels(rgb):
    model = tiny_segmenter()
    model.compile()
    labels = np.zeros((2, 64, 64), "int32")
    assert_clear(ValueError, r"Labels of shape \(2, 32, 32\) do not match images", model.fit, rgb, labels[:, :32, :32], verbose=0)
    assert_clear(ValueError, r"Labels must be in \[0, 4\) or 255 \(ignore\); found \[7\]", model.fit, rgb, labels + 7, verbose=0)
    assert_clear(ValueError, r"Labels must be in \[0, 4\).*found \[-1\]", model.evaluate, rgb, labels - 1, verbose=0)


def test_data_loaders_name_the_missing_folder(tmp_path):
    from keras_dtop.data import folder_dataset, tfds_dataset

    assert_clear(FileNotFoundError, "nowhere", folder_dataset, tmp_path / "nowhere", num_classes=3)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    assert_clear(ValueError, "No image/mask pairs found", folder_dataset, tmp_path / "empty", num_classes=3)
    assert_clear(ValueError, "scene_parse150|not supported|Unknown", tfds_dataset, "not_a_dataset", "train")


def test_sliding_window_errors_and_small_images(model, rgb):
    assert_clear(ValueError, "multiple of the patch size", model.predict, rgb, verbose=0, sliding_window=40)
    # An image smaller than the window is padded to it (documented): scores keep the image size.
    small = rgb[:, :48, :40]
    scores = model.predict(small, verbose=0, sliding_window=64)
    assert scores.shape == (2, 48, 40, model.num_classes) and np.isfinite(scores).all()


def test_export_settings_fail_before_tracing(tmp_path, model):
    from keras_dtop.export import export_tflite

    assert_clear(ValueError, "multiples of the patch size", export_tflite, model, tmp_path / "m.tflite", image_size=(60, 64))
    assert_clear(ValueError, "quantization", export_tflite, model, tmp_path / "m.tflite", quantization="int4")


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    from keras_dtop import cli

    assert cli.main(["export", str(tmp_path / "missing.keras"), "--out", str(tmp_path / "m.tflite")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.keras" in err
