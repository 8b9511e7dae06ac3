"""`choose_prune_threshold`: p0 for a GFLOPs or time budget, checked on the data it was given."""

import numpy as np
import pytest
from conftest import varied_images

from keras_dtop.evaluation import evaluate_segmentation
from keras_dtop.evaluation.threshold_budget import choose_prune_threshold, record_heads, simulate


@pytest.fixture(scope="module")
def validation():
    """8 varied images (one model call per pass) with labels from their brightness (4 classes)."""
    images = varied_images(8, seed=5)
    labels = np.digitize(images.mean(-1), [64, 128, 192]).astype("int32")
    return images, labels


@pytest.fixture
def model(trained_export_model):
    p0 = trained_export_model.prune_threshold
    yield trained_export_model
    trained_export_model.prune_threshold = p0


def _achievable_saving(model, data):
    """A target the candidates can reach: half of what p0 0.5 saves by simulation."""
    heads, labels, size = record_heads(model, data)
    return simulate(model, heads, labels, size, 0.5, model.keep_top_k)[1] / 2


def test_chosen_p0_meets_the_saving_target_on_the_data(model, validation):
    before = model.prune_threshold
    target = _achievable_saving(model, validation)
    assert target > 0.02, "the test model must be able to prune"
    choice = choose_prune_threshold(model, validation, target_saving=target)
    assert model.prune_threshold == before, "the model's own p0 must be left alone"
    assert isinstance(choice.prune_threshold, float) and choice.flops_saving >= target
    assert 1 <= choice.passes - 1 <= 4 and len(choice.candidates) == 13

    model.prune_threshold = choice.prune_threshold  # what the user then gets
    report = evaluate_segmentation(model, validation)
    assert report.flops_saving >= target
    assert report.flops_saving == pytest.approx(choice.flops_saving) and report.miou == pytest.approx(choice.miou)

    # Best estimated mIoU among the candidates that meet the target by estimate.
    meeting = [row for row in choice.candidates if row[2] >= target]
    assert choice.estimated[0] == max(row[1] for row in meeting)


def test_per_stage_choice_is_one_p0_per_pruning_head(model, validation):
    target = _achievable_saving(model, validation)
    choice = choose_prune_threshold(
        model, validation, target_saving=target, candidates=(0.5, 0.8, 0.95, 1.0), per_stage=True
    )
    assert isinstance(choice.prune_threshold, tuple) and len(choice.prune_threshold) == 2
    assert len(choice.candidates) == 16 and choice.flops_saving >= target
    model.prune_threshold = choice.prune_threshold
    assert evaluate_segmentation(model, validation).flops_saving >= target


def test_simulated_first_head_exits_equal_the_real_ones(model, validation):
    heads, labels, size = record_heads(model, validation)
    p0 = model.prune_threshold
    _, _, alive_counts = simulate(model, heads, labels, size, p0, model.keep_top_k)
    real = model.predict_details(validation[0])["alive_counts"]
    np.testing.assert_array_equal(alive_counts[:, :2], real[:, :2])
    assert (real[:, 1] < real[:, 0]).any(), "p0 must prune at the first head"


def test_time_target_is_measured(model, validation):
    choice = choose_prune_threshold(model, validation, target_ms_per_image=1e6, timing_images=8)
    assert choice.dense_ms_per_image > 0 and 0 < choice.ms_per_image <= 1e6


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({}, "exactly one target"),
        ({"target_saving": 0.2, "target_ms_per_image": 5.0}, "exactly one target"),
        ({"target_saving": 1.5}, "target_saving"),
        ({"target_ms_per_image": -1.0}, "target_ms_per_image"),
        ({"target_saving": 0.2, "candidates": (0.5, 2.0)}, "prune_threshold"),
        ({"target_saving": 0.2, "max_checks": 0}, "max_checks"),
        ({"target_saving": 0.999, "candidates": (0.9, 1.0)}, "No candidate"),
    ],
)
def test_bad_requests_are_refused_by_name(model, validation, kwargs, words):
    with pytest.raises(ValueError, match=words):
        choose_prune_threshold(model, validation, **kwargs)


def test_empty_data_is_refused(model):
    empty = (np.zeros((0, 64, 64, 3), "float32"), np.zeros((0, 64, 64), "int32"))
    with pytest.raises(ValueError, match="no data"):
        choose_prune_threshold(model, empty, target_saving=0.2)


def test_windows_are_cut_and_padded_as_sliding_window_evaluation_does(model):
    images = varied_images(2, size=48, seed=6)  # smaller than the 64x64 window: one padded window each
    labels = np.ones((2, 48, 48), "int32")
    heads, truth, size = record_heads(model, (images, labels), sliding_window=(64, 64))
    assert size == (64, 64) and heads[0][1].shape[0] == 2
    assert (truth[:, :48, :48] == 1).all() and (truth[:, 48:] == 255).all() and (truth[:, :, 48:] == 255).all()
