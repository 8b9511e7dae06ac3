"""What every export format serves: raw images in; scores, labels and pruning facts out.

The exported graph is the model's own inference pass traced under TensorFlow
(the stage engine inside a graph): with `pruning_mode` "gathered" each stage
after the first runs on a dynamic number of alive tokens (the batch maximum,
at least one), so an easy image costs less in the exported model too;
"capacity" gives static shapes (fixed `stage_capacity`) for runtimes and
delegates that need them; "masked" keeps every token (reference, no saving).
"""

import contextlib
import dataclasses
import numbers

import keras
from keras import ops

INPUT_DTYPES = ("float32", "uint8")
OUTPUT_NAMES = ("scores", "labels", "alive_tokens", "exit_stage")


@dataclasses.dataclass(frozen=True)
class ServingSpec:
    """Input of the exported signature `images`: `(batch_size, *image_size, 3)` of `input_dtype`.

    batch_size None leaves the batch dynamic (SavedModel only).
    include_preprocessing: the graph applies the model's image converter
    (`(x - mean) / std`), so it takes raw RGB pixels in [0, 255] like `predict`.
    """

    image_size: tuple
    batch_size: int | None
    input_dtype: str
    include_preprocessing: bool

    @property
    def shape(self):
        return (self.batch_size, *self.image_size, 3)


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return int(value)


def serving_spec(
    model,
    image_size=None,
    batch_size=None,
    input_dtype="float32",
    include_preprocessing=None,
    static_batch=False,
):
    """Check the export's input settings against `model`; returns a `ServingSpec`.

    image_size: `(H, W)`, multiples of the patch size (None: the backbone's
    `image_size`); static_batch: the format needs a fixed batch (TFLite).
    """
    patch = model.backbone.patch_size
    if image_size is None:
        image_size = model.backbone.image_size
    if isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    try:
        image_size = tuple(image_size)
    except TypeError:
        raise ValueError(f"image_size must be (height, width), got {image_size!r}.") from None
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (height, width), got {image_size!r}.")
    image_size = tuple(_positive_int(s, "image_size entries") for s in image_size)
    if any(s % patch for s in image_size):
        raise ValueError(
            f"image_size {image_size} must be multiples of the patch size {patch} in both "
            "height and width."
        )
    if batch_size is None and static_batch:
        raise ValueError("TFLite export needs a fixed batch_size (an int >= 1), got None.")
    if batch_size is not None:
        batch_size = _positive_int(batch_size, "batch_size")
    try:
        dtype = keras.backend.standardize_dtype(input_dtype)
    except ValueError:
        dtype = str(input_dtype)
    if dtype not in INPUT_DTYPES:
        raise TypeError(f"input_dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}.")
    if include_preprocessing is None:
        include_preprocessing = model.preprocessor is not None
    if include_preprocessing and model.preprocessor is None:
        raise ValueError(
            "include_preprocessing=True needs a model with a preprocessor; this one has none "
            "(its inputs are already-normalised images)."
        )
    if dtype == "uint8" and not include_preprocessing:
        raise TypeError("uint8 inputs are raw pixels: they need include_preprocessing=True.")
    return ServingSpec(image_size, batch_size, dtype, bool(include_preprocessing))


def spec_from_input_signature(model, input_signature, include_preprocessing=None, static_batch=False):
    """`ServingSpec` from a Keras-style `input_signature` (one spec `(batch, H, W, 3)`)."""
    spec = input_signature
    if isinstance(spec, (list, tuple)) and len(spec) == 1 and hasattr(spec[0], "shape"):
        spec = spec[0]
    shape, dtype = getattr(spec, "shape", None), getattr(spec, "dtype", None)
    if shape is None:
        raise ValueError(
            "input_signature must be one spec of shape (batch, height, width, 3), e.g. "
            f"keras.InputSpec(shape=(1, 512, 512, 3)), got {input_signature!r}."
        )
    shape = tuple(None if s is None else int(s) for s in shape)
    if len(shape) != 4 or shape[3] != 3:
        raise ValueError(f"input_signature shape must be (batch, height, width, 3), got {shape}.")
    if shape[1] is None or shape[2] is None:
        raise ValueError(f"Export needs a fixed image size, got height/width None in {shape}.")
    dtype = "float32" if dtype is None else keras.backend.standardize_dtype(getattr(dtype, "name", dtype))
    return serving_spec(model, shape[1:3], shape[0], dtype, include_preprocessing, static_batch)


