"""DToPBackbone and DToPSegmenter: dense equivalence, pruning controls, details,
serialisation, presets and input validation."""

import math

import warnings

import keras
import numpy as np
import pytest
from conftest import random_images, tiny_backbone, tiny_segmenter, to_numpy

import keras_dtop
from keras_dtop import DToPBackbone, DToPSegmenter


def numpy_vit(backbone, images):
    """Plain dense ViT forward pass in NumPy through the backbone's weights."""
    w = {v.path: keras.ops.convert_to_numpy(v) for v in backbone.weights}
    p = backbone.patch_size
    b, h, wd, c = images.shape
    patches = images.reshape(b, h // p, p, wd // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, (h // p) * (wd // p), p * p * c)
    kernel = w["patch_embedding/patch_embedding/kernel"].reshape(p * p * c, -1)
    x = patches @ kernel + w["patch_embedding/patch_embedding/bias"]
    x = x + w["patch_embedding/position_embedding"].reshape(-1, x.shape[-1])

    def norm(v, name):
        mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
        eps = backbone.layer_norm_epsilon
        return (v - mu) / np.sqrt(var + eps) * w[f"{name}/gamma"] + w[f"{name}/beta"]

    erf = np.vectorize(math.erf)
    for i in range(backbone.num_layers):
        n = f"encoder_block_{i}"
        y = norm(x, f"{n}/ln_1")
        q, k, v = (
            np.einsum("bnd,dhk->bnhk", y, w[f"{n}/{s}/kernel"]) + w[f"{n}/{s}/bias"]
            for s in ("query", "key", "value")
        )
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", att, v)
        x = x + np.einsum("bqhd,hde->bqe", o, w[f"{n}/attention_output/kernel"])
        x = x + w[f"{n}/attention_output/bias"]
        y = norm(x, f"{n}/ln_2") @ w[f"{n}/dense_1/kernel"] + w[f"{n}/dense_1/bias"]
        y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
        x = x + y @ w[f"{n}/dense_2/kernel"] + w[f"{n}/dense_2/bias"]
    return x


def test_backbone_is_a_plain_dense_vit():
    backbone = tiny_backbone()
    images = random_images()
    expected = numpy_vit(backbone, images.astype("float64"))
    np.testing.assert_allclose(to_numpy(backbone(images)), expected, atol=1e-4)


def test_pruning_off_runs_the_dense_backbone():
    """With pruning off, the final head reads exactly the backbone's dense output."""
    model = tiny_segmenter(prune_threshold=1.0)
    images = random_images()
    details = to_numpy(model(images, return_details=True))
    features = model.backbone(images)
    presence, mask = to_numpy(model.grading_heads[-1](features))
    np.testing.assert_allclose(details["heads"][-1]["presence_logits"], presence, atol=1e-5)
    np.testing.assert_allclose(details["heads"][-1]["mask_logits"], mask, atol=1e-5)
    assert (details["alive_counts"] == 16).all()
    assert (details["exit_stage"] == 2).all()


def test_output_shape_non_square_and_resized_grid():
    model = tiny_segmenter()
    scores = to_numpy(model(random_images(height=48, width=96)))
    assert scores.shape == (2, 48, 96, 4)
    assert np.isfinite(scores).all() and (scores > 0).all() and (scores < 1).all()


def test_details_are_consistent():
    model = tiny_segmenter(prune_threshold=0.15, keep_top_k=1)
    details = to_numpy(model(random_images(batch=3), return_details=True))
    alive = [h["alive"] for h in details["heads"]]
    assert alive[0].all()
    for earlier, later in zip(alive, alive[1:]):
        assert not (later & ~earlier).any(), "exits must be monotone"
    np.testing.assert_array_equal(details["alive_counts"], np.stack([a.sum(-1) for a in alive], 1))
    stage = details["exit_stage"].reshape(3, -1)
    np.testing.assert_array_equal(stage == 0, ~alive[1])
    np.testing.assert_array_equal(stage == 1, alive[1] & ~alive[2])
    assert (details["alive_counts"][:, 1:] < 16).any(), "this setting is meant to prune"
    # The final map: final presence times sigmoid of each token's exit-stage logits.
    final = details["heads"][-1]
    present = keras.ops.convert_to_numpy(keras.ops.softmax(final["presence_logits"]))[..., :1]
    logits = np.where(
        stage[:, None, :] == 0,
        details["heads"][0]["mask_logits"],
        np.where(stage[:, None, :] == 1, details["heads"][1]["mask_logits"], final["mask_logits"]),
    )
    np.testing.assert_allclose(final["token_scores"], present / (1 + np.exp(-logits)), atol=1e-6)


def test_pruning_switches_without_rebuilding():
    model = tiny_segmenter(prune_threshold=1.0, keep_top_k=1)
    raw = random_images(batch=2) * 40 + 128
    dense = model.predict(raw, verbose=0)
    assert (model.predict_details(raw)["alive_counts"] == 16).all()

    model.prune_threshold = 0.15
    pruned = model.predict(raw, verbose=0)
    counts = model.predict_details(raw)["alive_counts"]
    assert (counts[:, -1] < 16).all()
    assert not np.allclose(dense, pruned)

    model.pruning_enabled = False
    np.testing.assert_allclose(model.predict(raw, verbose=0), dense, atol=1e-6)
    model.pruning_enabled = True
    np.testing.assert_allclose(model.predict(raw, verbose=0), pruned, atol=1e-6)
    model.keep_top_k = 16  # every candidate becomes context: nothing exits
    np.testing.assert_allclose(model.predict(raw, verbose=0), dense, atol=1e-5)


def test_predict_applies_the_preprocessor():
    model = DToPSegmenter.from_preset(
        "dtop_vit_tiny", num_classes=3, image_size=(64, 64), num_layers=3, stage_ends=(0, 1, 2),
        load_weights=False,
    )
    raw = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    normalised = to_numpy(model.preprocessor.image_converter(raw))
    np.testing.assert_allclose(
        model.predict(raw, verbose=0), to_numpy(model(normalised)), atol=1e-5
    )


def test_keras_file_round_trip(tmp_path):
    model = tiny_segmenter(prune_threshold=0.15, keep_top_k=1)
    images = random_images(batch=3)
    expected = to_numpy(model(images, return_details=True))
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, DToPSegmenter)
    assert restored.prune_threshold == 0.15 and restored.keep_top_k == 1
    got = to_numpy(restored(images, return_details=True))
    np.testing.assert_array_equal(got["exit_stage"], expected["exit_stage"])
    np.testing.assert_allclose(got["scores"], expected["scores"], atol=1e-6)
    np.testing.assert_allclose(restored.predict(images, verbose=0), expected["scores"], atol=1e-5)


