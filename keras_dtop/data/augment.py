"""The method's training augmentation, as `tf` ops for `tf.data` (design doc §4.4).

Per example, in order: random resize (keep aspect, ratio 0.5-2.0 of a base
scale), random crop that avoids crops dominated by one class (at most 10
tries, as mmsegmentation does), horizontal flip, photometric distortion, and
padding to the crop size (labels with 255). Images stay in pixel units
`[0, 255]` (the model's preprocessor normalises them), so image padding uses
the normaliser's mean: padded pixels normalise to 0, as in the authors'
pipeline where padding follows normalisation.

Every random draw is stateless and comes from a per-example seed `(2,)`
int32/int64, so a pipeline built with the same seed yields the same batches.
Labels are only ever moved (nearest-neighbour resize, crop, flip, pad with
255): no new label value can appear.
"""

import tensorflow as tf

from keras_dtop.data.labels import IGNORE_INDEX
from keras_dtop.models.presets import IMAGENET_MEAN

CROP_TRIES = 10


def _uniform(seed, salt, shape=(), minval=0.0, maxval=1.0):
    """Stateless uniform draw; `salt` separates the draws of one example."""
    return tf.random.stateless_uniform(
        shape, seed=tf.random.experimental.stateless_fold_in(seed, salt), minval=minval, maxval=maxval
    )


def rescale_size(height, width, scale):
    """Largest (h, w) with the same aspect that fits `scale` = (long, short) edges.

    The long edge stays <= `scale[0]` and the short edge <= `scale[1]`
    (mmsegmentation's keep-ratio rule); the result is rounded.
    """
    height, width = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    long_edge = tf.maximum(height, width)
    short_edge = tf.minimum(height, width)
    factor = tf.minimum(scale[0] / long_edge, scale[1] / short_edge)
    new_h = tf.cast(tf.floor(height * factor + 0.5), tf.int32)  # mmcv rounds halves up
    new_w = tf.cast(tf.floor(width * factor + 0.5), tf.int32)
    return tf.maximum(new_h, 1), tf.maximum(new_w, 1)


def resize_pair(image, label, size):
    """Image bilinear (float32), label nearest: `(h, w, 3)`, `(h, w)` at `size`."""
    image = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear")
    label = tf.image.resize(label[..., None], size, method="nearest")[..., 0]
    return image, label


def random_resize(image, label, seed, base_scale, ratio_range=(0.5, 2.0)):
    """Resize to `base_scale` · r (keep aspect), r ~ U(ratio_range)."""
    ratio = _uniform(seed, 1, minval=ratio_range[0], maxval=ratio_range[1])
    scale = (max(base_scale) * ratio, min(base_scale) * ratio)
    shape = tf.shape(label)
    return resize_pair(image, label, rescale_size(shape[0], shape[1], scale))


def _crop_is_mixed(label, cat_max_ratio):
    """True if no class (255 aside) covers `cat_max_ratio` or more of the crop and >1 class is there."""
    values = tf.reshape(label, [-1])
    counts = tf.math.bincount(values, minlength=256, maxlength=256)[:IGNORE_INDEX]
    present = tf.math.count_nonzero(counts)
    total = tf.maximum(tf.reduce_sum(counts), 1)
    share = tf.cast(tf.reduce_max(counts), tf.float32) / tf.cast(total, tf.float32)
    return (present > 1) & (share < cat_max_ratio)


def random_crop(image, label, seed, crop_size, cat_max_ratio=0.75):
    """Crop `crop_size` (or the whole side, if smaller) at a random offset.

    Up to 10 offsets are tried; the first whose crop has no class covering
    `cat_max_ratio` or more (ignored pixels aside) wins, else the last one.
    `cat_max_ratio >= 1` takes the first offset.
    """
    shape = tf.shape(label)
    crop_h = tf.minimum(shape[0], crop_size[0])
    crop_w = tf.minimum(shape[1], crop_size[1])
    margins = tf.cast(tf.stack([shape[0] - crop_h + 1, shape[1] - crop_w + 1]), tf.float32)
    offsets = tf.cast(tf.floor(_uniform(seed, 2, (CROP_TRIES, 2)) * margins), tf.int32)
    offsets = tf.minimum(offsets, tf.cast(margins, tf.int32) - 1)
    label = tf.cast(label, tf.int32)

    def crop_at(offset):
        return label[offset[0] : offset[0] + crop_h, offset[1] : offset[1] + crop_w]

    if cat_max_ratio >= 1.0:
        choice = tf.constant(0)
    else:
        mixed = tf.map_fn(
            lambda o: _crop_is_mixed(crop_at(o), cat_max_ratio),
            offsets,
            fn_output_signature=tf.bool,
        )
        first = tf.argmax(tf.cast(mixed, tf.int32), output_type=tf.int32)
        choice = tf.where(tf.reduce_any(mixed), first, CROP_TRIES - 1)
    offset = offsets[choice]
    image = image[offset[0] : offset[0] + crop_h, offset[1] : offset[1] + crop_w]
    return image, crop_at(offset)


