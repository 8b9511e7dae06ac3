"""DToPSegmenter: staged ViT segmentation with dynamic token pruning."""

import inspect
import itertools
import numbers

import keras
import numpy as np
from keras import ops
from keras_hub.models import ImageSegmenter

from keras_dtop.data.labels import check_labels, check_labels_in_dataset
from keras_dtop.flops import segmenter_flops, segmenter_tokens
from keras_dtop.layers.grading_head import GradingHead
from keras_dtop.losses import IGNORE_INDEX, DToPLoss
from keras_dtop.metrics import MeanIoU
from keras_dtop.layers.pruning import TokenPruner
from keras_dtop.models.backbone import DToPBackbone, check_stage_ends
from keras_dtop.models.preprocessor import (
    DToPImageConverter,
    DToPImageSegmenterPreprocessor,
)
from keras_dtop.models.predict_loop import input_batches, predict_batches
from keras_dtop.models.stage_runner import ExecutionPolicy, StageRunner
from keras_dtop.optimizers import DToPAdamW

PRUNING_MODES = ("auto", "gathered", "masked", "capacity")


def check_stage_capacity(value, num_pruning_heads):
    """None, or one int >= 1 / float in (0, 1] per pruning head."""
    if value is None:
        return None
    if isinstance(value, (numbers.Real,)) and not isinstance(value, bool):
        value = [value] * num_pruning_heads
    value = list(value)
    if len(value) != num_pruning_heads:
        raise ValueError(
            f"stage_capacity needs one entry per pruning head ({num_pruning_heads}), got {value}."
        )
    checked = []
    for c in value:
        if isinstance(c, bool) or not isinstance(c, numbers.Real):
            raise TypeError(f"stage_capacity entries must be ints or floats, got {c!r}.")
        if isinstance(c, numbers.Integral):
            if c < 1:
                raise ValueError(f"stage_capacity ints must be >= 1 token, got {c}.")
            checked.append(int(c))
        elif not 0.0 < c <= 1.0:
            raise ValueError(f"stage_capacity floats are fractions in (0, 1], got {c}.")
        else:
            checked.append(float(c))
    return tuple(checked)


def _pop_backbone_kwargs(kwargs, extra=()):
    """Remove and return the entries of `kwargs` that are `DToPBackbone` arguments (or in `extra`)."""
    names = set(inspect.signature(DToPBackbone.__init__).parameters) - {"self", "kwargs"}
    names |= set(extra)
    return {key: kwargs.pop(key) for key in list(kwargs) if key in names}


def _shuffled_batches(images, labels, batch_size):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((np.asarray(images), np.asarray(labels)))
    return ds.shuffle(len(images), reshuffle_each_iteration=True).batch(batch_size)


