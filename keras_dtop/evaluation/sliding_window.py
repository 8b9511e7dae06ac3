"""Sliding-window inference for images larger than the training crop (design doc §4.5).

Windows of `crop_size` step by `stride`; the last row and column of windows
sit flush with the image border, so every pixel is covered; overlapping
scores are averaged. Each window prunes on its own, so an image's GFLOPs are
the sum over its windows. An image smaller than the crop in a side is padded
to the crop with the mean colour (normalised 0) and the padding cut off.
"""

import dataclasses
import numbers

import numpy as np

from keras_dtop.flops import dense_segmenter_flops


@dataclasses.dataclass(frozen=True)
class SlidingWindow:
    """Window size and step, `(height, width)` each.

    stride None: two thirds of the crop (341 for a 512 crop, the ADE20K
    ViT-B setting of the paper's configs).
    """

    crop_size: tuple
    stride: tuple = None

    def __post_init__(self):
        crop = _pair("crop_size", self.crop_size)
        stride = tuple(max(1, round(c * 2 / 3)) for c in crop) if self.stride is None else self.stride
        stride = _pair("stride", stride)
        if any(s > c for s, c in zip(stride, crop)):
            raise ValueError(f"stride {stride} larger than crop_size {crop} would leave pixels uncovered.")
        object.__setattr__(self, "crop_size", crop)
        object.__setattr__(self, "stride", stride)

    @classmethod
    def from_argument(cls, value):
        """A `SlidingWindow` from what `sliding_window=` arguments accept.

        A `SlidingWindow`; a dict of its fields; a crop size (an int or
        `(h, w)`, default stride); or `((h, w), (stride_h, stride_w))`. A flat
        pair such as `(512, 341)` is a crop size, never crop and stride.
        """
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        if isinstance(value, numbers.Integral):
            return cls((int(value), int(value)))
        value = tuple(value)
        if len(value) == 2 and all(isinstance(v, (tuple, list)) for v in value):
            return cls(tuple(value[0]), tuple(value[1]))
        return cls(value)


def _pair(name, value):
    if isinstance(value, numbers.Integral):
        value = (value, value)
    try:
        pair = tuple(int(v) for v in value)
    except TypeError:
        raise TypeError(f"{name} must be an int or (height, width), got {value!r}.") from None
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be (height, width) with positive sides, got {value!r}.")
    return pair


def window_positions(height, width, window):
    """`(top, left)` of every window over an `height` x `width` image, row by row."""
    positions = []
    for size, crop, stride in zip((height, width), window.crop_size, window.stride):
        steps = max(size - crop + stride - 1, 0) // stride + 1
        positions.append(sorted({max(min(i * stride, size - crop), 0) for i in range(steps)}))
    return [(top, left) for top in positions[0] for left in positions[1]]


def pad_pixel(model):
    """The raw pixel that the model's preprocessor maps to 0, per channel (its mean).

    A converter computes `x · scale + offset`, so this is
    `-offset / scale` (0 without a preprocessor: the model takes normalised images).
    """
    converter = getattr(getattr(model, "preprocessor", None), "image_converter", None)
    if converter is None:
        return np.zeros(3, "float32")
    scale = 1.0 if converter.scale is None else np.asarray(converter.scale, "float32")
    offset = 0.0 if converter.offset is None else np.asarray(converter.offset, "float32")
    return np.broadcast_to(-offset / scale, (3,)).astype("float32")


def crop_window(image, top, left, crop_size, fill):
    """`image[top:top + h, left:left + w]` as a full `crop_size` window, `fill` past the image's edges."""
    crop_h, crop_w = crop_size
    part = image[top : top + crop_h, left : left + crop_w]
    crop = np.empty((crop_h, crop_w, *image.shape[2:]), np.result_type(part, np.asarray(fill)))
    crop[...] = fill
    crop[: part.shape[0], : part.shape[1]] = part
    return crop


