"""Segmentation data from image and mask files on disk.

Three folder layouts are understood:

- `"stem"`: `root/images/<name>.jpg` (or .jpeg/.png/.bmp) with
  `root/masks/<name>.png`, paired by file name without extension. With a
  `split`, the files are in `root/images/<split>` and `root/masks/<split>`.
- `"ade20k"`: ADEChallengeData2016, `root/images/<split>/*.jpg` with
  `root/annotations/<split>/*.png`, split `"training"` or `"validation"`.
  Its masks store 0 for "other" and classes 1-150, so by default labels are
  shifted down by one and 0 becomes 255 (ignore): `reduce_zero_label`.
- `"voc"`: Pascal VOC 2012, `root/JPEGImages/<id>.jpg` with
  `root/SegmentationClass/<id>.png`, ids listed in
  `root/ImageSets/Segmentation/<split>.txt`.

Masks are PNGs of class ids: a palette PNG (mode "P", like VOC) whose palette
*indices* are the class ids, a greyscale PNG whose values are the class ids,
or an RGB PNG together with a `palette` that lists the colour of each class.
255 marks pixels to ignore.

`folder_dataset` turns a folder into the batched `tf.data.Dataset` that
`DToPSegmenter.fit` takes, through `keras_dtop.data.pipeline`.
"""

from pathlib import Path

import numpy as np

from keras_dtop.data.labels import IGNORE_INDEX

VOC_CLASS_NAMES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
# Image files that must not be masks: lossy, or simply not the PNG we read.
_NON_PNG_MASK_EXTENSIONS = (".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_JPEG_WARNING = (
    "JPEG compression is lossy: it blurs the edges between regions into values "
    "that are other classes' ids, so a JPEG mask silently corrupts the labels. "
    "Save masks as PNG."
)
_SPLIT_ALIASES = {
    "ade20k": {"train": "training", "val": "validation"},
    "voc": {"training": "train", "validation": "val"},
}
_MAX_LISTED = 10


# ---------------------------------------------------------------- pairing files


def pair_files(root, layout="stem", split=None, images_dir="images", masks_dir="masks"):
    """List the `(image_path, mask_path)` pairs of a dataset folder.

    Returns a list of `(Path, Path)` sorted by image path. Raises
    FileNotFoundError for a missing folder or split list, and ValueError for
    images without masks (or the reverse), masks that are not PNGs, or a
    folder with no pairs.
    """
    root = Path(root)
    if layout == "stem":
        images, masks = root / images_dir, root / masks_dir
        if split is not None:
            images, masks = images / split, masks / split
        pairs = _pair_by_stem(images, masks, layout)
    elif layout == "ade20k":
        pairs = _ade20k_pairs(_find_dataset_root(root, "ADEChallengeData2016"), split)
    elif layout == "voc":
        pairs = _voc_pairs(_find_dataset_root(root, "VOC2012", "VOCdevkit/VOC2012"), split)
    else:
        raise ValueError(f"Unknown layout {layout!r}: use 'stem', 'ade20k' or 'voc'.")
    if not pairs:
        raise ValueError(f"No image/mask pairs found under {root} (layout {layout!r}).")
    return sorted(pairs)


def _find_dataset_root(root, *subfolders):
    """`root`, or the dataset folder inside it if the user gave its parent."""
    for name in subfolders:
        if (root / name).is_dir():
            return root / name
    return root


def _require_dir(path, layout, what):
    if not path.is_dir():
        raise FileNotFoundError(
            f"Expected the {what} folder at {path} for layout {layout!r}, but it does not exist."
        )