def test_backbone_config_round_trip():
    backbone = tiny_backbone(stage_ends=(0, 2, 3))
    restored = DToPBackbone.from_config(backbone.get_config())
    assert restored.stage_ends == (0, 2, 3)
    restored.set_weights(backbone.get_weights())
    images = random_images()
    np.testing.assert_allclose(to_numpy(restored(images)), to_numpy(backbone(images)), atol=1e-6)


def test_presets_have_the_design_doc_defaults():
    assert set(keras_dtop.presets) >= {
        "dtop_vit_tiny",
        "dtop_vit_small",
        "dtop_vit_base",
        "dtop_vit_large",
    }
    base = keras_dtop.PRESETS["dtop_vit_base"]
    assert base["backbone"]["hidden_dim"] == 768 and base["backbone"]["num_layers"] == 12
    assert base["segmenter"]["prune_threshold"] == 0.9
    large = keras_dtop.PRESETS["dtop_vit_large"]
    assert large["backbone"]["num_layers"] == 24 and large["segmenter"]["prune_threshold"] == 0.95
    assert keras_dtop.models.default_stage_ends(12) == (5, 7, 11)
    assert keras_dtop.models.default_stage_ends(24) == (7, 15, 23)


def test_from_preset_builds_base():
    model = DToPSegmenter.from_preset("dtop_vit_base", num_classes=150, load_weights=False)
    assert model.stage_ends == (5, 7, 11) and model.num_classes == 150
    assert model.backbone.hidden_dim == 768 and model.grading_heads[0].hidden_dim == 384
    assert 85e6 < model.backbone.count_params() < 87e6  # ViT-B/16 without class token


