"""Sliding-window inference and the evaluation report (keras_dtop.evaluation)."""

import json

import numpy as np
import pytest
from conftest import random_images, set_threshold_between_tokens, tiny_segmenter

from keras_dtop.evaluation import (
    SlidingWindow,
    confusion_matrix,
    evaluate_segmentation,
    iou_from_confusion,
    pad_pixel,
    sliding_window_details,
    window_positions,
)

WINDOW = SlidingWindow((64, 64), (32, 48))


@pytest.fixture(scope="module")
def model():
    model = tiny_segmenter()
    set_threshold_between_tokens(model, random_images(4, seed=1))
    return model


def test_window_positions_cover_every_pixel_flush_with_the_border():
    positions = window_positions(100, 150, WINDOW)
    tops, lefts = sorted({p[0] for p in positions}), sorted({p[1] for p in positions})
    assert tops == [0, 32, 36] and lefts == [0, 48, 86]
    covered = np.zeros((100, 150), int)
    for top, left in positions:
        covered[top : top + 64, left : left + 64] += 1
    assert covered.min() >= 1
    assert window_positions(64, 64, WINDOW) == [(0, 0)]
    assert window_positions(40, 64, WINDOW) == [(0, 0)]  # smaller than the crop: one padded window


def test_one_window_image_equals_the_plain_prediction(model):
    image = random_images(1, seed=3)
    plain = model.predict_details(image)
    slid = sliding_window_details(model, image[0], WINDOW)
    np.testing.assert_allclose(slid["scores"], plain["scores"][0], atol=1e-6)
    np.testing.assert_array_equal(slid["alive_counts"], plain["alive_counts"])
    assert slid["gflops"] == pytest.approx(plain["gflops"][0])


def test_larger_image_averages_windows_and_sums_their_gflops(model):
    image = random_images(1, 100, 150, seed=4)[0]
    slid = sliding_window_details(model, image, WINDOW)
    positions = [tuple(p) for p in slid["windows"]]
    assert positions == window_positions(100, 150, WINDOW) and len(positions) == 9
    crops = np.stack([image[t : t + 64, l : l + 64] for t, l in positions])
    each = model.predict_details(crops)
    assert slid["gflops"] == pytest.approx(each["gflops"].sum())
    assert slid["gflops_with_auxiliary_heads"] == pytest.approx(each["gflops_with_auxiliary_heads"].sum())
    np.testing.assert_array_equal(slid["alive_counts"], each["alive_counts"])
    assert slid["alive_counts"][:, 1:].min() < 16  # windows really pruned
    dense = model.predict_details(crops[:1])
    assert slid["dense_gflops"] > slid["gflops"]
    # Expected average, rebuilt from the windows' own scores.
    total, hits = np.zeros((100, 150, model.num_classes)), np.zeros((100, 150, 1))
    for scores, (t, l) in zip(each["scores"], positions):
        total[t : t + 64, l : l + 64] += scores
        hits[t : t + 64, l : l + 64] += 1
    assert hits.min() >= 1
    np.testing.assert_allclose(slid["scores"], total / hits, atol=1e-5)
    assert dense["scores"].shape == (1, 64, 64, model.num_classes)


def test_image_smaller_than_the_crop_is_padded_and_cut_back(model):
    image = random_images(1, 40, 56, seed=5)[0]
    slid = sliding_window_details(model, image, WINDOW)
    padded = np.zeros((1, 64, 64, 3), "float32")  # no preprocessor: pad with normalised 0
    padded[0, :40, :56] = image
    np.testing.assert_allclose(slid["scores"], model.predict_details(padded)["scores"][0, :40, :56], atol=1e-6)


def test_predict_and_evaluate_take_a_sliding_window(model):
    images = random_images(2, 80, 96, seed=6)
    labels = np.random.default_rng(0).integers(0, model.num_classes, (2, 80, 96)).astype("int32")
    scores = model.predict(images, sliding_window=WINDOW)
    assert scores.shape == (2, 80, 96, model.num_classes)
    details = model.predict_details(images, sliding_window=((64, 64), (32, 48)))
    np.testing.assert_allclose(details["scores"], scores)
    assert details["num_windows"].tolist() == [4, 4]
    assert np.all(details["gflops"] < details["dense_gflops"])
    metrics = model.evaluate(images, labels, sliding_window=WINDOW, batch_size=4)
    report = evaluate_segmentation(model, (images, labels), WINDOW)
    assert metrics == report.metrics()
    expected = iou_from_confusion(confusion_matrix(labels, scores.argmax(-1), model.num_classes))
    assert report.miou == pytest.approx(np.nanmean(expected))
    assert report.gflops == pytest.approx(details["gflops"].mean())
    assert report.flops_saving == pytest.approx(1 - details["gflops"].sum() / details["dense_gflops"].sum())
    np.testing.assert_allclose(report.alive_fraction, details["alive_fraction"].mean(axis=0))