def resolve_spec(model, options, input_signature=None, static_batch=False):
    """Check an export's options against `model` before anything is traced.

    options: the exporters' keyword options (image_size, batch_size,
    input_dtype, include_preprocessing, pruning_mode, pruning_enabled,
    stage_capacity). Returns the `ServingSpec`; raises ValueError / TypeError
    naming the problem.
    """
    if input_signature is not None:
        spec = spec_from_input_signature(
            model, input_signature, options["include_preprocessing"], static_batch
        )
    else:
        spec = serving_spec(
            model,
            options["image_size"],
            options["batch_size"],
            options["input_dtype"],
            options["include_preprocessing"],
            static_batch,
        )
    settings = (options["pruning_mode"], options["pruning_enabled"], options["stage_capacity"])
    with inference_settings(model, *settings):
        pass
    return spec


@contextlib.contextmanager
def inference_settings(model, pruning_mode=None, pruning_enabled=None, stage_capacity=None):
    """Temporarily override the model's execution settings (None keeps the model's)."""
    if pruning_mode not in (None, "gathered", "capacity", "masked"):
        raise ValueError(
            f"Export pruning_mode must be 'gathered', 'capacity' or 'masked', got {pruning_mode!r}."
        )
    saved = (model.pruning_mode, model.pruning_enabled, model.stage_capacity)
    try:
        if stage_capacity is not None:
            model.stage_capacity = stage_capacity
        if pruning_mode is not None:
            model.pruning_mode = pruning_mode
        if pruning_enabled is not None:
            model.pruning_enabled = pruning_enabled
        if model.inference_mode() == "capacity":
            model.stage_token_capacities(1)  # raises a clear error without stage_capacity
        yield model
    finally:
        model.pruning_mode, model.pruning_enabled = saved[0], saved[1]
        model.stage_capacity = saved[2]


def serving_outputs(model, images, spec):
    """The exported signature's outputs for `images` of `spec`.

    Returns a dict: scores float32 `(batch, H, W, classes)`, labels int32
    `(batch, H, W)`, alive_tokens int32 `(batch, stages)` (tokens each stage
    ran on: what pruning saved), exit_stage int32 `(batch, h, w)` (0-based
    stage after which each token exited).
    """
    x = ops.cast(images, "float32")
    if spec.include_preprocessing:
        x = model.preprocessor.image_converter(x)
    # Details only when pruning: they would make a dense model run its auxiliary heads.
    outputs = model(x, training=False, return_details=model.prunes)
    scores = ops.cast(outputs["scores"] if model.prunes else outputs, "float32")
    patch = model.backbone.patch_size
    grid = (spec.image_size[0] // patch, spec.image_size[1] // patch)
    batch = ops.shape(scores)[0]
    if model.prunes:
        alive, exit_stage = outputs["alive_counts"], outputs["exit_stage"]
    else:
        stages = len(model.stage_ends)
        alive = ops.full((batch, stages), grid[0] * grid[1], dtype="int32")
        exit_stage = ops.full((batch, *grid), stages - 1, dtype="int32")
    import tensorflow as tf  # exports trace under TensorFlow only

    return {
        "scores": scores,
        # tf.argmax, not keras.ops.argmax: the latter's signed-zero handling
        # needs BitwiseAnd, which is no TFLite builtin.
        "labels": tf.math.argmax(scores, axis=-1, output_type=tf.int32),
        "alive_tokens": ops.cast(alive, "int32"),
        "exit_stage": ops.cast(exit_stage, "int32"),
    }