def check_window(model, window):
    """Raise a ValueError if `model` cannot run windows of `window.crop_size` as they are."""
    patch = model.backbone.patch_size
    if any(c % patch for c in window.crop_size):
        raise ValueError(
            f"Sliding-window crop_size {window.crop_size} must be a multiple of the patch size {patch}."
        )
    converter = getattr(getattr(model, "preprocessor", None), "image_converter", None)
    if getattr(converter, "image_size", None) is not None:
        raise ValueError(
            f"The model's preprocessor resizes images to {converter.image_size}; sliding windows "
            "need scores at the window's own size. Use an image converter with image_size=None."
        )


def sliding_window_details(model, image, window, batch_size=8):
    """Predict one image `(H, W, 3)` (raw pixels) window by window.

    Returns a dict of NumPy arrays: `scores` `(H, W, classes)` averaged over
    windows, `windows` `(n, 2)` their (top, left), `alive_counts` `(n,
    stages)` per window, `exit_stage` `(H, W)` per pixel (0-based; where
    windows overlap, the latest stage any of them ran the pixel's token to), `gflops` and `gflops_with_auxiliary_heads` summed
    over windows (scalars), and `dense_gflops` (the same windows without
    pruning).
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"Expected one image (height, width, channels), got shape {image.shape}.")
    return sliding_window_batch(model, image[None], window, batch_size)[0]


def sliding_window_batch(model, images, window, batch_size=8):
    """`sliding_window_details` of every image of `(count, H, W, 3)`, as a list.

    The windows of all images go through the model `batch_size` at a time
    (windows of different images share a call; each still prunes on its
    own), and each chunk's scores are added to the images' sums at once, so
    memory holds `batch_size` windows' scores plus one score map per image.
    """
    window = SlidingWindow.from_argument(window)
    check_window(model, window)
    images = np.asarray(images)
    count, height, width, channels = images.shape
    crop_h, crop_w = window.crop_size
    positions = window_positions(height, width, window)
    jobs = [(b, top, left) for b in range(count) for top, left in positions]
    fill = pad_pixel(model)
    scores = np.zeros((count, height, width, model.num_classes), "float32")
    exit_stage = np.zeros((count, height, width), "int32")
    patch = model.backbone.patch_size
    hits = np.zeros((height, width, 1), "float32")
    for top, left in positions:
        hits[top : top + crop_h, left : left + crop_w] += 1.0
    alive, gflops, gflops_aux = [], [], []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        crops = np.empty((len(chunk), crop_h, crop_w, channels), "float32")
        for crop, (b, top, left) in zip(crops, chunk):
            crop[...] = crop_window(images[b], top, left, window.crop_size, fill)
        details = model.predict_details(crops, batch_size=batch_size)
        for window_scores, window_exits, (b, top, left) in zip(details["scores"], details["exit_stage"], chunk):
            h, w = min(crop_h, height - top), min(crop_w, width - left)
            scores[b, top : top + h, left : left + w] += window_scores[:h, :w]
            pixels = np.repeat(np.repeat(window_exits, patch, 0), patch, 1)[:h, :w]
            region = exit_stage[b, top : top + h, left : left + w]
            np.maximum(region, pixels, out=region)
        alive.append(details["alive_counts"])
        gflops.append(details["gflops"])
        gflops_aux.append(details["gflops_with_auxiliary_heads"])
    alive, gflops, gflops_aux = (np.concatenate(x).reshape(count, len(positions), -1) for x in (alive, gflops, gflops_aux))
    dense = dense_segmenter_flops(model, window.crop_size)
    return [
        {
            "scores": scores[b] / hits,
            "windows": np.asarray(positions, "int32"),
            "exit_stage": exit_stage[b],
            "alive_counts": alive[b],
            "gflops": float(gflops[b].sum()),
            "gflops_with_auxiliary_heads": float(gflops_aux[b].sum()),
            "dense_gflops": dense * len(positions) / 1e9,
        }
        for b in range(count)
    ]
