"""`predict` over many batches, calling the stage engine eagerly.

Pruned inference reads the alive counts on the host between stages, which
Keras' compiled predict step (a JAX jit, a TensorFlow graph) cannot; so
`DToPSegmenter.predict` walks the batches itself, with Keras' callbacks and
progress bar, instead of switching Keras to eager execution per call.
"""

import keras
import numpy as np

from keras_dtop.flops import segmenter_flops, segmenter_tokens
from keras_dtop.models.inputs import image_batch_array, is_image_array, raw_image_batch
from keras_dtop.models.stage_compiler import inference_context


def input_batches(x, batch_size=32, steps=None):
    """Yield image batches (NumPy) from `x`.

    x: an array or tensor `(count, H, W, C)` (sliced into `batch_size`; an
    empty one gives one empty batch), a list of images, a
    `tf.data.Dataset`, a `keras.utils.PyDataset` or any iterable of batches;
    batches that are tuples `(images, labels, ...)` give their images.
    steps: stop after this many batches.
    """
    if is_image_array(x):
        x = image_batch_array(x)  # one batch array (dtype kept: checked per batch)
        batches = (x[i : i + batch_size] for i in range(0, max(len(x), 1), batch_size))
    elif hasattr(x, "element_spec"):
        batches = x.as_numpy_iterator()
    elif isinstance(x, keras.utils.PyDataset):
        batches = (x[i] for i in range(len(x)))
    elif hasattr(x, "__iter__") and not isinstance(x, (str, bytes)):
        batches = iter(x)
    else:
        raise TypeError(
            "predict takes images as an array (count, H, W, 3), a tf.data.Dataset, a "
            f"keras.utils.PyDataset or an iterable of batches; got {type(x).__name__}."
        )
    for step, batch in enumerate(batches):
        if steps is not None and step >= steps:
            return
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        yield keras.ops.convert_to_numpy(batch)


def count_batches(x, batch_size, steps):
    """Number of batches `input_batches` yields, or None when unknown."""
    if steps is not None:
        return steps
    if hasattr(x, "shape") and not hasattr(x, "element_spec"):
        return max(1, -(-int(x.shape[0]) // batch_size))
    if hasattr(x, "__len__"):
        try:
            return len(x)
        except TypeError:
            return None
    return None


def predict_batches(model, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
    """`model.predict`: per-pixel scores of every batch of `x`, concatenated (NumPy).

    Each batch goes through the preprocessor and the stage engine (`model(batch,
    training=False)`); callbacks get `on_predict_*` events as in Keras.
    """
    batch_size = batch_size or 32
    if is_image_array(x):
        x = image_batch_array(x, model.backbone.num_channels)
    if not isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks = keras.callbacks.CallbackList(
            callbacks,
            add_progbar=verbose != 0,
            verbose=1 if verbose == "auto" else verbose,
            epochs=1,
            steps=count_batches(x, batch_size, steps),
            model=model,
        )
    callbacks.on_predict_begin()
    outputs = []
    for step, batch in enumerate(input_batches(x, batch_size, steps)):
        callbacks.on_predict_batch_begin(step)
        scores = keras.ops.convert_to_numpy(model.predict_on_batch(batch))
        outputs.append(scores)
        callbacks.on_predict_batch_end(step, {"outputs": scores})
    callbacks.on_predict_end()
    if not outputs:
        raise ValueError("predict got no images: the input yielded no batch.")
    return np.concatenate(outputs, axis=0)


def predict_details(model, images, batch_size=8, sliding_window=None):
    """`model.predict_details`: the engine's details of every batch, as NumPy, with GFLOPs."""
    if sliding_window is not None:
        return predict_details_sliding(model, images, batch_size, sliding_window)
    chunks = []
    backbone = model.backbone
    for batch in input_batches(images, batch_size):
        batch = raw_image_batch(batch, backbone.patch_size, backbone.num_channels)
        if not len(batch):
            raise ValueError("predict_details got an empty batch of images (0, H, W, 3): nothing to detail.")
        with inference_context():
            if model.preprocessor is not None:
                batch = model.preprocessor(batch)
            outputs = model(batch, training=False, return_details=True)
            chunks.append(keras.tree.map_structure(keras.ops.convert_to_numpy, outputs))
    details = keras.tree.map_structure(lambda *parts: np.concatenate(parts, axis=0), *chunks)
    image_size = details["scores"].shape[1:3]
    # Without pruning the auxiliary heads only run here, for the details.
    for key, auxiliary in (("gflops", False), ("gflops_with_auxiliary_heads", model.prunes)):
        flops = segmenter_flops(model, details["alive_counts"], image_size, auxiliary)
        details[key] = flops / 1e9
    return details


def predict_details_sliding(model, images, batch_size, sliding_window):
    """Details of images of any size, predicted window by window (summed/averaged per image)."""
    from keras_dtop.evaluation import SlidingWindow, sliding_window_batch

    window = SlidingWindow.from_argument(sliding_window)
    if hasattr(images, "element_spec") or not hasattr(images, "__len__"):
        raise TypeError(
            "predict(sliding_window=...) takes an image array (count, H, W, 3), not a dataset; "
            "for a dataset use keras_dtop.evaluation.evaluate_segmentation."
        )
    images = raw_image_batch(images, num_channels=model.backbone.num_channels)
    per_image = sliding_window_batch(model, images, window, batch_size)
    out = {
        key: np.asarray([d[key] for d in per_image])
        for key in ("scores", "gflops", "gflops_with_auxiliary_heads", "dense_gflops")
    }
    out["num_windows"] = np.asarray([len(d["windows"]) for d in per_image])
    tokens = segmenter_tokens(model, window.crop_size)
    out["alive_fraction"] = np.asarray([d["alive_counts"].mean(axis=0) / tokens for d in per_image])
    return out
