"""DToPSegmenter: staged ViT segmentation with dynamic token pruning."""

import numbers

import keras
import numpy as np
from keras import ops
from keras_hub.models import ImageSegmenter

from keras_dtop.layers.grading_head import GradingHead
from keras_dtop.layers.pruning import TokenPruner, check_threshold
from keras_dtop.losses import DToPLoss
from keras_dtop.models import presets
from keras_dtop.models.backbone import DToPBackbone, check_stage_ends
from keras_dtop.models.class_labels import check_class_names, check_palette
from keras_dtop.models.predict_loop import predict_batches, predict_details
from keras_dtop.models.preprocessor import DToPImageSegmenterPreprocessor
from keras_dtop.models.inputs import check_images, raw_image_batch
from keras_dtop.models.settings import PruningSettings
from keras_dtop.models.stage_compiler import inference_context
from keras_dtop.models.stage_runner import StageRunner, check_thresholds_per_head
from keras_dtop.models.training import DToPTraining


@keras.saving.register_keras_serializable(package="keras_dtop")
class DToPSegmenter(PruningSettings, DToPTraining, ImageSegmenter):
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
        prune_threshold: p0 in (0, 1]; 1.0 disables pruning. Or a sequence with
            one p0 per pruning head (`len(stage_ends) - 1`), e.g. stricter
            early heads: `(0.98, 0.95)`.
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
        class_names: optional names of the classes (reports, legends, CLI).
        palette: optional `(num_classes, 3)` RGB colours of the classes
            (pictures and label PNGs); default `visualization.class_palette`.
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
        class_names=None,
        palette=None,
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
        class_names = check_class_names(class_names, int(num_classes))
        palette = check_palette(palette, int(num_classes))
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
        self.pruner = TokenPruner(
            check_thresholds_per_head(check_threshold(prune_threshold), len(stage_ends) - 1),
            keep_top_k,
            name="token_pruner",
        )
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
        # Tuples: Keras would wrap lists as tracked containers.
        self.class_names = None if class_names is None else tuple(class_names)
        self.palette = None if palette is None else tuple(tuple(c) for c in palette)
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
        backbone = self.backbone
        images = check_images(images, backbone.patch_size, backbone.num_channels)
        outputs = self._engine.forward(images, training=bool(training), details=return_details)
        return outputs if return_details else outputs["scores"]

    def predict_details(self, images, batch_size=8, sliding_window=None):
        """Run the preprocessor and the model on `images`, return NumPy details.

        images: `(count, H, W, 3)` raw RGB pixels (what `predict` takes). Returns
        the details dict of `call` as NumPy arrays, batches concatenated, plus
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
        return predict_details(self, images, batch_size, sliding_window)

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
        """Scores `(batch, H, W, classes)` (NumPy) of one batch of raw images.

        x: what `keras_dtop.models.inputs.raw_image_batch` accepts (a batch,
        one image, grayscale, uint8 or float); an empty batch gives empty scores.
        """
        x = raw_image_batch(x, self.backbone.patch_size, self.backbone.num_channels)
        if not len(x):
            return np.zeros((0, *x.shape[1:3], self.num_classes), "float32")
        with inference_context():
            if self.preprocessor is not None:
                x = self.preprocessor(x)
            return ops.convert_to_numpy(self(x, training=False, return_details=False))

    # --- Export ---

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """Keras' `Model.export`, routed to `keras_dtop.export` for SavedModel, LiteRT and ONNX.

        format "tf_saved_model" -> `export_saved_model`, "litert" (or
        "tflite") -> `export_tflite`, "onnx" -> `export_onnx`, with the pruning kept in the graph and
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
        elif format == "onnx":
            path = dtop_export.export_onnx(self, filepath, input_signature=input_signature, **kwargs)
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
            class_names=None if self.class_names is None else list(self.class_names),
            palette=None if self.palette is None else [list(c) for c in self.palette],
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
        return presets.segmenter_from_pretrained_backbone(
            cls, source, num_classes, image_size, stage_ends, mean, std, **kwargs
        )

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Build a named architecture (`keras_dtop.presets`), randomly initialised.

        No trained weights exist for these presets: `load_weights=True` (the
        keras-hub default) warns that the model is random, `load_weights=False`
        builds it quietly. Keyword arguments override the preset:
        `DToPBackbone` arguments (`image_size`, `stage_ends`, `drop_path_rate`,
        ...) go to the backbone, the rest (`num_classes`, `prune_threshold`,
        ...) to the segmenter. Names that are not keras-dtop presets (a saved
        preset directory, a hub handle) go to keras-hub's loader.
        """
        if preset not in presets.PRESETS:
            return super().from_preset(preset, load_weights=load_weights, **kwargs)
        return presets.segmenter_from_preset(cls, preset, load_weights=load_weights, **kwargs)