def random_flip(image, label, seed, probability=0.5):
    """Flip image and label left-right together with `probability`."""
    flip = _uniform(seed, 3) < probability
    image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
    label = tf.cond(flip, lambda: label[:, ::-1], lambda: label)
    return image, label


def photometric_distortion(
    image,
    seed,
    brightness_delta=32.0,
    contrast_range=(0.5, 1.5),
    saturation_range=(0.5, 1.5),
    hue_delta=18,
):
    """mmsegmentation's PhotoMetricDistortion on a float image in [0, 255].

    Each of brightness (± delta), contrast (× U(range)), saturation (×) and
    hue (± delta in OpenCV's 0-180 hue units) applies with probability 1/2;
    contrast goes before or after the HSV changes at random. Clipped to
    [0, 255] after every step.
    """

    def maybe(salt, fn, x):
        return tf.cond(_uniform(seed, salt) < 0.5, lambda: fn(x), lambda: x)

    def clip(x):
        return tf.clip_by_value(x, 0.0, 255.0)

    def brightness(x):
        return clip(x + _uniform(seed, 11, minval=-brightness_delta, maxval=brightness_delta))

    def contrast(x):
        return clip(x * _uniform(seed, 12, minval=contrast_range[0], maxval=contrast_range[1]))

    def saturation(x):
        factor = _uniform(seed, 13, minval=saturation_range[0], maxval=saturation_range[1])
        hsv = tf.image.rgb_to_hsv(x / 255.0)
        hsv = tf.stack([hsv[..., 0], tf.clip_by_value(hsv[..., 1] * factor, 0.0, 1.0), hsv[..., 2]], -1)
        return clip(tf.image.hsv_to_rgb(hsv) * 255.0)

    def hue(x):
        delta = _uniform(seed, 14, minval=-float(hue_delta), maxval=float(hue_delta)) / 180.0
        hsv = tf.image.rgb_to_hsv(x / 255.0)
        hsv = tf.stack([tf.math.floormod(hsv[..., 0] + delta, 1.0), hsv[..., 1], hsv[..., 2]], -1)
        return clip(tf.image.hsv_to_rgb(hsv) * 255.0)

    contrast_first = _uniform(seed, 15) < 0.5
    image = maybe(21, brightness, image)
    image = tf.cond(contrast_first, lambda: maybe(22, contrast, image), lambda: image)
    image = maybe(23, saturation, image)
    image = maybe(24, hue, image)
    return tf.cond(contrast_first, lambda: image, lambda: maybe(25, contrast, image))


def pad_to(image, label, size, image_pad_value=IMAGENET_MEAN):
    """Pad bottom/right to at least `size`: the image with `image_pad_value` (per channel), labels with 255."""
    shape = tf.shape(label)
    pad_h = tf.maximum(size[0] - shape[0], 0)
    pad_w = tf.maximum(size[1] - shape[1], 0)
    fill = tf.constant(image_pad_value, tf.float32)
    image = tf.pad(tf.cast(image, tf.float32) - fill, [[0, pad_h], [0, pad_w], [0, 0]]) + fill
    label = tf.pad(label, [[0, pad_h], [0, pad_w]], constant_values=IGNORE_INDEX)
    return image, label


def train_augmentation(
    image,
    label,
    seed,
    crop_size,
    base_scale=None,
    ratio_range=(0.5, 2.0),
    cat_max_ratio=0.75,
    flip_probability=0.5,
    photometric=True,
    image_pad_value=IMAGENET_MEAN,
):
    """One training example: image `(H, W, 3)` any numeric, label `(H, W)` int.

    Returns float32 image `(crop_h, crop_w, 3)` in [0, 255] and int32 label
    `(crop_h, crop_w)`. `base_scale` (long, short) edges; None uses the
    method's ratio of 4 : 1 to the crop (`(4·crop, crop)`, i.e. (2048, 512)
    for a 512 crop). `ratio_range=None` skips the random resize.
    """
    seed = tf.cast(seed, tf.int64)
    label = tf.cast(label, tf.int32)
    image = tf.cast(image, tf.float32)
    if base_scale is None:
        base_scale = (4 * max(crop_size), min(crop_size))
    if ratio_range is not None:
        image, label = random_resize(image, label, seed, base_scale, ratio_range)
    image, label = random_crop(image, label, seed, crop_size, cat_max_ratio)
    if flip_probability > 0:
        image, label = random_flip(image, label, seed, flip_probability)
    if photometric:
        image = photometric_distortion(image, seed)
    image, label = pad_to(image, label, crop_size, image_pad_value)
    image = tf.ensure_shape(image, (crop_size[0], crop_size[1], 3))
    label = tf.ensure_shape(label, (crop_size[0], crop_size[1]))
    return image, label
