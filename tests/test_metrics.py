"""MeanIoU against Keras' own implementation and a hand count."""

import keras
import numpy as np
from conftest import to_numpy

from keras_dtop.metrics import MeanIoU


def test_mean_iou_matches_keras():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (3, 8, 8))
    labels[0, :2] = 255
    scores = rng.uniform(size=(3, 8, 8, 4)).astype("float32")
    ours = MeanIoU(4)
    ours.update_state(labels, scores)
    reference = keras.metrics.MeanIoU(4, ignore_class=255, sparse_y_pred=False)
    reference.update_state(labels, scores)
    np.testing.assert_allclose(to_numpy(ours.result()), to_numpy(reference.result()), rtol=1e-6)


def test_mean_iou_by_hand_and_reset():
    labels = np.array([[[0, 0, 1, 255]]])
    scores = np.eye(3, dtype="float32")[np.array([[[0, 1, 1, 2]]])]
    metric = MeanIoU(3)
    metric.update_state(labels, scores)
    # class 0: 1/2, class 1: 1/2, class 2 never occurs (255 pixel ignored).
    np.testing.assert_allclose(to_numpy(metric.per_class_iou()), [0.5, 0.5, 0.0])
    np.testing.assert_allclose(to_numpy(metric.result()), 0.5)
    metric.reset_state()
    assert float(to_numpy(metric.result())) == 0.0
    restored = MeanIoU.from_config(metric.get_config())
    assert restored.num_classes == 3


def test_mean_iou_inside_a_compiled_step():
    """The metric must trace under tf.function / jax.jit (static shapes only)."""
    backend = keras.config.backend()
    metric = MeanIoU(3)
    labels = np.array([[[0, 0, 1, 255]]])
    scores = np.eye(3, dtype="float32")[np.array([[[0, 1, 1, 2]]])]
    if backend == "jax":
        import jax

        variables = [v.value for v in metric.variables]
        update = jax.jit(lambda vs, y, p: metric.stateless_update_state(vs, y, p))
        variables = update(variables, labels, scores)
        result = metric.stateless_result(variables)
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.function(metric.update_state)(labels, scores)
        result = metric.result()
    else:
        metric.update_state(labels, scores)
        result = metric.result()
    np.testing.assert_allclose(to_numpy(result), 0.5)
