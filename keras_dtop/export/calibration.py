"""Calibration images for full-integer quantization: what the converter sees to pick int8 ranges.

Give images like those the model will serve (its validation set): the int8
ranges of every activation are read off them, so unrepresentative images
clip real activations.
"""

import os

import numpy as np

MAX_CALIBRATION_IMAGES = 256


def calibration_images(data, spec, limit=MAX_CALIBRATION_IMAGES):
    """Check `data` against the export's input and return float32 `(count, H, W, 3)`.

    data: an array `(count, H, W, 3)` (or a list of `(H, W, 3)` images), a
    `tf.data.Dataset` / iterable of such batches or of `(images, labels)`
    pairs (a validation set as `fit` takes it), a `.npy` file or a folder of
    image files. Images are in the export's input units (raw [0, 255] pixels
    when it includes preprocessing). At most `limit` images are used.
    spec: the export's `ServingSpec` (None: not known yet, shapes unchecked).
    Raises ValueError naming the problem.
    """
    if data is None:
        raise ValueError(
            "quantization='full_int8' needs calibration_data: a few hundred images like those the "
            "model will serve, (count, H, W, 3), e.g. from the validation set."
        )
    if isinstance(data, (str, os.PathLike)):
        data = _read_path(os.fspath(data))
    images = _collect(data, limit)
    expected = ("H", "W", 3) if spec is None else (*spec.image_size, 3)
    if images.ndim != 4 or images.shape[3] != 3 or (spec is not None and images.shape[1:] != expected):
        raise ValueError(
            f"calibration_data must be images of shape (count, {', '.join(map(str, expected))}) "
            f"(the export's input), got {images.shape}."
        )
    if len(images) == 0:
        raise ValueError("calibration_data holds no images.")
    if spec is not None and spec.batch_size is not None and len(images) < spec.batch_size:
        raise ValueError(
            f"calibration_data has {len(images)} images, fewer than the export's batch_size {spec.batch_size}."
        )
    if not np.issubdtype(images.dtype, np.number) or np.issubdtype(images.dtype, np.complexfloating):
        raise ValueError(f"calibration_data must hold real numbers, got dtype {images.dtype}.")
    images = images.astype("float32")
    if not np.isfinite(images).all():
        raise ValueError("calibration_data holds NaN or Inf pixels.")
    if spec is not None and spec.include_preprocessing and (images.min() < 0 or images.max() > 255):
        raise ValueError(
            "calibration_data must be raw pixels in [0, 255] like the export's input, got values in "
            f"[{images.min():g}, {images.max():g}]."
        )
    return images


def representative_batches(images, batch_size):
    """The converter's `representative_dataset`: `{"images": batch}` dicts of `batch_size` images."""

    def batches():
        for start in range(0, len(images) - batch_size + 1, batch_size):
            yield {"images": images[start : start + batch_size]}

    return batches


def _read_path(path):
    if os.path.isdir(path):
        from keras_dtop.cli.image_files import collect_images, read_rgb

        images = [read_rgb(file) for file, _ in collect_images([path])]
        shapes = {image.shape for image in images}
        if len(shapes) > 1:
            raise ValueError(f"The images in {path} differ in size {sorted(shapes)}: give one size, the export's.")
        return np.stack(images)
    if path.endswith(".npy") and os.path.isfile(path):
        return np.load(path, allow_pickle=False)
    raise FileNotFoundError(f"calibration_data: no .npy file or image folder at {path!r}.")


def _collect(data, limit):
    """Up to `limit` images from an array, a list of images, or an iterable of batches."""
    if isinstance(data, np.ndarray) or (hasattr(data, "__array__") and not hasattr(data, "take")):
        return np.asarray(data)[:limit]
    if isinstance(data, (list, tuple)) and data and not isinstance(data[0], (tuple, list, dict)) and np.ndim(data[0]) == 3:
        return np.stack([np.asarray(image) for image in data[:limit]])
    batches, count = [], 0
    try:
        iterator = iter(data)
    except TypeError:
        raise ValueError(
            f"calibration_data must be images (count, H, W, 3), a dataset of image batches, a .npy "
            f"file or an image folder, got {type(data).__name__}."
        ) from None
    for batch in iterator:
        if isinstance(batch, dict):
            batch = batch.get("images")
        elif isinstance(batch, (tuple, list)):
            batch = batch[0]  # (images, labels) pairs
        batch = np.asarray(batch)
        if batch.ndim == 3:
            batch = batch[None]
        batches.append(batch)
        count += len(batch)
        if count >= limit:
            break
    if not batches:
        return np.zeros((0,))
    try:
        return np.concatenate(batches)[:limit]
    except ValueError:
        raise ValueError(
            f"calibration_data batches differ in shape: {sorted({b.shape[1:] for b in batches})}."
        ) from None
