"""TF SavedModel export with a `serving_default` signature that prunes inside the graph."""

import os

import keras

from keras_dtop.export.serving import inference_settings, serving_outputs
from keras_dtop.export.tensorflow_process import run_export


def export_saved_model(
    model,
    path,
    image_size=None,
    batch_size=None,
    input_dtype="float32",
    include_preprocessing=None,
    pruning_mode=None,
    pruning_enabled=None,
    stage_capacity=None,
    input_signature=None,
):
    """Write `model` (a `DToPSegmenter` or its `.keras` file) as a TF SavedModel.

    The `serving_default` signature takes `images` `(batch_size, H, W, 3)`
    (raw RGB pixels when `include_preprocessing`, the default for a model with
    a preprocessor) and returns `scores`, `labels`, `alive_tokens` and
    `exit_stage` (see `keras_dtop.export.serving.serving_outputs`).
    batch_size None keeps the batch dynamic. pruning_mode / pruning_enabled /
    stage_capacity override the model's settings for the export ("gathered":
    dynamic token counts; "capacity": static shapes). Under JAX or PyTorch the
    model is rebuilt under TensorFlow in a subprocess. Returns the path.
    """
    options = dict(
        image_size=image_size,
        batch_size=batch_size,
        input_dtype=input_dtype,
        include_preprocessing=include_preprocessing,
        pruning_mode=pruning_mode,
        pruning_enabled=pruning_enabled,
        stage_capacity=stage_capacity,
    )
    return run_export(
        "saved_model",
        model,
        path,
        options,
        input_signature,
        lambda model, spec: write_saved_model(model, path, spec, options),
    )


def write_saved_model(model, path, spec, options):
    """Trace the serving function for `spec` (TensorFlow backend) and write it to `path`."""
    import tensorflow as tf

    with inference_settings(
        model, options["pruning_mode"], options["pruning_enabled"], options["stage_capacity"]
    ):
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            "serving_default",
            lambda images: serving_outputs(model, images, spec),
            input_signature=[tf.TensorSpec(spec.shape, spec.input_dtype, name="images")],
        )
        archive.write_out(os.fspath(path), verbose=False)
