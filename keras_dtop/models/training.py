"""Training and evaluation of a `DToPSegmenter`: compile, the loss, the logged metrics.

The training step is Keras' own (`fit`, `evaluate`, `train_on_batch`): the
model's `call` returns every head's outputs while they run
(`_with_loss_outputs`), `compute_loss` sums the DToP loss of every head and
`compute_metrics` logs per-stage losses, alive fractions and GFLOPs. Keras'
step functions are rebuilt when the pruning settings they were traced with
changed (`make_*_function`), so p0, k or the mode set anywhere take effect.
"""

import itertools

import keras
import numpy as np
from keras import ops

from keras_dtop.data.labels import check_labels, check_labels_in_dataset
from keras_dtop.distribute.replicas import replica_count
from keras_dtop.flops import segmenter_flops
from keras_dtop.losses import IGNORE_INDEX, DToPLoss
from keras_dtop.metrics import MeanIoU
from keras_dtop.optimizers import DToPAdamW


def _shuffled_batches(images, labels, batch_size):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((np.asarray(images), np.asarray(labels)))
    return ds.shuffle(len(images), reshuffle_each_iteration=True).batch(batch_size)


class DToPTraining:
    """The training half of `DToPSegmenter` (a mixin before keras-hub's task)."""

    def _settings_changed(self, kind):
        # p0, k, mode and capacities are read when Keras traces a step
        # function: rebuild it when they differ from that trace's.
        settings = self._engine.plan(training=kind == "train")
        changed = self._function_settings.get(kind) != settings
        self._function_settings[kind] = settings
        return changed

    def make_train_function(self, force=False):
        return super().make_train_function(force=self._settings_changed("train") or force)

    def make_test_function(self, force=False):
        return super().make_test_function(force=self._settings_changed("test") or force)

    def make_predict_function(self, force=False):
        return super().make_predict_function(force=self._settings_changed("predict") or force)

    def compile(self, optimizer="auto", loss="auto", metrics="auto", **kwargs):
        """Compile with the DToP loss and optimiser by default.

        optimizer: "auto" is `DToPAdamW` (AdamW lr 2e-5, wd 0.01, heads x10,
            constant rate); `keras_dtop.optimizers.dtop_optimizer(total_steps)`
            adds the warm-up + poly schedule. Any Keras optimizer works.
        loss: "auto"/None is `DToPLoss()`; pass a `DToPLoss` to change its options.
        metrics: "auto" is mean IoU (`miou`, 255 ignored). Per-stage losses
            (`loss_stage_j`), the fraction of tokens alive after each
            pruning stage (`alive_stage_j`), GFLOPs per image (`gflops`,
            backbone + final head, `keras_dtop.flops`) and the FLOP saving
            against the same model run densely (`flops_saving`) are always logged.
        """
        if optimizer == "auto":
            optimizer = DToPAdamW()
        if loss in ("auto", None):
            loss = DToPLoss()
        if not isinstance(loss, DToPLoss):
            raise TypeError(f"loss must be a keras_dtop.losses.DToPLoss, got {loss!r}.")
        if metrics == "auto":
            metrics = [MeanIoU(self.num_classes, ignore_index=IGNORE_INDEX, name="miou")]
        self.dtop_loss = loss
        stages = len(self.stage_ends)
        self.stage_loss_trackers = [
            keras.metrics.Mean(name=f"loss_stage_{j + 1}") for j in range(stages)
        ]
        self.alive_trackers = [
            keras.metrics.Mean(name=f"alive_stage_{j + 1}") for j in range(stages - 1)
        ]
        self.gflops_tracker = keras.metrics.Mean(name="gflops")
        self.flops_saving_tracker = keras.metrics.Mean(name="flops_saving")
        keras.Model.compile(self, optimizer=optimizer, loss=None, metrics=metrics, **kwargs)
        # Create the optimizer's slots now rather than inside the first traced
        # step (TF traces that step twice when it creates variables).
        self.optimizer.build(self.trainable_variables)

    def _stage_losses(self, y, y_pred):
        grid = tuple(s // self.backbone.patch_size for s in ops.shape(y)[1:3])
        return self.dtop_loss.stage_losses(y_pred["heads"], y, grid)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Total DToP loss: sum over heads of presence CE + 20·focal + dice.

        Under data parallelism this is the replica's share of the global
        batch's loss (`keras_dtop.distribute.replicas`): the shares sum to it.
        """
        total = ops.sum(ops.stack(self._stage_losses(y, y_pred)))
        if self.losses:  # the same on every replica: each adds its share
            total = total + ops.sum(self.losses) / float(replica_count())
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        for tracker, value in zip(self.stage_loss_trackers, self._stage_losses(y, y_pred)):
            tracker.update_state(ops.stop_gradient(value))
        counts = ops.cast(y_pred["alive_counts"], "float32")
        grid = ops.shape(y_pred["exit_stage"])
        tokens = ops.cast(grid[1] * grid[2], "float32")
        for j, tracker in enumerate(self.alive_trackers):
            tracker.update_state(counts[:, j + 1] / tokens)
        image_size = tuple(ops.shape(y_pred["scores"])[1:3])
        flops = segmenter_flops(self, counts, image_size)
        dense = segmenter_flops(self, [[grid[1] * grid[2]] * len(self.stage_ends)], image_size)[0]
        self.gflops_tracker.update_state(flops / 1e9)
        self.flops_saving_tracker.update_state(1.0 - flops / float(dense))
        return super().compute_metrics(x, y, y_pred["scores"], sample_weight)

    def _with_loss_outputs(self, method, *args, loss_outputs=True, **kwargs):
        # While True, `call` returns the heads' outputs the loss needs; the
        # flag is read when fit/evaluate trace their step functions.
        previous, self._loss_outputs = self._loss_outputs, loss_outputs
        try:
            return method(*args, **kwargs)
        finally:
            self._loss_outputs = previous

    def fit(self, x=None, y=None, validation_data=None, **kwargs):
        """`keras.Model.fit` on images `(batch, H, W, 3)` and int labels `(batch, H, W)`.

        Labels are checked before the first step (values in `[0, num_classes)`
        or 255, integer dtype, shape matching the images). Pruning is active
        during training when `prune_threshold < 1` (the method's fine-tune).
        """
        self._check_training_data(x, y, kwargs.get("sample_weight"))
        if isinstance(validation_data, tuple):
            self._check_training_data(*validation_data[:2])
        elif validation_data is not None:
            self._check_training_data(validation_data, None)
        if hasattr(x, "element_spec"):
            kwargs.setdefault("shuffle", False)  # a tf.data pipeline shuffles itself; Keras would warn
        if y is not None and kwargs.get("shuffle", True) and not kwargs.get("validation_split"):
            # keras-hub batches arrays in order; shuffle them each epoch as
            # `keras.Model.fit(shuffle=True)` promises.
            x, y = _shuffled_batches(x, y, kwargs.pop("batch_size", None) or 32), None
            kwargs["shuffle"] = False  # done above; Keras would warn it cannot shuffle a dataset
        return self._with_loss_outputs(
            super().fit, x=x, y=y, validation_data=validation_data, **kwargs
        )

    def evaluate(self, x=None, y=None, sliding_window=None, **kwargs):
        """`keras.Model.evaluate`, or the sliding-window protocol when asked.

        sliding_window: a crop size (int or `(h, w)`), `((h, w), (stride_h,
        stride_w))` or a `keras_dtop.evaluation.SlidingWindow`: every image of `x` (a dataset
        of `(images, labels)`, or arrays `x`, `y`) is predicted window by
        window with per-window pruning, and a dict of metrics comes back
        (`miou`, `pixel_accuracy`, `gflops` summed over windows,
        `flops_saving`, `alive_stage_j`); no loss. For the full report use
        `keras_dtop.evaluation.evaluate_segmentation`.
        """
        if sliding_window is not None:
            from keras_dtop.evaluation import evaluate_segmentation

            if y is None and hasattr(x, "shape"):
                raise ValueError("evaluate(x, sliding_window=...) with an image array needs labels y.")
            data = x if y is None else (x, y)
            batch_size = kwargs.pop("batch_size", None) or 8
            steps = kwargs.pop("steps", None)
            for ignored in ("verbose", "return_dict", "callbacks"):
                kwargs.pop(ignored, None)  # the result is always a dict; no progress bar
            if kwargs:
                raise TypeError(f"evaluate(sliding_window=...) does not take {sorted(kwargs)}.")
            if steps is not None:
                if y is not None:
                    raise ValueError("steps applies to a dataset; with arrays, slice them instead.")
                data = itertools.islice(data, steps)
            return evaluate_segmentation(self, data, sliding_window, batch_size=batch_size).metrics()
        if not kwargs.get("_use_cached_eval_dataset", False):
            self._check_training_data(x, y, kwargs.get("sample_weight"))
        return self._with_loss_outputs(super().evaluate, x=x, y=y, **kwargs)

    def train_on_batch(self, x, y=None, **kwargs):
        self._check_training_data(x, y, kwargs.get("sample_weight"))
        return self._with_loss_outputs(super().train_on_batch, x, y, **kwargs)

    def test_on_batch(self, x, y=None, **kwargs):
        self._check_training_data(x, y, kwargs.get("sample_weight"))
        return self._with_loss_outputs(super().test_on_batch, x, y, **kwargs)

    def _check_training_data(self, x, y, sample_weight=None):
        if sample_weight is not None:
            raise ValueError("sample_weight is not supported by the DToP loss.")
        if y is None and x is not None and hasattr(x, "element_spec"):
            check_labels_in_dataset(x, self.num_classes)
        elif y is not None:
            check_labels(y, self.num_classes, getattr(x, "shape", None))

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)

    def get_compile_config(self):
        config = super().get_compile_config()
        if config is not None:
            config["loss"] = keras.saving.serialize_keras_object(self.dtop_loss)
        return config