def test_from_preset_runs_tiny():
    model = DToPSegmenter.from_preset(
        "dtop_vit_tiny", num_classes=7, prune_threshold=0.5, load_weights=False
    )
    assert model.prune_threshold == 0.5 and model.backbone.hidden_dim == 192
    scores = to_numpy(model(random_images(batch=1, height=32, width=48)))
    assert scores.shape == (1, 32, 48, 7)


def test_from_preset_says_its_weights_are_random():
    # keras-hub's default load_weights=True must not pass random weights off as trained.
    kwargs = dict(num_classes=2, image_size=(32, 32), num_layers=3, stage_ends=(0, 1, 2))
    with pytest.warns(UserWarning, match="architecture only.*randomly initialised"):
        DToPSegmenter.from_preset("dtop_vit_tiny", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DToPSegmenter.from_preset("dtop_vit_tiny", load_weights=False, **kwargs)
    assert all("random weights" in spec["description"] for spec in keras_dtop.PRESETS.values())


# --- Bad input ---


@pytest.mark.parametrize(
    "shape, message, predict_message",
    [
        ((2, 64, 64), "rank 3", r"images of shape \(2, 64, 64\) are ambiguous"),
        ((2, 64, 64, 4), "3 image channels", None),
        ((2, 64, 60, 3), "width must be a positive multiple of the patch size 16", None),
        ((2, 8, 64, 3), "height must be a positive multiple", None),
    ],
)
def test_bad_images(shape, message, predict_message):
    model = tiny_segmenter()
    with pytest.raises(ValueError, match=message):
        model(np.zeros(shape, "float32"))
    with pytest.raises(ValueError, match=predict_message or message):
        model.predict(np.zeros(shape, "float32"), verbose=0)


def test_bool_images_are_rejected():
    with pytest.raises(TypeError, match="dtype bool"):
        tiny_segmenter()(np.zeros((1, 64, 64, 3), bool))


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"num_classes": 0}, ValueError, "num_classes must be >= 1"),
        ({"num_classes": 2.5}, TypeError, "num_classes"),
        ({"prune_threshold": 0.0}, ValueError, r"prune_threshold \(p0\) must be in \(0, 1\]"),
        ({"prune_threshold": 1.01}, ValueError, "prune_threshold"),
        ({"keep_top_k": -1}, ValueError, "keep_top_k must be >= 0"),
        ({"stage_ends": (1, 4)}, ValueError, "out of range"),
        ({"stage_ends": (2, 1, 3)}, ValueError, "strictly increasing"),
        ({"stage_ends": (0, 2)}, ValueError, "must end at the last layer"),
        ({"stage_ends": ()}, ValueError, "at least one"),
    ],
)
def test_bad_configuration(overrides, error, message):
    with pytest.raises(error, match=message):
        tiny_segmenter(**overrides)


def test_bad_threshold_on_a_built_model():
    model = tiny_segmenter()
    with pytest.raises(ValueError, match="prune_threshold"):
        model.prune_threshold = 1.5
    assert model.prune_threshold == 0.2


def test_bad_backbone_configuration():
    with pytest.raises(ValueError, match="image_size"):
        tiny_backbone(image_size=(60, 64))
    with pytest.raises(ValueError, match="stage_ends"):
        tiny_backbone(stage_ends=(1, 2, 5))
