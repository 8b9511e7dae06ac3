"""What a segmenter accepts as images, checked at the public boundary.

Two entry points, so that bad input gets one clear `TypeError`/`ValueError`
naming the problem instead of a stack trace from inside a backend:

- `check_images`: tensors given to `model(images)` (normalised, already a
  batch `(batch, H, W, channels)`; may be symbolic inside a trace).
- `raw_image_batch`: what `predict`/`predict_details` take (raw pixels, on
  the host): arrays, lists of images, single images, grayscale, uint8 or
  float; returned as a float32 NumPy batch `(batch, H, W, channels)`.
"""

import keras
import numpy as np
from keras import ops

from keras_dtop.layers.patch_embedding import check_image_shape


def _check_dtype(dtype):
    dtype = keras.backend.standardize_dtype(dtype)
    if dtype == "bool" or dtype.startswith(("string", "complex", "object")) or dtype in ("str", "bytes"):
        raise TypeError(f"images must be real-valued numbers (uint8 pixels or floats), got dtype {dtype}.")
    return dtype


def is_image_array(x):
    """Whether `x` is images in memory (array, tensor or list of images), not a dataset."""
    if isinstance(x, (list, tuple)):
        return not x or hasattr(x[0], "shape") or isinstance(x[0], (list, tuple))
    return hasattr(x, "shape") and not hasattr(x, "element_spec")


def check_images(images, patch_size=None, num_channels=None):
    """A real-valued image tensor `(batch, H, W, channels)`, shape checked when sizes are given."""
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        array = np.asarray(images)
        _check_dtype(array.dtype.name if array.dtype.kind not in "OSU" else "object")
        images = ops.convert_to_tensor(array)
    _check_dtype(images.dtype)
    if patch_size is not None:
        check_image_shape(tuple(images.shape), patch_size, num_channels)
    return images


def image_batch_array(images, num_channels=3):
    """Images in memory -> a NumPy batch `(batch, H, W, channels)` in their own dtype.

    Stacks a list of same-sized images, adds the batch axis to one image
    `(H, W, channels)` or `(H, W)` and the channel axis to grayscale; refuses
    other ranks, strings and booleans with an error naming the shape or dtype.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty list: give at least one image, or an array (0, H, W, 3).")
        shapes = {np.shape(image) for image in images}
        if len(shapes) > 1:
            raise ValueError(
                f"images is a list of images of different shapes {sorted(shapes)}: resize them to "
                "one size, or predict them one by one (or with sliding_window=...)."
            )
        images = np.stack([np.asarray(image) for image in images])
        if images.ndim == 3:  # a list of grayscale (H, W) images
            images = images[..., None]
    array = images if isinstance(images, np.ndarray) else keras.ops.convert_to_numpy(images)
    if array.dtype.kind in "OSUV":
        raise TypeError(
            f"images must be real-valued numbers (uint8 pixels or floats), got a {array.dtype} array."
        )
    _check_dtype(array.dtype.name)
    if array.ndim == 2:  # one grayscale image
        return array[None, :, :, None]
    if array.ndim == 3:
        if array.shape[-1] not in (1, num_channels):
            raise ValueError(
                f"images of shape {array.shape} are ambiguous: a single image is (H, W, "
                f"{num_channels}) or (H, W, 1), a batch is (batch, H, W, {num_channels})."
            )
        return array[None]
    if array.ndim != 4:
        raise ValueError(
            f"images must be a batch (batch, H, W, {num_channels}), one image (H, W, "
            f"{num_channels}) or a grayscale image (H, W); got shape {array.shape}."
        )
    return array


def raw_image_batch(images, patch_size=None, num_channels=3):
    """Raw images as `predict` takes them -> float32 NumPy `(batch, H, W, channels)`.

    Accepted: a batch `(batch, H, W, channels)`; one image `(H, W, channels)`
    or grayscale `(H, W)`; a list of same-sized images; channels 1
    (grayscale, repeated) when the model takes 3; uint8 or any real dtype.
    Refused with a `ValueError`/`TypeError` naming the value: other ranks and
    channel counts, sizes that are not multiples of `patch_size` (None: any
    size, for sliding windows), NaN or Inf pixels, strings and booleans,
    lists of images of different sizes. An empty batch `(0, H, W, channels)`
    is valid and passes through.
    """
    array = image_batch_array(images, num_channels)
    if array.shape[-1] == 1 and num_channels != 1:
        array = np.repeat(array, num_channels, axis=-1)
    if patch_size is not None:
        check_image_shape(array.shape, patch_size, num_channels)
    elif array.shape[-1] != num_channels:
        raise ValueError(f"Expected {num_channels} image channels (channels last), got shape {array.shape}.")
    array = array.astype("float32", copy=False)
    finite = np.isfinite(array)
    if not finite.all():
        raise ValueError(
            f"images hold {int(finite.size - finite.sum())} NaN or Inf pixel values (of "
            f"{finite.size}); the model would return NaN scores for them. Replace them "
            "(e.g. np.nan_to_num) before predicting."
        )
    return array