def test_confusion_and_iou_by_hand():
    labels = np.array([[0, 0, 1, 255], [2, 2, 1, 1]])
    predictions = np.array([[0, 1, 1, 2], [2, 0, 1, 1]])
    confusion = confusion_matrix(labels, predictions, 4)
    assert confusion.sum() == 7  # the 255 pixel is left out
    assert confusion[0, 0] == 1 and confusion[0, 1] == 1 and confusion[2, 0] == 1
    iou = iou_from_confusion(confusion)
    np.testing.assert_allclose(iou[:3], [1 / 3, 3 / 4, 1 / 2])
    assert np.isnan(iou[3])  # class 3 never occurs: left out of the mean


def test_report_table_and_json(model, tmp_path):
    images = random_images(3, seed=7)
    labels = np.zeros((3, 64, 64), "int32")
    labels[:, :, 32:] = 1
    labels[0, :8] = 255
    names = ["sky", "road", "car", "tree"]
    report = evaluate_segmentation(model, (images, labels), class_names=names)
    predictions = model.predict(images).argmax(-1)
    valid = labels != 255
    assert report.pixel_accuracy == pytest.approx(np.mean(predictions[valid] == labels[valid]))
    assert report.num_images == 3 and report.num_windows == 3
    assert report.alive_fraction[0] == 1.0 and 0 < report.flops_saving < 1
    table = report.table()
    for name in names:
        assert name in table
    assert "mIoU" in table and "saving" in table
    report.save_json(tmp_path / "report.json")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["miou"] == pytest.approx(report.miou) and set(saved["per_class_iou"]) == set(names)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="stride"):
        SlidingWindow((64, 64), (80, 32))
    with pytest.raises(ValueError, match="crop_size"):
        SlidingWindow((64, 0))
    with pytest.raises(ValueError, match="class names"):
        evaluate_segmentation(tiny_segmenter(), (random_images(1), np.zeros((1, 64, 64), "int32")), class_names=["a"])
    with pytest.raises(ValueError, match="Labels must be in"):
        evaluate_segmentation(tiny_segmenter(), (random_images(1), np.full((1, 64, 64), 9, "int32")))


def test_window_arguments_and_checks():
    assert SlidingWindow.from_argument(64) == SlidingWindow((64, 64))
    assert SlidingWindow.from_argument((64, 48)).crop_size == (64, 48)  # a flat pair is a crop
    assert SlidingWindow.from_argument(((64, 64), (32, 32))).stride == (32, 32)
    assert SlidingWindow.from_argument(np.int64(64)).crop_size == (64, 64)
    assert SlidingWindow((512, 512)).stride == (341, 341)
    model = tiny_segmenter()
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        sliding_window_details(model, random_images(1)[0], (60, 60))


def test_padding_uses_the_preprocessors_mean_and_a_resizing_preprocessor_is_refused():
    import keras_dtop

    model = tiny_segmenter()
    converter = keras_dtop.DToPImageConverter.from_mean_std(mean=(10.0, 20.0, 30.0), std=(2.0, 2.0, 2.0))
    model.preprocessor = keras_dtop.DToPImageSegmenterPreprocessor(image_converter=converter)
    np.testing.assert_allclose(pad_pixel(model), [10.0, 20.0, 30.0], rtol=1e-6)
    image = np.random.default_rng(0).uniform(0, 255, (40, 64, 3)).astype("float32")
    padded = np.concatenate([image, np.broadcast_to([10.0, 20.0, 30.0], (24, 64, 3))]).astype("float32")
    slid = sliding_window_details(model, image, WINDOW)
    np.testing.assert_allclose(slid["scores"], model.predict_details(padded[None])["scores"][0, :40], atol=1e-5)
    resizing = keras_dtop.DToPImageConverter.from_mean_std(image_size=(32, 32))
    model.preprocessor = keras_dtop.DToPImageSegmenterPreprocessor(image_converter=resizing)
    with pytest.raises(ValueError, match="resizes images"):
        sliding_window_details(model, image, WINDOW)


def test_evaluation_in_small_batches_equals_one_pass(model):
    images = random_images(3, 80, 96, seed=8)
    labels = np.random.default_rng(1).integers(0, model.num_classes, (3, 80, 96)).astype("int32")
    small = evaluate_segmentation(model, (images, labels), WINDOW, batch_size=4)  # one image per call
    large = evaluate_segmentation(model, (images, labels), WINDOW, batch_size=12)  # all 12 windows at once
    assert small.num_images == large.num_images == 3 and small.num_windows == 12
    assert small.miou == pytest.approx(large.miou) and small.gflops == pytest.approx(large.gflops)
    with pytest.raises(ValueError, match="needs labels"):
        model.evaluate(images, sliding_window=WINDOW)
