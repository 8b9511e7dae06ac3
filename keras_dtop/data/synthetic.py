"""A built-in, procedurally generated segmentation dataset (no downloads).

Each image is a smooth background (class 0) with textured shapes on it:
large flat regions are easy (confident early exits), while small shapes,
boundaries and two deliberately similar textures are hard. Object borders
are marked 255 (ignore) one pixel wide, like Pascal VOC. Deterministic for a
given seed.
"""

import numpy as np

from keras_dtop.data.labels import IGNORE_INDEX

CLASS_NAMES = ("background", "stripes", "checker", "speckle", "dots", "haze")


def _texture(class_id, rng, height, width):
    """`(H, W, 3)` float texture in [0, 255] for one class."""
    yy, xx = np.mgrid[0:height, 0:width].astype("float32")
    if class_id == 1:  # red stripes
        on = (np.floor((yy + rng.integers(8)) / 4) % 2)[..., None]
        return on * [220, 40, 40] + (1 - on) * [90, 10, 10]
    if class_id == 2:  # blue-white checkerboard
        on = ((np.floor(yy / 6) + np.floor(xx / 6)) % 2)[..., None]
        return on * [230, 230, 250] + (1 - on) * [30, 50, 200]
    if class_id == 3:  # noisy green
        return np.clip([40, 170, 60] + rng.normal(0, 35, (height, width, 3)), 0, 255)
    if class_id == 4:  # yellow dots on dark
        on = ((np.hypot((yy % 8) - 3.5, (xx % 8) - 3.5) < 2.5).astype("float32"))[..., None]
        return on * [240, 220, 40] + (1 - on) * [50, 40, 20]
    # class 5, hard: a hazy blue close to the sky background
    return np.clip([150, 175, 215] + rng.normal(0, 12, (height, width, 3)), 0, 255)


def _background(rng, height, width):
    top = rng.uniform([100, 140, 200], [140, 180, 240])
    bottom = rng.uniform([170, 190, 220], [210, 220, 250])
    t = np.linspace(0, 1, height, dtype="float32")[:, None, None]
    sky = (1 - t) * top + t * bottom
    return np.broadcast_to(sky, (height, width, 3)) + rng.normal(0, 4, (height, width, 3))


def _shape_mask(rng, height, width):
    yy, xx = np.mgrid[0:height, 0:width]
    size = rng.uniform(0.12, 0.7) * min(height, width)  # small shapes are hard
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    kind = rng.integers(3)
    if kind == 0:  # disk
        return np.hypot(yy - cy, xx - cx) < size / 2
    if kind == 1:  # axis-aligned rectangle
        aspect = rng.uniform(0.5, 2.0)
        return (np.abs(yy - cy) < size * aspect / 2) & (np.abs(xx - cx) < size / aspect / 2)
    # triangle pointing up
    rel_y = (yy - cy) / size + 0.5
    return (rel_y > 0) & (rel_y < 1) & (np.abs(xx - cx) < rel_y * size / 2)


def _border(mask):
    """Pixels of `mask` that touch a pixel outside it (4-neighbourhood)."""
    padded = np.pad(mask, 1, mode="edge")
    inside = (
        padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    )
    return mask & ~inside


def synthetic_segmentation(num_images, image_size=(128, 128), num_classes=6, seed=0):
    """Images and labels as NumPy arrays.

    Returns `images` uint8 `(num_images, H, W, 3)` RGB and `labels` uint8
    `(num_images, H, W)` with values in `[0, num_classes)` or 255.
    `num_classes` may be 2 to 6 (class 0 is the background).
    """
    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in [2, {len(CLASS_NAMES)}], got {num_classes}.")
    height, width = image_size
    rng = np.random.default_rng(seed)
    images = np.empty((num_images, height, width, 3), np.uint8)
    labels = np.empty((num_images, height, width), np.uint8)
    for i in range(num_images):
        image = _background(rng, height, width)
        label = np.zeros((height, width), np.uint8)
        borders = np.zeros((height, width), bool)
        for _ in range(rng.integers(2, 6)):
            class_id = int(rng.integers(1, num_classes))
            mask = _shape_mask(rng, height, width)
            image = np.where(mask[..., None], _texture(class_id, rng, height, width), image)
            label[mask] = class_id
            borders &= ~mask
            borders |= _border(mask)
        label[borders] = IGNORE_INDEX
        images[i] = np.clip(image, 0, 255).astype(np.uint8)
        labels[i] = label
    return images, labels


def synthetic_dataset(
    num_images, batch_size=8, image_size=(128, 128), num_classes=6, seed=0, shuffle=False
):
    """The same data as a batched `tf.data.Dataset` of (float32 images, int32 labels)."""
    import tensorflow as tf

    images, labels = synthetic_segmentation(num_images, image_size, num_classes, seed)
    ds = tf.data.Dataset.from_tensor_slices(
        (images.astype("float32"), labels.astype("int32"))
    )
    if shuffle:
        ds = ds.shuffle(num_images, seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size)
