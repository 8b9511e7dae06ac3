"""Checks on segmentation labels, run before training starts.

Labels are integer class ids `(batch, H, W)` in `[0, num_classes)`, or 255
for pixels to ignore. Anything else would silently corrupt the loss, so it
raises a ValueError that says what is wrong.
"""

import numpy as np

IGNORE_INDEX = 255


def check_labels(labels, num_classes, images_shape=None):
    """Validate a label array (NumPy or a backend tensor)."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"Labels must be integer class ids, got dtype {labels.dtype}. "
            "Cast them (e.g. labels.astype('int32')); 255 marks ignored pixels."
        )
    if labels.ndim != 3:
        raise ValueError(
            f"Labels must have shape (batch, height, width), got shape {labels.shape}."
        )
    if images_shape is not None and len(images_shape) == 4:
        expected = tuple(images_shape[:3])
        if all(s is not None for s in expected) and labels.shape != expected:
            raise ValueError(
                f"Labels of shape {labels.shape} do not match images of shape "
                f"{tuple(images_shape)}: expected {expected}."
            )
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        values = np.unique(labels[bad])[:10].tolist()
        raise ValueError(
            f"Labels must be in [0, {num_classes}) or {IGNORE_INDEX} (ignore); found {values} "
            f"in {int(bad.sum())} pixels."
        )


def check_labels_in_dataset(dataset, num_classes):
    """Validate a `tf.data.Dataset` of `(images, labels)`: its spec and first batch."""
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) < 2:
        raise ValueError(
            "Expected a dataset of (images, labels) pairs, got elements of structure "
            f"{spec}."
        )
    labels_spec = spec[1]
    if not labels_spec.dtype.is_integer:
        raise ValueError(
            f"Labels must be integer class ids, got dtype {labels_spec.dtype.name} in the dataset."
        )
    if labels_spec.shape.rank is not None and labels_spec.shape.rank != 3:
        raise ValueError(
            "Dataset labels must be batched with shape (batch, height, width), got "
            f"{labels_spec.shape}."
        )
    for images, labels in dataset.take(1).map(lambda *e: (e[0], e[1])):
        check_labels(labels.numpy(), num_classes, tuple(images.shape))