def _files(folder):
    """Visible regular files of `folder`, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _joined(items, separator="; "):
    """The first `_MAX_LISTED` items joined, then how many more there are."""
    items = [str(item) for item in items]
    more = len(items) - _MAX_LISTED
    tail = f"{separator}... ({more} more)" if more > 0 else ""
    return separator.join(items[:_MAX_LISTED]) + tail


def _listing(paths):
    """A short, readable list of paths: how many, then the first ones."""
    return f"{len(paths)}: {_joined(paths, ', ')}"


def _reject_non_png_masks(paths):
    bad = [p for p in paths if p.suffix.lower() in _NON_PNG_MASK_EXTENSIONS]
    if bad:
        jpeg = any(p.suffix.lower() in (".jpg", ".jpeg") for p in bad)
        raise ValueError(
            f"Masks must be PNG files; found non-PNG masks ({_listing(bad)}). "
            + (_JPEG_WARNING if jpeg else "Convert them to PNG (lossless) class-id images.")
        )


def _by_stem(paths, folder):
    """{stem: path}; two files with one stem (a.jpg and a.png) are ambiguous."""
    found = {}
    for path in paths:
        if path.stem in found:
            raise ValueError(
                f"Two files in {folder} share the name {path.stem!r}: {found[path.stem].name} "
                f"and {path.name}. Keep one per image."
            )
        found[path.stem] = path
    return found


def _pair_by_stem(image_folder, mask_folder, layout):
    """Pairs of `image_folder/<stem>.<image ext>` with `mask_folder/<stem>.png`."""
    _require_dir(image_folder, layout, "images")
    _require_dir(mask_folder, layout, "masks")
    mask_files = _files(mask_folder)
    _reject_non_png_masks(mask_files)
    images = _by_stem(
        [p for p in _files(image_folder) if p.suffix.lower() in IMAGE_EXTENSIONS], image_folder
    )
    masks = _by_stem([p for p in mask_files if p.suffix.lower() == ".png"], mask_folder)
    _check_all_paired(images, masks)
    return [(images[stem], masks[stem]) for stem in images]


def _check_all_paired(images, masks):
    """Raise a ValueError listing images without a mask and masks without an image."""
    lonely_images = [images[s] for s in sorted(images.keys() - masks.keys())]
    lonely_masks = [masks[s] for s in sorted(masks.keys() - images.keys())]
    problems = []
    if lonely_images:
        problems.append(f"images without a mask ({_listing(lonely_images)})")
    if lonely_masks:
        problems.append(f"masks without an image ({_listing(lonely_masks)})")
    if problems:
        raise ValueError(
            "Every image needs a mask with the same file name (extension .png) and "
            "every mask an image. Found " + "; and ".join(problems) + "."
        )


def _canonical_split(layout, split, allowed):
    split = _SPLIT_ALIASES[layout].get(split, split)
    if split not in allowed:
        raise ValueError(
            f"Layout {layout!r} needs split in {allowed} (or their short names), got {split!r}."
        )
    return split


def _ade20k_pairs(root, split):
    split = _canonical_split("ade20k", split, ("training", "validation"))
    return _pair_by_stem(root / "images" / split, root / "annotations" / split, "ade20k")


def _voc_pairs(root, split):
    images, masks = root / "JPEGImages", root / "SegmentationClass"
    _require_dir(images, "voc", "JPEGImages")
    _require_dir(masks, "voc", "SegmentationClass")
    if split is None:
        mask_files = _files(masks)
        _reject_non_png_masks(mask_files)
        ids = [p.stem for p in mask_files if p.suffix.lower() == ".png"]
    else:
        split = _canonical_split("voc", split, ("train", "val", "trainval"))
        ids = _read_split_ids(root / "ImageSets" / "Segmentation" / f"{split}.txt")
    pairs = [(images / f"{i}.jpg", masks / f"{i}.png") for i in ids]
    missing = [p for pair in pairs for p in pair if not p.is_file()]
    if missing:
        listed = f"listed in {split}.txt" if split else "needed by SegmentationClass"
        raise ValueError(f"VOC files {listed} are missing ({_listing(missing)}).")
    return pairs


def _read_split_ids(path):
    if not path.is_file():
        raise FileNotFoundError(
            f"Expected the split list {path} for layout 'voc', but it does not exist."
        )
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def check_pairs(pairs):
    """Check that each image and its mask have the same size and that masks are PNGs.

    Reads only the file headers (no pixel decoding). Raises a ValueError that
    names the files and their (width, height) sizes.
    """
    from PIL import Image

    mismatched = []
    for image_path, mask_path in pairs:
        with Image.open(image_path) as image:
            image_size = image.size
        with Image.open(mask_path) as mask:
            mask_size, mask_format = mask.size, mask.format
        if mask_format != "PNG":
            raise ValueError(_not_png_message(mask_path, mask_format))
        if image_size != mask_size:
            mismatched.append(
                f"{image_path} is {_wxh(image_size)} but {mask_path} is {_wxh(mask_size)}"
            )
    if mismatched:
        raise ValueError(
            f"{len(mismatched)} image/mask pairs differ in size (width x height): "
            f"{_joined(mismatched)}."
        )


def _wxh(size):
    return f"{size[0]}x{size[1]}"


def _not_png_message(path, image_format):
    jpeg = _JPEG_WARNING if image_format in ("JPEG", "MPO") else "Save masks as PNG."
    return f"Mask {path} is a {image_format} file, not a PNG. {jpeg}"


# ---------------------------------------------------------------- reading files


def read_image(path):
    """An image file as uint8 RGB `(H, W, 3)`; grey, RGBA and palette images are converted.

    EXIF orientation is not applied: masks are drawn on the stored pixels.
    """
    from PIL import Image

    with Image.open(path) as image:
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image, dtype=np.uint8)


def read_mask(path, palette=None):
    """A mask PNG as uint8 class ids `(H, W)`.

    - mode "P" (palette PNG): the palette *indices* are the class ids, the
      colours are ignored;
    - mode "L", "I", "I;16" (greyscale): the values are the class ids (<= 255);
    - mode "1": 0 and 1;
    - mode "RGB"/"RGBA": needs `palette`, a sequence of (r, g, b) colours where
      the position is the class id, or a dict {(r, g, b): class id} (to map a
      colour to 255, say). Alpha is ignored. Every colour must be listed.
    """
    from PIL import Image

    path = Path(path)
    with Image.open(path) as mask:
        if mask.format != "PNG":
            raise ValueError(_not_png_message(path, mask.format))
        mode = mask.mode
        if mode in ("P", "L", "1"):
            return np.asarray(mask).astype(np.uint8)
        if mode.startswith("I"):
            return _greyscale_ids(np.asarray(mask), path, mode)
        if mode in ("RGB", "RGBA"):
            return _colours_to_ids(np.asarray(mask.convert("RGB")), palette, path)
    raise ValueError(
        f"Mask {path} has PIL mode {mode!r}; expected a palette ('P'), greyscale ('L', 'I', "
        "'I;16') or RGB PNG."
    )


def _greyscale_ids(values, path, mode):
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ValueError(
            f"Mask {path} (mode {mode!r}) has values in [{values.min()}, {values.max()}]; "
            "class ids must be in [0, 255] (255 = ignore)."
        )
    return values.astype(np.uint8)


def _colour_codes(rgb):
    """(..., 3) uint8 colours -> (...) int32 codes 0xRRGGBB."""
    rgb = np.asarray(rgb, dtype=np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _palette_table(palette):
    """Sorted colour codes `(K,)` and their class ids `(K,)` from a palette."""
    items = palette.items() if isinstance(palette, dict) else enumerate(palette)
    colours, ids = [], []
    for a, b in items:
        colour, class_id = (a, b) if isinstance(palette, dict) else (b, a)
        if len(colour) != 3 or not 0 <= int(class_id) <= 255:
            raise ValueError(
                f"Bad palette entry {colour!r} -> {class_id!r}: colours are (r, g, b) and "
                "class ids are in [0, 255]."
            )
        colours.append(tuple(int(c) for c in colour))
        ids.append(int(class_id))
    codes = _colour_codes(np.array(colours, dtype=np.int32).reshape(-1, 3))
    if len(np.unique(codes)) != len(codes):
        raise ValueError("The palette lists the same colour for two classes.")
    order = np.argsort(codes)
    return codes[order], np.array(ids, dtype=np.uint8)[order]


def _colours_to_ids(rgb, palette, path):
    """(H, W, 3) uint8 colours -> (H, W) uint8 class ids through `palette`."""
    if palette is None:
        raise ValueError(
            f"Mask {path} is an RGB image. Masks must store class ids: save them as "
            "palette ('P') or greyscale PNGs whose values are the class ids, or pass "
            "palette=[(r, g, b) of class 0, (r, g, b) of class 1, ...] to map colours to ids."
        )
    codes, ids = _palette_table(palette)
    pixels = _colour_codes(rgb)
    position = np.clip(np.searchsorted(codes, pixels), 0, len(codes) - 1)
    known = codes[position] == pixels
    if not known.all():
        unknown = np.unique(pixels[~known])
        shown = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in unknown[:5].tolist()]
        raise ValueError(
            f"Mask {path} has {len(unknown)} colour(s) that are not in the palette "
            f"({int((~known).sum())} pixels), e.g. {shown}. Add them to the palette "
            "(a dict {(r, g, b): 255} maps a colour to ignore)."
        )
    return ids[position]


# ---------------------------------------------------------------- label values


def convert_labels(label, reduce_zero_label=False):
    """Apply the label convention to uint8 ids `(H, W)`.

    `reduce_zero_label` (ADE20K): 0 ("other") -> 255, v -> v - 1, 255 stays 255.
    """
    label = np.asarray(label, dtype=np.uint8)
    if not reduce_zero_label:
        return label
    return np.where((label == 0) | (label == IGNORE_INDEX), IGNORE_INDEX, label - 1).astype(
        np.uint8
    )


def _out_of_range(label, num_classes):
    """Sorted values of `label` that are neither a class id nor 255."""
    values = np.unique(label)
    return values[(values >= num_classes) & (values != IGNORE_INDEX)]


def _range_message(path, bad, num_classes, reduce_zero_label):
    hint = (
        "" if reduce_zero_label else
        " If class 0 means 'unlabelled' (as in ADE20K), pass reduce_zero_label=True."
    )
    return (
        f"Mask {path} has values {bad[:_MAX_LISTED].tolist()} outside [0, {num_classes}) "
        f"and not 255 (ignore) after the label convention "
        f"(reduce_zero_label={reduce_zero_label}). Check num_classes.{hint}"
    )


def load_pair(image_path, mask_path, num_classes, palette=None, reduce_zero_label=False):
    """Read one pair: uint8 image `(H, W, 3)` and uint8 labels `(H, W)` in [0, C) or 255.

    Raises a ValueError naming the mask if a value is out of range.
    """
    image = read_image(image_path)
    label = convert_labels(read_mask(mask_path, palette), reduce_zero_label)
    bad = _out_of_range(label, num_classes)
    if bad.size:
        raise ValueError(_range_message(mask_path, bad, num_classes, reduce_zero_label))
    return image, label


def scan_labels(pairs, num_classes, palette=None, reduce_zero_label=False):
    """Read every mask up front; raise one ValueError listing all files with bad values."""
    problems = []
    for _, mask_path in pairs:
        label = convert_labels(read_mask(mask_path, palette), reduce_zero_label)
        bad = _out_of_range(label, num_classes)
        if bad.size:
            problems.append(f"{mask_path}: {bad[:_MAX_LISTED].tolist()}")
    if problems:
        raise ValueError(
            f"{len(problems)} masks have values outside [0, {num_classes}) and not 255 (ignore) "
            f"with reduce_zero_label={reduce_zero_label}: {_joined(problems)}. Check "
            "num_classes and reduce_zero_label."
        )


# ---------------------------------------------------------------- tf.data


def decoded_dataset(pairs, num_classes, palette=None, reduce_zero_label=False, shuffle_seed=None):
    """Unbatched `tf.data.Dataset` of (uint8 image `(H, W, 3)`, uint8 labels `(H, W)`).

    With `shuffle_seed`, the file paths are shuffled (cheaply, before any
    decoding) with a new order every epoch.
    """
    import tensorflow as tf

    images = [str(image) for image, _ in pairs]
    masks = [str(mask) for _, mask in pairs]
    paths = tf.data.Dataset.from_tensor_slices((images, masks))
    if shuffle_seed is not None:
        paths = paths.shuffle(len(pairs), seed=shuffle_seed, reshuffle_each_iteration=True)

    def load(image_path, mask_path):
        return load_pair(
            image_path.decode(), mask_path.decode(), num_classes, palette, reduce_zero_label
        )

    def decode(image_path, mask_path):
        image, label = tf.numpy_function(
            load, [image_path, mask_path], [tf.uint8, tf.uint8], stateful=False
        )
        image.set_shape((None, None, 3))
        label.set_shape((None, None))
        return image, label

    return paths.map(decode, num_parallel_calls=tf.data.AUTOTUNE)


def folder_dataset(
    root,
    *,
    num_classes,
    layout="stem",
    split=None,
    images_dir="images",
    masks_dir="masks",
    palette=None,
    reduce_zero_label=None,
    check_sizes=True,
    check_labels=False,
    training=False,
    **pipeline_kwargs,
):
    """A batched `tf.data.Dataset` for `fit`/`evaluate` from a folder of images and masks.

    Returns what `keras_dtop.data.pipeline.segmentation_pipeline` makes:
    float32 images `(B, H, W, 3)` with pixels in [0, 255] and int32 labels
    `(B, H, W)` in `[0, num_classes)` or 255. `pipeline_kwargs` (batch_size,
    crop_size, base_scale, seed, repeat, augment, ...) go to it.

    `reduce_zero_label` defaults to True for layout "ade20k" and False
    otherwise. `check_sizes` compares image and mask sizes from the file
    headers before anything is decoded; `check_labels` reads every mask up
    front so that out-of-range values fail before training (they also fail
    during iteration, when that mask is decoded).
    """
    from keras_dtop.data.pipeline import segmentation_pipeline

    pairs = pair_files(root, layout, split, images_dir, masks_dir)
    if reduce_zero_label is None:
        reduce_zero_label = layout == "ade20k"
    if check_sizes:
        check_pairs(pairs)
    if check_labels:
        scan_labels(pairs, num_classes, palette, reduce_zero_label)
    seed = pipeline_kwargs.get("seed", 0) if training else None
    raw = decoded_dataset(pairs, num_classes, palette, reduce_zero_label, shuffle_seed=seed)
    return segmentation_pipeline(raw, num_classes=num_classes, training=training, **pipeline_kwargs)
