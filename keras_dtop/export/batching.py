"""Run an exported model over any number of images, in chunks of its batch size."""

import numpy as np


def check_images(images, input_shape, input_dtype):
    """`images` as an array of `input_dtype` `(count, *input_shape[1:])`, or a ValueError naming the shape."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != tuple(input_shape[1:]):
        raise ValueError(
            f"Images must have shape (count, {', '.join(map(str, input_shape[1:]))}), got {images.shape}."
        )
    return images.astype(input_dtype, copy=False)


def run_in_batches(run, images, batch_size=None):
    """Outputs of `run(batch) -> {name: array}` for all `images`, concatenated.

    batch_size None: one call on all images (a dynamic batch). Otherwise
    chunks of `batch_size`, the last one padded with copies of its last
    image and the padding dropped from the outputs.
    """
    if batch_size is None:
        return {name: np.asarray(value) for name, value in run(images).items()}
    chunks = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), 0)])
        chunks.append({name: np.array(value[: len(chunk)]) for name, value in run(padded).items()})
    return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
