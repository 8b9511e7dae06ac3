"""What a segmenter's classes are called and drawn in: checked names and palette.

Both are optional model settings (serialised with the model, kept by `.keras`
files and presets) that pictures, reports and the CLI read.
"""

import numpy as np


def check_class_names(class_names, num_classes):
    """None, or a list of `num_classes` non-empty strings."""
    if class_names is None:
        return None
    if isinstance(class_names, str) or not hasattr(class_names, "__len__"):
        raise TypeError(f"class_names must be a list of {num_classes} strings, got {class_names!r}.")
    names = list(class_names)
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names for a model with num_classes={num_classes}.")
    bad = [name for name in names if not isinstance(name, str) or not name]
    if bad:
        raise TypeError(f"class_names must be non-empty strings, got {bad[:3]!r}.")
    return names


def check_palette(palette, num_classes):
    """None, or `num_classes` RGB colours (ints in [0, 255]) as a list of `[r, g, b]`."""
    if palette is None:
        return None
    try:
        array = np.asarray(palette)
    except ValueError:
        raise ValueError("palette must be (num_classes, 3) RGB colours, got rows of different lengths.") from None
    if array.shape != (num_classes, 3):
        raise ValueError(f"palette must have shape (num_classes, 3) = ({num_classes}, 3), got {array.shape}.")
    if array.dtype.kind not in "iuf" or (array != np.round(array)).any() or array.min() < 0 or array.max() > 255:
        raise ValueError("palette colours must be integers in [0, 255] (r, g, b).")
    return array.astype(int).tolist()
