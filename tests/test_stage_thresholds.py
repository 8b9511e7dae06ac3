"""p0 per pruning head: validation, equality with one p0, each head using its own, `.keras` round trip."""

import numpy as np
import pytest
from conftest import random_images, set_threshold_between_tokens, tiny_segmenter, varied_images

import keras
from keras_dtop.layers.pruning import TokenPruner


def _details(model, images, mode):
    model.pruning_mode = mode
    return model.predict_details(images, batch_size=8)


def _pruning_model(images):
    """The tiny random model and p0s `(first, second)` placed between token scores:
    each head's p0 splits the tokens alive at that head, so both heads exit tokens."""
    model = tiny_segmenter()
    first = set_threshold_between_tokens(model, images, 0.5)
    model.prune_threshold = (first, 1.0)
    head = model.predict_details(images)["heads"][1]
    confidence = np.unique(head["token_scores"].max(axis=1)[head["alive"].astype(bool)])
    middle = len(confidence) // 2
    return model, (first, float((confidence[middle - 1] + confidence[middle]) / 2))


def test_equal_values_per_head_equal_one_p0():
    images = varied_images(8)
    model, (p0, _) = _pruning_model(images)
    for mode in ("gathered", "capacity"):  # masked: test_gathered_equals_masked_with_per_head_p0
        model.stage_capacity = 0.5 if mode == "capacity" else None
        model.prune_threshold = p0
        one = _details(model, images, mode)
        model.prune_threshold = (p0, p0)
        per_head = _details(model, images, mode)
        assert model.prune_threshold == (p0, p0)
        np.testing.assert_array_equal(per_head["exit_stage"], one["exit_stage"])
        np.testing.assert_array_equal(per_head["alive_counts"], one["alive_counts"])
        np.testing.assert_allclose(per_head["scores"], one["scores"], atol=1e-6)
    assert (one["alive_counts"][:, -1] < one["alive_counts"][:, 0]).any(), "the test model must prune"


def test_each_head_decides_with_its_own_p0():
    images = varied_images(8)
    model, (first, second) = _pruning_model(images)
    model.prune_threshold = first
    one = _details(model, images, "gathered")["exit_stage"]

    model.prune_threshold = (first, second)
    both = _details(model, images, "gathered")
    assert (both["exit_stage"] == 0).any() and (both["exit_stage"] == 1).any()
    np.testing.assert_array_equal(both["exit_stage"] == 0, one == 0)  # head 0 decides as before

    model.prune_threshold = (first, 1.0)  # the second head never prunes
    second_off = _details(model, images, "gathered")["exit_stage"]
    np.testing.assert_array_equal(second_off == 0, one == 0)
    assert not (second_off == 1).any()

    model.prune_threshold = (1.0, second)  # the first head never prunes
    first_off = _details(model, images, "gathered")
    assert not (first_off["exit_stage"] == 0).any() and (first_off["exit_stage"] == 1).any()
    np.testing.assert_array_equal(first_off["alive_counts"][:, 1], 16)


def test_gathered_equals_masked_with_per_head_p0():
    images = varied_images(8)
    model, per_head = _pruning_model(images)
    model.prune_threshold = per_head
    gathered, masked = _details(model, images, "gathered"), _details(model, images, "masked")
    np.testing.assert_array_equal(gathered["exit_stage"], masked["exit_stage"])
    np.testing.assert_allclose(gathered["scores"], masked["scores"], atol=1e-5)


def test_per_head_p0_round_trips_through_keras_files(tmp_path):
    model = tiny_segmenter(prune_threshold=[0.35, 0.5])
    assert model.prune_threshold == (0.35, 0.5)
    images = random_images(2)
    want = model.predict_details(images)["exit_stage"]
    path = tmp_path / "per_head.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.prune_threshold == (0.35, 0.5)
    np.testing.assert_array_equal(restored.predict_details(images)["exit_stage"], want)
    assert TokenPruner.from_config(model.pruner.get_config()).prune_threshold == (0.35, 0.5)


def test_per_head_p0_accepts_numpy_vectors_and_scalars():
    model = tiny_segmenter()
    model.prune_threshold = np.array([0.5, 0.75], "float32")
    assert model.prune_threshold == (0.5, 0.75) and all(type(p) is float for p in model.prune_threshold)
    model.prune_threshold = np.float32(0.5)
    assert model.prune_threshold == 0.5 and type(model.prune_threshold) is float


@pytest.mark.parametrize(
    "p0, error, words",
    [
        ((0.5,), ValueError, "2 pruning heads"),
        ((0.5, 0.5, 0.5), ValueError, "2 pruning heads"),
        ((), ValueError, "empty"),
        ((0.5, 1.5), ValueError, "in \\(0, 1\\]"),
        ((0.5, 0.0), ValueError, "in \\(0, 1\\]"),
        ((0.5, "high"), TypeError, "prune_threshold"),
        ((0.5, None), TypeError, "prune_threshold"),
    ],
)
def test_bad_per_head_p0_is_refused_by_name(p0, error, words):
    with pytest.raises(error, match=words):
        tiny_segmenter(prune_threshold=p0)
    model = tiny_segmenter(prune_threshold=0.3)
    with pytest.raises(error, match=words):
        model.prune_threshold = p0
    assert model.prune_threshold == 0.3, "a refused p0 must leave the old one"


def test_wrong_length_set_on_the_pruner_fails_at_the_next_call():
    model = tiny_segmenter()
    model.pruner.prune_threshold = (0.3, 0.3, 0.3)  # the layer alone cannot know the head count
    with pytest.raises(ValueError, match="2 pruning heads"):
        model.predict(random_images(1), verbose=0)


def test_pruner_layer_without_a_stage_index_refuses_per_head_p0():
    layer = TokenPruner(prune_threshold=(0.5, 0.6))
    presence = np.zeros((1, 2, 2), "float32")
    mask = np.zeros((1, 2, 3), "float32")
    with pytest.raises(ValueError, match="one per pruning head"):
        layer(presence, mask, None, np.ones((1, 3), bool))
