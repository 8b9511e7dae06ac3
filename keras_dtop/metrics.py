"""Mean IoU over a confusion matrix built with `segment_sum`.

`keras.metrics.MeanIoU` builds its confusion matrix with `ops.scatter`, which
the PyTorch backend runs as a Python loop over pixels (seconds per batch);
`segment_sum` with a static number of bins is one kernel on every backend and
compiles under `jax.jit` (`bincount` does not).
"""

import keras
from keras import ops

from keras_dtop.data.labels import IGNORE_INDEX


@keras.saving.register_keras_serializable(package="keras_dtop")
class MeanIoU(keras.metrics.Metric):
    """Mean intersection-over-union of label maps, ignoring `ignore_index` pixels.

    update_state(y_true, y_pred): `y_true` int `(batch, H, W)`, `y_pred`
    class scores `(batch, H, W, classes)` (argmax is taken). Classes absent
    from both truth and prediction are left out of the mean.
    """

    def __init__(self, num_classes, ignore_index=IGNORE_INDEX, name="miou", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.confusion = self.add_variable(
            shape=(self.num_classes, self.num_classes),
            initializer="zeros",
            dtype="float32",
            name="confusion",
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        y_pred = ops.reshape(ops.argmax(y_pred, axis=-1), (-1,))
        valid = (y_true != self.ignore_index) & (y_true >= 0) & (y_true < self.num_classes)
        index = ops.where(valid, y_true * self.num_classes + ops.cast(y_pred, "int32"), 0)
        counts = ops.segment_sum(
            ops.cast(valid, "float32"), index, num_segments=self.num_classes**2, sorted=False
        )
        counts = ops.reshape(counts, (self.num_classes, self.num_classes))
        self.confusion.assign_add(ops.cast(counts, "float32"))

    def _intersection_union(self):
        confusion = ops.convert_to_tensor(self.confusion)
        diagonal = ops.diagonal(confusion)
        return diagonal, ops.sum(confusion, axis=0) + ops.sum(confusion, axis=1) - diagonal

    def per_class_iou(self):
        """IoU of every class `(classes,)`; 0 where a class never occurs."""
        intersection, union = self._intersection_union()
        return ops.where(union > 0, intersection / ops.maximum(union, 1.0), 0.0)

    def result(self):
        _, union = self._intersection_union()
        present = ops.cast(union > 0, "float32")
        return ops.sum(self.per_class_iou() * present) / ops.maximum(ops.sum(present), 1.0)

    def reset_state(self):
        self.confusion.assign(ops.zeros(self.confusion.shape, "float32"))

    def get_config(self):
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "name": self.name,
            "dtype": self.dtype,
        }
