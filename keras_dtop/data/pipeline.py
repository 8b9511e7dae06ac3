"""From `(image, label)` examples to the batches `model.fit` / `evaluate` take.

Every source (tensorflow-datasets, a folder, arrays) ends here, so training
and evaluation batches look the same whatever the data: float32 images
`(batch, H, W, 3)` in pixel units `[0, 255]` (the segmenter's preprocessor
normalises them) and int32 labels `(batch, H, W)` in `[0, num_classes)` or 255.
`tf.data` runs on the host and feeds every Keras backend.
"""

import tensorflow as tf

from keras_dtop.data.augment import pad_to, rescale_size, resize_pair, train_augmentation
from keras_dtop.data.labels import IGNORE_INDEX
from keras_dtop.models.presets import IMAGENET_MEAN


def _check_size(name, value, sides="(height, width)"):
    if value is None:
        return None
    size = tuple(int(v) for v in value)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name} must be {sides} with positive sides, got {value!r}.")
    return size


def _check_labels_op(label, num_classes):
    """Fail the pipeline with a clear message if a label is outside [0, C) ∪ {255}."""
    bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= num_classes))
    message = f"Labels must be in [0, {num_classes}) or {IGNORE_INDEX} (ignore); the data has others."
    with tf.control_dependencies([tf.debugging.assert_equal(tf.reduce_any(bad), False, message=message)]):
        return tf.identity(label)


def segmentation_pipeline(
    raw,
    *,
    num_classes,
    training,
    batch_size=8,
    crop_size=(512, 512),
    base_scale=None,
    eval_size=None,
    size_divisor=None,
    seed=0,
    shuffle_buffer=256,
    repeat=False,
    augment=True,
    image_pad_value=IMAGENET_MEAN,
    **augment_kwargs,
):
    """Batch an unbatched dataset of `(image (H, W, 3), label (H, W))` for DToP.

    training=True: shuffle (seeded), the method's augmentation
        (`keras_dtop.data.augment.train_augmentation`: random resize of
        `base_scale` by 0.5-2.0, class-balanced random crop of `crop_size`,
        flip, photometric distortion, padding) and batches of equal crops,
        the last partial batch dropped. `augment=False` only resizes to the
        base scale, crops and pads.
        `augment_kwargs` go to `train_augmentation` (e.g. `ratio_range`,
        `cat_max_ratio`, `photometric`).
    training=False: no randomness. Images are resized to `eval_size`
        (exact, labels nearest) or to `base_scale` (keep aspect), or kept;
        images of different sizes are padded to the largest in the batch
        (and to a multiple of `size_divisor` if given) with the mean colour
        and label 255. For the exact protocol (no padding inside the model's
        view) use `batch_size=1` and sliding windows.
    Labels are checked in the pipeline: a value outside `[0, num_classes)`
    and 255 stops it with an error saying so.
    """
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    crop_size = _check_size("crop_size", crop_size)
    base_scale = _check_size("base_scale", base_scale, "(long edge, short edge)")
    eval_size = _check_size("eval_size", eval_size)
    spec = raw.element_spec
    if not isinstance(spec, tuple) or len(spec) != 2:
        raise ValueError(f"Expected a dataset of (image, label) pairs, got elements {spec}.")
    if spec[0].shape.rank not in (None, 3) or spec[1].shape.rank not in (None, 2):
        raise ValueError(
            "Expected unbatched examples: image (H, W, 3) and label (H, W), got "
            f"{spec[0].shape} and {spec[1].shape}."
        )
    autotune = tf.data.AUTOTUNE
    raw = raw.map(
        lambda image, label: (image, _check_labels_op(tf.cast(label, tf.int32), num_classes)),
        num_parallel_calls=autotune,
    )
    if training:
        if shuffle_buffer:
            raw = raw.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        if repeat:
            raw = raw.repeat()
        # One random int per example, different every epoch but fixed by `seed`.
        draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        if not augment:
            if augment_kwargs:
                raise ValueError(f"augment=False ignores augmentation settings {sorted(augment_kwargs)}.")
            # Still at the base scale, as evaluation sees the data: resize by 1, crop, pad.
            augment_kwargs = dict(
                ratio_range=(1.0, 1.0), flip_probability=0.0, photometric=False, cat_max_ratio=1.0
            )

        def transform(example, draw):
            image, label = example
            return train_augmentation(
                image,
                label,
                tf.stack([tf.cast(seed, tf.int64), draw]),
                crop_size,
                base_scale,
                image_pad_value=image_pad_value,
                **augment_kwargs,
            )

        ds = tf.data.Dataset.zip((raw, draws)).map(transform, num_parallel_calls=autotune)
        return ds.batch(batch_size, drop_remainder=True).prefetch(autotune)

    def resize(image, label):
        image = tf.cast(image, tf.float32)
        if eval_size is not None:
            return resize_pair(image, label, eval_size)
        if base_scale is not None:
            shape = tf.shape(label)
            scale = (max(base_scale), min(base_scale))
            return resize_pair(image, label, rescale_size(shape[0], shape[1], scale))
        return image, label

    def pad_to_divisor(image, label):
        shape = tf.shape(label)
        size = -(-shape // size_divisor) * size_divisor
        return pad_to(image, label, (size[0], size[1]), image_pad_value)

    ds = raw.map(resize, num_parallel_calls=autotune)
    if size_divisor:
        ds = ds.map(pad_to_divisor, num_parallel_calls=autotune)
    # Pad with the mean colour: shift so the mean is 0, pad with 0, shift back.
    fill = tf.constant(image_pad_value, tf.float32)
    ds = ds.map(lambda image, label: (image - fill, label))
    ds = ds.padded_batch(batch_size, padding_values=(0.0, IGNORE_INDEX))
    ds = ds.map(lambda images, labels: (images + fill, labels))
    if repeat:
        ds = ds.repeat()
    return ds.prefetch(autotune)


def array_dataset(images, labels):
    """Unbatched `tf.data.Dataset` of `(image, label)` from arrays `(N, H, W, 3)`, `(N, H, W)`."""
    if len(images) != len(labels):
        raise ValueError(f"Got {len(images)} images but {len(labels)} label maps.")
    return tf.data.Dataset.from_tensor_slices((images, labels))
