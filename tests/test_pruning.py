"""The grading rule (select_exits), the canvas and the TokenPruner layer."""

import numpy as np
import pytest
from conftest import to_numpy

from keras_dtop.layers import TokenPruner, select_exits, token_scores, update_canvas


def exits(scores, alive=None, p0=0.9, k=5):
    scores = np.asarray(scores, "float32")
    if alive is None:
        alive = np.ones((scores.shape[0], scores.shape[2]), bool)
    return to_numpy(select_exits(scores, np.asarray(alive), p0, k))


def one_image(conf, labels, num_classes=3):
    """Scores (1, C, N) with `conf[t]` at class `labels[t]` and small values elsewhere."""
    conf = np.asarray(conf, "float32")
    scores = np.full((1, num_classes, len(conf)), 0.01, "float32")
    scores[0, labels, np.arange(len(conf))] = conf
    return scores


def oracle(scores, alive, p0, k):
    """Slow per-image, per-class version of the rule, written from the design doc."""
    batch, _, tokens = scores.shape
    out = np.zeros((batch, tokens), bool)
    for b in range(batch):
        conf = scores[b].max(0)
        label = scores[b].argmax(0)  # numpy: lowest class id on ties
        cand = [t for t in range(tokens) if alive[b, t] and conf[t] > np.float32(p0)]
        keep = set()
        for c in set(label[cand]):
            members = sorted((t for t in cand if label[t] == c), key=lambda t: (-conf[t], t))
            keep.update(members[:k])
        for t in cand:
            out[b, t] = t not in keep
        if not (alive[b] & ~out[b]).any():
            masked = np.where(alive[b], conf, -1)
            out[b, int(np.argmax(masked))] = False
    return out


def test_score_equal_to_p0_does_not_exit():
    scores = one_image([0.5, np.nextafter(np.float32(0.5), np.float32(1)), 0.2], [0, 0, 1])
    np.testing.assert_array_equal(exits(scores, p0=0.5, k=0), [[False, True, False]])


def test_design_doc_example():
    """8 class-0 candidates at 0.91..0.99, 3 class-1 at 0.97..0.99, p0 0.9, k 5:
    only the 3 least confident class-0 tokens exit."""
    conf = [0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.98, 0.99, 0.97, 0.98, 0.99, 0.5]
    labels = [0] * 8 + [1] * 3 + [2]
    expected = [True, True, True] + [False] * 9
    np.testing.assert_array_equal(exits(one_image(conf, labels)), [expected])


def test_class_with_fewer_than_k_candidates_keeps_them_all():
    scores = one_image([0.95, 0.96, 0.97, 0.99], [0, 0, 1, 2])
    np.testing.assert_array_equal(exits(scores, k=2), [[False] * 4])
    np.testing.assert_array_equal(exits(scores, k=1), [[True, False, False, False]])


def test_ties_keep_the_lowest_token_indices():
    # Saturated tokens of one class share the same confidence.
    scores = one_image([1.0] * 7 + [0.3], [0] * 7 + [1])
    np.testing.assert_array_equal(exits(scores, k=5), [[False] * 5 + [True, True, False]])
    # A tie straddling the k-th place: 0.99 once, then four 0.95 for three places.
    scores = one_image([0.95, 0.99, 0.95, 0.95, 0.95], [0] * 5)
    np.testing.assert_array_equal(exits(scores, k=4), [[False, False, False, False, True]])


def test_class_ties_go_to_the_lowest_class_id():
    scores = np.full((1, 2, 3), 0.95, "float32")  # every token: class 0 and 1 tied
    np.testing.assert_array_equal(exits(scores, k=1), [[False, True, True]])


def test_dead_tokens_never_exit_again():
    scores = one_image([0.99] * 6, [0] * 6)
    alive = np.array([[False, True, True, False, True, True]])
    result = exits(scores, alive, k=1)
    np.testing.assert_array_equal(result, [[False, False, True, False, True, True]])
    assert not (result & ~alive).any()


def test_one_token_survives_when_everything_is_confident_and_k_is_zero():
    scores = one_image([0.95, 0.99, 0.97, 0.99], [0, 1, 2, 1])
    np.testing.assert_array_equal(exits(scores, k=0), [[True, False, True, True]])


def test_threshold_one_keeps_everything():
    scores = np.ones((2, 3, 5), "float32")
    assert not exits(scores, p0=1.0, k=0).any()


def test_vectorised_rule_equals_per_image_oracle():
    rng = np.random.default_rng(0)
    for trial in range(12):
        batch, classes, tokens = 3, 4, 37  # one shape: a single compile per k on JAX
        scores = rng.uniform(0.5, 1.0, (batch, classes, tokens)).astype("float32")
        scores = np.round(scores, 2)  # many ties
        scores[0, :, 0] = 0.97  # class ties
        alive = rng.uniform(size=(batch, tokens)) < 0.8
        alive[:, 0] = True
        p0 = float(rng.choice([0.6, 0.9, 0.95]))
        k = int(rng.integers(0, 4))
        np.testing.assert_array_equal(
            exits(scores, alive, p0, k), oracle(scores, alive, p0, k), f"trial {trial}"
        )


def test_canvas_keeps_the_last_head_that_saw_each_token():
    first = np.full((1, 2, 4), 1.0, "float32")
    second = np.full((1, 2, 4), 2.0, "float32")
    seen = np.array([[True, False, True, False]])
    canvas = to_numpy(update_canvas(update_canvas(None, first, seen), second, seen))
    np.testing.assert_array_equal(canvas[0, 0], [2.0, 1.0, 2.0, 1.0])


def test_token_scores():
    presence = np.array([[[2.0, 0.0]]], "float32")
    mask = np.array([[[0.0, 3.0]]], "float32")
    expected = (np.exp(2) / (np.exp(2) + 1)) * (1 / (1 + np.exp(-mask)))
    np.testing.assert_allclose(to_numpy(token_scores(presence, mask)), expected, rtol=1e-6)


def test_token_pruner_layer_and_config():
    layer = TokenPruner(prune_threshold=0.6, keep_top_k=0)
    presence = np.array([[[5.0, -5.0]] * 2], "float32")
    mask = np.array([[[5.0, -5.0, 5.0], [-5.0, -5.0, -5.0]]], "float32")
    alive = np.ones((1, 3), bool)
    canvas, scores, result = to_numpy(layer(presence, mask, None, alive))
    np.testing.assert_array_equal(result, [[True, False, True]])
    restored = TokenPruner.from_config(layer.get_config())
    assert (restored.prune_threshold, restored.keep_top_k) == (0.6, 0)
    _, _, none = to_numpy(layer(presence, mask, None, alive, prune=False))
    assert not none.any()


@pytest.mark.parametrize("p0", [0.0, -0.1, 1.5])
def test_bad_threshold(p0):
    with pytest.raises(ValueError, match="prune_threshold"):
        TokenPruner(prune_threshold=p0)


def test_bad_top_k():
    with pytest.raises(ValueError, match="keep_top_k"):
        TokenPruner(keep_top_k=-1)
    with pytest.raises(TypeError, match="keep_top_k"):
        TokenPruner(keep_top_k=2.5)
