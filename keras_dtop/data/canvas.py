"""Segmentation scenes from object photographs: items pasted on textured canvases.

Used by `benchmarks/accuracy.py` with Fashion-MNIST's product photographs
(`keras_dtop.data.fashion_mnist`), which ship offline: every item is scaled,
tinted and placed on a smooth random background; its pixels take the item's
class, the rest is background (class 0). Later items cover earlier ones, so
the label map is what one sees. Deterministic for a given seed.
"""

import numpy as np


def _smooth_background(rng, height, width):
    """`(H, W, 3)` float in [0, 255]: a random low-frequency colour field plus grain."""
    coarse = rng.uniform(30, 225, (4, 4, 3))
    rows = np.linspace(0, 3, height)
    cols = np.linspace(0, 3, width)
    r0 = np.minimum(rows.astype(int), 2)
    c0 = np.minimum(cols.astype(int), 2)
    tr, tc = (rows - r0)[:, None, None], (cols - c0)[None, :, None]
    top = coarse[r0][:, c0] * (1 - tc) + coarse[r0][:, c0 + 1] * tc
    bottom = coarse[r0 + 1][:, c0] * (1 - tc) + coarse[r0 + 1][:, c0 + 1] * tc
    field = top * (1 - tr) + bottom * tr
    return np.clip(field + rng.normal(0, 6, (height, width, 3)), 0, 255)


def _resize_nearest(item, size):
    rows = np.minimum((np.arange(size) * item.shape[0] / size).astype(int), item.shape[0] - 1)
    return item[rows][:, rows]


def compose_canvases(
    items,
    item_classes,
    num_images,
    image_size=(96, 96),
    items_per_image=(2, 5),
    scale_range=(0.75, 1.5),
    threshold=0.1,
    seed=0,
):
    """Scenes of items on backgrounds.

    items: `(N, s, s)` uint8 grey photographs (object bright on black, as in
        Fashion-MNIST); item_classes: `(N,)` ints in [0, K).
    Returns images uint8 `(num_images, H, W, 3)` and labels uint8
    `(num_images, H, W)`: 0 = background, item class + 1 where an item's
    intensity exceeds `threshold` (a fraction of 255). Each scene holds
    `items_per_image` (low, high inclusive) items, each resized by a factor in
    `scale_range`, tinted with a random colour and placed at random.
    """
    items = np.asarray(items)
    item_classes = np.asarray(item_classes)
    if items.ndim != 3 or items.shape[1] != items.shape[2]:
        raise ValueError(f"items must be square grey images (N, s, s), got shape {items.shape}.")
    if len(items) != len(item_classes):
        raise ValueError(f"Got {len(items)} items but {len(item_classes)} classes.")
    height, width = image_size
    rng = np.random.default_rng(seed)
    images = np.empty((num_images, height, width, 3), np.uint8)
    labels = np.zeros((num_images, height, width), np.uint8)
    for i in range(num_images):
        canvas = _smooth_background(rng, height, width)
        for _ in range(rng.integers(items_per_image[0], items_per_image[1] + 1)):
            pick = rng.integers(len(items))
            size = int(round(items.shape[1] * rng.uniform(*scale_range)))
            size = min(size, height, width)
            grey = _resize_nearest(items[pick], size).astype("float32") / 255.0
            top, left = rng.integers(0, height - size + 1), rng.integers(0, width - size + 1)
            tint = rng.uniform(0.35, 1.0, 3) * 255.0
            alpha = np.clip(grey * 3.0, 0.0, 1.0)[..., None]
            region = canvas[top : top + size, left : left + size]
            canvas[top : top + size, left : left + size] = alpha * (grey[..., None] * tint) + (1 - alpha) * region
            label_region = labels[i, top : top + size, left : left + size]
            label_region[grey > threshold] = item_classes[pick] + 1
        images[i] = np.clip(canvas, 0, 255).astype(np.uint8)
    return images, labels