@keras.saving.register_keras_serializable(package="keras_dtop")
class DToPSegmenter(ImageSegmenter):
    """Semantic segmentation with Dynamic Token Pruning (Tang et al., ICCV 2023).

    The backbone's layers are cut into stages at `stage_ends`; a `GradingHead`
    follows every stage. After each stage but the last, tokens whose best class
    score exceeds `prune_threshold` (p0) exit (the `keep_top_k` most confident
    of every predicted class stay as context): later layers and heads no longer
    see them and their mask logits freeze on a canvas. The output stitches
    every token's prediction from the stage where it exited, scaled by the
    final head's class presence. A backbone's prefix tokens (class token,
    registers) run through every block and every token attends to them, but
    they are never graded or pruned: per-token outputs cover patch tokens only.

    The stages run in a `StageRunner` (`keras_dtop.models.stage_runner`, the
    `engine` attribute): training runs the masked reference (static shapes,
    exited tokens excluded from attention and zeroed); inference by default
    runs each stage on its alive tokens only (`pruning_mode`), with the same
    outputs. Settings are read at every call: a change to p0, k, the mode or
    the capacities takes effect on the next call, compiled steps included.

    Unlike keras-hub's functional tasks this one is subclassed: the stages
    interleave backbone blocks with heads and exit decisions, the pruning
    settings are Python values that select compiled programs, and the optional details
    are a nested dict. The backbone stays a functional keras-hub `Backbone`
    (its dense pass) whose layers this task runs stage by stage.

    `model(images)` expects normalised images `(batch, H, W, 3)` (H, W
    multiples of the patch size) and returns per-pixel class scores
    `(batch, H, W, num_classes)`; `predict` applies the preprocessor first.
    `model(images, return_details=True)` / `predict_details(images)` also give
    the exit stage of every token, alive counts and every head's outputs.

    Args:
        backbone: a `DToPBackbone`.
        num_classes: number of classes C (>= 1).
        stage_ends: 0-based last layer of each stage; defaults to the backbone's.
        prune_threshold: p0 in (0, 1]; 1.0 disables pruning.
        keep_top_k: k >= 0 context tokens kept per predicted class and stage.
        head_hidden_dim, head_num_heads, head_num_layers, head_mlp_ratio,
            head_dropout, head_layer_norm_epsilon: grading head settings, the
            same for every stage.
        pruning_enabled: False runs densely whatever p0 is.
        pruning_mode: how inference executes (training always runs masked):
            "auto"/"gathered" runs each stage on its alive tokens only, with
            capacities read from the alive counts between stages; "masked" is
            the static-shape reference (no saving); "capacity" uses the fixed
            `stage_capacity` (one static program, for jit and export).
        stage_capacity: for "capacity": tokens each stage after the first may
            hold, one entry per pruning head (an int, or a float in (0, 1] as
            a fraction of the tokens). Extra alive tokens are forced to exit
            (counted in the details' `forced_exits`; eager calls warn).
        token_bucket: "gathered" capacities are rounded up to a multiple of
            it, so that a jit compiles few programs. None: 1 on TensorFlow and
            PyTorch (dynamic shapes), tokens/16 on JAX.
        preprocessor: a `DToPImageSegmenterPreprocessor` or None.
        compile: compile with keras-hub's `ImageSegmenter` defaults. Off by
            default: those defaults (cross-entropy on the score map) are not
            the DToP loss.
    """

    backbone_cls = DToPBackbone
    preprocessor_cls = DToPImageSegmenterPreprocessor

    def __init__(
        self,
        backbone,
        num_classes,
        stage_ends=None,
        prune_threshold=0.9,
        keep_top_k=5,
        head_hidden_dim=384,
        head_num_heads=6,
        head_num_layers=3,
        head_mlp_ratio=4,
        head_dropout=0.1,
        head_layer_norm_epsilon=1e-5,
        pruning_enabled=True,
        pruning_mode="auto",
        stage_capacity=None,
        token_bucket=None,
        preprocessor=None,
        compile=False,
        **kwargs,
    ):
        if not isinstance(backbone, DToPBackbone):
            raise TypeError(f"backbone must be a DToPBackbone, got {type(backbone).__name__}.")
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
            raise TypeError(f"num_classes must be an int >= 1, got {num_classes!r}.")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        stage_ends = check_stage_ends(
            backbone.stage_ends if stage_ends is None else stage_ends, backbone.num_layers
        )
        super().__init__(compile=False, **kwargs)

        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.grading_heads = [
            GradingHead(
                num_classes,
                head_hidden_dim,
                head_num_heads,
                head_num_layers,
                head_mlp_ratio,
                head_dropout,
                head_layer_norm_epsilon,
                dtype=backbone.dtype_policy,
                name=f"grading_head_{j}",
            )
            for j in range(len(stage_ends))
        ]
        for head in self.grading_heads:
            head.build((None, None, backbone.hidden_dim))
        self.pruner = TokenPruner(prune_threshold, keep_top_k, name="token_pruner")
        self.dtype_policy = backbone.dtype_policy

        # === Config ===
        self.num_classes = int(num_classes)
        self.stage_ends = stage_ends
        self.head_hidden_dim = int(head_hidden_dim)
        self.head_num_heads = int(head_num_heads)
        self.head_num_layers = int(head_num_layers)
        self.head_mlp_ratio = head_mlp_ratio
        self.head_dropout = float(head_dropout)
        self.head_layer_norm_epsilon = float(head_layer_norm_epsilon)
        self._pruning_enabled = bool(pruning_enabled)
        self._engine = StageRunner(self)  # a plain object: Keras does not track it
        self._function_settings = {}
        self.pruning_mode = pruning_mode
        self.stage_capacity = stage_capacity
        self.token_bucket = token_bucket
        self._loss_outputs = False  # True inside fit/evaluate: call returns what the loss needs
        self.dtop_loss = DToPLoss()
        self.built = True
        if compile:
            self.compile()

    # --- Pruning controls (take effect without rebuilding) ---

    @property
    def prune_threshold(self):
        """p0: tokens with best score strictly above it are exit candidates."""
        return self.pruner.prune_threshold

    @prune_threshold.setter
    def prune_threshold(self, value):
        self.pruner.prune_threshold = value  # validated by TokenPruner

    @property
    def keep_top_k(self):
        """k: most confident candidates kept alive per predicted class."""
        return self.pruner.keep_top_k

    @keep_top_k.setter
    def keep_top_k(self, value):
        self.pruner.keep_top_k = value  # validated by TokenPruner

    @property
    def pruning_enabled(self):
        """False runs the model densely whatever p0 is (p0 is kept)."""
        return self._pruning_enabled

    @pruning_enabled.setter
    def pruning_enabled(self, value):
        self._pruning_enabled = bool(value)

    @property
    def pruning_mode(self):
        """"auto" (= "gathered" at inference), "gathered", "masked" or "capacity"."""
        return self._pruning_mode

    @pruning_mode.setter
    def pruning_mode(self, value):
        if value not in PRUNING_MODES:
            raise ValueError(f"pruning_mode must be one of {PRUNING_MODES}, got {value!r}.")
        self._pruning_mode = value

    @property
    def stage_capacity(self):
        """Per pruning head: tokens (int) or fraction of tokens (float) the next stage holds."""
        return self._stage_capacity

    @stage_capacity.setter
    def stage_capacity(self, value):
        self._stage_capacity = check_stage_capacity(value, len(self.stage_ends) - 1)

    @property
    def token_bucket(self):
        """Rounding of "gathered" capacities (None: backend default)."""
        return self._token_bucket

    @token_bucket.setter
    def token_bucket(self, value):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1
        ):
            raise ValueError(f"token_bucket must be None or an int >= 1, got {value!r}.")
        self._token_bucket = None if value is None else int(value)

    @property
    def execution_policy(self):
        """How this device runs pruned stages (`keras_dtop.models.ExecutionPolicy`).

        Defaults to the backend's (`ExecutionPolicy.for_backend()`); set it to
        fix a choice (e.g. `per_image_attention=False`) instead of measuring.
        """
        return self._engine.policy

    @execution_policy.setter
    def execution_policy(self, policy):
        if not isinstance(policy, ExecutionPolicy):
            raise TypeError(f"execution_policy must be an ExecutionPolicy, got {policy!r}.")
        self._engine.policy = policy

    @property
    def engine(self):
        """The `StageRunner` that runs this model's stages."""
        return self._engine

    def stage_token_capacities(self, num_tokens):
        """Capacity mode: slots of every stage after the first, as ints in [1, tokens]."""
        return self._engine.stage_token_capacities(num_tokens)

    def inference_mode(self, training=False):
        """The execution a call with this `training` flag uses: "masked", "gathered" or "capacity"."""
        return self._engine.plan(training=training).mode

    @property
    def prunes(self):
        """Whether the auxiliary heads make exit decisions."""
        return self._engine.plan().prunes

    # --- Forward ---

    def call(self, images, training=None, return_details=None):
        """Per-pixel scores, or (with `return_details`) a dict of every stage's outputs.

        images: normalised `(batch, H, W, 3)`. The dict holds:
            scores: `(batch, H, W, classes)` per-pixel class scores.
            token_scores: `(batch, classes, tokens)` final per-token scores.
            heads: one dict per stage with `presence_logits (batch, classes, 2)`,
                `mask_logits (batch, classes, tokens)` (0 where unseen),
                `canvas (batch, classes, tokens)`, `token_scores` and
                `alive (batch, tokens)`: the tokens that head saw.
            exit_stage: int32 `(batch, h, w)`, 0-based stage each token exited
                after (the last stage for tokens that never exited).
            alive_counts: int32 `(batch, stages)`, tokens each head saw.
            forced_exits: int32 `(batch, stages)`, tokens a capacity forced out.
        Training runs the masked reference; inference the `pruning_mode`
        (`keras_dtop.models.stage_runner`). Auxiliary heads are skipped when
        they can neither prune nor be trained nor reported.
        """
        if return_details is None:
            return_details = self._loss_outputs
        outputs = self._engine.forward(
            self._check_images(images), training=bool(training), details=return_details
        )
        return outputs if return_details else outputs["scores"]

    # --- Keras' compiled step functions follow the settings ---

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

    def _check_images(self, images):
        if not hasattr(images, "shape") or not hasattr(images, "dtype"):
            images = ops.convert_to_tensor(images)
        dtype = keras.backend.standardize_dtype(images.dtype)
        if dtype == "bool" or dtype.startswith("string") or dtype.startswith("complex"):
            raise TypeError(f"Images must be a real-valued numeric tensor, got dtype {dtype}.")
        return images

    def predict_details(self, images, batch_size=8, sliding_window=None):
        """Run the preprocessor and the model on `images`, return NumPy details.

        images: `(count, H, W, 3)` raw RGB pixels (what `predict` takes). Returns
        the dict of `forward_stages` as NumPy arrays, batches concatenated, plus
        `gflops` `(count,)` (backbone + final head, the papers' count) and
        `gflops_with_auxiliary_heads` (what the pruned model really runs).

        sliding_window: a crop size (int or `(h, w)`), `((h, w), (stride_h,
        stride_w))` or a `keras_dtop.evaluation.SlidingWindow`: each image is predicted window
        by window (`sliding_window_details`), every window pruning on its own.
        Returns `scores` `(count, H, W, classes)`, `gflops`,
        `gflops_with_auxiliary_heads` and `dense_gflops` `(count,)` summed over
        windows, `num_windows` `(count,)` and `alive_fraction` `(count,
        stages)` averaged over windows.
        """
        if sliding_window is not None:
            return self._predict_sliding(images, batch_size, sliding_window)
        chunks = []
        for batch in input_batches(images, batch_size):
            if self.preprocessor is not None:
                batch = self.preprocessor(batch)
            outputs = self(batch, training=False, return_details=True)
            chunks.append(keras.tree.map_structure(ops.convert_to_numpy, outputs))
        details = keras.tree.map_structure(lambda *parts: np.concatenate(parts, axis=0), *chunks)
        image_size = details["scores"].shape[1:3]
        # Without pruning the auxiliary heads only run here, for the details.
        for key, auxiliary in (("gflops", False), ("gflops_with_auxiliary_heads", self.prunes)):
            flops = segmenter_flops(self, details["alive_counts"], image_size, auxiliary)
            details[key] = flops / 1e9
        return details

    def _predict_sliding(self, images, batch_size, sliding_window):
        from keras_dtop.evaluation import SlidingWindow, sliding_window_batch

        window = SlidingWindow.from_argument(sliding_window)
        if hasattr(images, "element_spec") or not hasattr(images, "__len__"):
            raise TypeError(
                "predict(sliding_window=...) takes an image array (count, H, W, 3), not a dataset; "
                "for a dataset use keras_dtop.evaluation.evaluate_segmentation."
            )
        images = self._check_images(np.asarray(images))
        if len(images.shape) != 4:
            raise ValueError(f"Expected images (count, height, width, 3), got shape {tuple(images.shape)}.")
        per_image = sliding_window_batch(self, ops.convert_to_numpy(images), window, batch_size)
        out = {
            key: np.asarray([d[key] for d in per_image])
            for key in ("scores", "gflops", "gflops_with_auxiliary_heads", "dense_gflops")
        }
        out["num_windows"] = np.asarray([len(d["windows"]) for d in per_image])
        tokens = segmenter_tokens(self, window.crop_size)
        out["alive_fraction"] = np.asarray([d["alive_counts"].mean(axis=0) / tokens for d in per_image])
        return out

    # --- Training: compile, the loss and the logged metrics ---

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
        """Total DToP loss: sum over heads of presence CE + 20·focal + dice."""
        total = ops.sum(ops.stack(self._stage_losses(y, y_pred)))
        if self.losses:
            total = total + ops.sum(self.losses)
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

    def predict(
        self, x=None, batch_size=None, verbose="auto", steps=None, callbacks=None, sliding_window=None
    ):
        """Per-pixel class scores `(count, H, W, classes)` (NumPy) for raw images.

        x: an array `(count, H, W, 3)`, a list of such images, a
        `tf.data.Dataset`, a `keras.utils.PyDataset` or an iterable of batches.
        Batches run through the preprocessor and the pruned execution
        (`pruning_mode`) one after the other (`keras_dtop.models.predict_loop`),
        with Keras' callbacks and progress bar.
        sliding_window: a crop size (int or `(h, w)`), `((h, w), (stride_h,
        stride_w))` or a `keras_dtop.evaluation.SlidingWindow`: images of any size (an array
        `(count, H, W, 3)`) are predicted window by window, each window
        pruning on its own; overlaps are averaged.
        """
        if sliding_window is not None:
            return self.predict_details(x, batch_size or 8, sliding_window)["scores"]
        return predict_batches(self, x, batch_size, verbose, steps, callbacks)

    def predict_on_batch(self, x):
        """Scores `(batch, H, W, classes)` (NumPy) of one batch of raw images."""
        if self.preprocessor is not None:
            x = self.preprocessor(x)
        return ops.convert_to_numpy(self(x, training=False, return_details=False))

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

    # --- Export ---

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """Keras' `Model.export`, routed to `keras_dtop.export` for SavedModel and LiteRT.

        format "tf_saved_model" -> `export_saved_model`, "litert" (or
        "tflite") -> `export_tflite`, with the pruning kept in the graph and
        `scores`, `labels`, `alive_tokens`, `exit_stage` outputs; kwargs are
        those functions' options (image_size, batch_size, quantization, ...).
        input_signature: one spec `(batch, H, W, 3)`. Works from every backend
        (rebuilt under TensorFlow in a subprocess). Other formats go to Keras.
        """
        from keras_dtop import export as dtop_export

        if format == "tf_saved_model":
            path = dtop_export.export_saved_model(
                self, filepath, input_signature=input_signature, **kwargs
            )
        elif format in ("litert", "tflite"):
            path = dtop_export.export_tflite(self, filepath, input_signature=input_signature, **kwargs)
        else:
            return super().export(
                filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs
            )
        if verbose:
            print(f"Saved {format} artifact at {path}")
        return path

    # --- Serialisation and presets ---

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            stage_ends=self.stage_ends,
            prune_threshold=self.prune_threshold,
            keep_top_k=self.keep_top_k,
            head_hidden_dim=self.head_hidden_dim,
            head_num_heads=self.head_num_heads,
            head_num_layers=self.head_num_layers,
            head_mlp_ratio=self.head_mlp_ratio,
            head_dropout=self.head_dropout,
            head_layer_norm_epsilon=self.head_layer_norm_epsilon,
            pruning_enabled=self.pruning_enabled,
            pruning_mode=self.pruning_mode,
            stage_capacity=self.stage_capacity,
            token_bucket=self.token_bucket,
        )
        return config

    @classmethod
    def from_pretrained_backbone(
        cls, source, num_classes, image_size=None, stage_ends=None, mean=None, std=None, **kwargs
    ):
        """A segmenter on a pretrained ViT / DINOv2 backbone, to fine-tune.

        source: anything `DToPBackbone.from_pretrained` takes. The grading heads
        are freshly initialised; `stage_ends` default to the rule for the
        backbone's depth. mean/std (0-255 scale) default to the checkpoint's
        own normalisation where it states one (`pretrained_mean_std`), else
        ImageNet's. Keyword arguments that are `DToPBackbone.from_pretrained`
        options or backbone settings (`keep_prefix_tokens`, `num_heads`,
        `drop_path_rate`, `trusted`, ...) go to the backbone, the rest to the
        segmenter.
        """
        from keras_dtop.convert.pretrained import pretrained_mean_std

        backbone_kwargs = _pop_backbone_kwargs(kwargs, extra=("keep_prefix_tokens", "trusted"))
        backbone = DToPBackbone.from_pretrained(
            source, image_size=image_size, stage_ends=stage_ends, **backbone_kwargs
        )
        default_mean, default_std = pretrained_mean_std(source)
        converter = DToPImageConverter.from_mean_std(
            default_mean if mean is None else mean, default_std if std is None else std
        )
        preprocessor = DToPImageSegmenterPreprocessor(image_converter=converter)
        return cls(backbone=backbone, num_classes=num_classes, preprocessor=preprocessor, **kwargs)

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Build a named architecture (`keras_dtop.presets`), randomly initialised.

        Keyword arguments override the preset: `DToPBackbone` arguments
        (`image_size`, `stage_ends`, `drop_path_rate`, ...) go to the backbone,
        the rest (`num_classes`, `prune_threshold`, ...) to the segmenter.
        Names that are not keras-dtop presets go to keras-hub's loader.
        """
        from keras_dtop.models import presets

        if preset not in presets.PRESETS:
            return super().from_preset(preset, load_weights=load_weights, **kwargs)
        spec = presets.PRESETS[preset]
        backbone_config = dict(spec["backbone"])
        backbone_config.update(_pop_backbone_kwargs(kwargs))
        segmenter_config = dict(spec["segmenter"])
        segmenter_config.update(kwargs)
        backbone = DToPBackbone(**backbone_config)
        converter = DToPImageConverter.from_mean_std(**spec["preprocessor"])
        preprocessor = DToPImageSegmenterPreprocessor(image_converter=converter)
        return cls(backbone=backbone, preprocessor=preprocessor, **segmenter_config)
