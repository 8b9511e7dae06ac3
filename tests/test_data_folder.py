"""Datasets from image and mask files: the three folder layouts, mask formats,
the errors for broken folders, and fit from a folder on the current backend."""

import numpy as np
import pytest
from PIL import Image
from test_training import NUM_CLASSES, small_model

from keras_dtop.data.folder import (
    VOC_CLASS_NAMES,
    check_pairs,
    decoded_dataset,
    folder_dataset,
    pair_files,
    read_image,
    read_mask,
    scan_labels,
)

# Palette colours that are deliberately not the class ids: index i has colour
# ((200 - i) % 256, 7 * i % 256, 100), so reading colours instead of indices would fail.
PALETTE = [((200 - i) % 256, 7 * i % 256, 100) for i in range(256)]


def labels_map(height=6, width=8, num_classes=NUM_CLASSES, seed=0):
    """uint8 `(H, W)` ids in [0, num_classes) with a 255 border on the right."""
    ids = np.random.default_rng(seed).integers(0, num_classes, (height, width)).astype(np.uint8)
    ids[:, -1] = 255
    return ids


def write_image(path, size=(8, 6), seed=0):
    """A random RGB image of `size` = (width, height); format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_mask(path, ids, mode="P", palette=PALETTE):
    """Save `ids` (H, W) as a palette ("P"), greyscale ("L") or colour ("RGB") mask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = np.asarray(ids, np.uint8)
    if mode == "P":
        image = Image.fromarray(ids)
        image.putpalette([c for colour in palette for c in colour])
        assert image.mode == "P"
    elif mode == "L":
        image = Image.fromarray(ids)
    else:
        image = Image.fromarray(np.array(palette, np.uint8)[ids])
    image.save(path)
    return path


def stem_folder(root, count=2, size=(8, 6)):
    """`count` pairs in the "stem" layout; returns the label maps by stem."""
    labels = {}
    for i in range(count):
        stem = f"img{i}"
        write_image(root / "images" / f"{stem}.jpg", size, seed=i)
        labels[stem] = labels_map(size[1], size[0], seed=i)
        write_mask(root / "masks" / f"{stem}.png", labels[stem])
    return labels


# ---------------------------------------------------------------- layouts and formats


def test_stem_layout_palette_and_greyscale_masks(tmp_path):
    ids_p, ids_l = labels_map(seed=1), labels_map(seed=2)
    write_image(tmp_path / "images" / "a.jpg")
    write_image(tmp_path / "images" / "b.PNG")
    write_mask(tmp_path / "masks" / "a.png", ids_p, mode="P")
    write_mask(tmp_path / "masks" / "b.png", ids_l, mode="L")
    (tmp_path / "masks" / "notes.txt").write_text("not a mask")

    pairs = pair_files(tmp_path)
    assert [(i.name, m.name) for i, m in pairs] == [("a.jpg", "a.png"), ("b.PNG", "b.png")]
    assert Image.open(pairs[0][1]).mode == "P"
    np.testing.assert_array_equal(read_mask(pairs[0][1]), ids_p)  # indices, not colours
    np.testing.assert_array_equal(read_mask(pairs[1][1]), ids_l)
    image = read_image(pairs[0][0])
    assert image.dtype == np.uint8 and image.shape == (6, 8, 3)

    ds = folder_dataset(tmp_path, num_classes=NUM_CLASSES, training=False, batch_size=1)
    got = [labels for _, labels in ds.as_numpy_iterator()]
    np.testing.assert_array_equal(got[0][0], ids_p)
    np.testing.assert_array_equal(got[1][0], ids_l)


def test_stem_layout_with_split_and_custom_dirs(tmp_path):
    write_image(tmp_path / "img" / "val" / "x.png")
    write_mask(tmp_path / "ann" / "val" / "x.png", labels_map())
    pairs = pair_files(tmp_path, split="val", images_dir="img", masks_dir="ann")
    assert pairs == [(tmp_path / "img" / "val" / "x.png", tmp_path / "ann" / "val" / "x.png")]


def test_rgb_mask_with_palette(tmp_path):
    palette = PALETTE[:NUM_CLASSES]
    ids = labels_map()
    ids[ids == 255] = 3
    path = write_mask(tmp_path / "m.png", ids, mode="RGB", palette=palette)
    assert Image.open(path).mode == "RGB"
    np.testing.assert_array_equal(read_mask(path, palette=palette), ids)
    # A dict also maps a colour to 255 (ignore).
    mapping = {colour: i for i, colour in enumerate(palette)}
    mapping[palette[3]] = 255
    np.testing.assert_array_equal(read_mask(path, palette=mapping), np.where(ids == 3, 255, ids))


def test_ade20k_layout_reduces_zero_label(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    ade = np.array([[0, 1, 2, 150], [255, 3, 1, 0]], np.uint8)
    for split in ("training", "validation"):
        write_image(root / "images" / split / f"ADE_{split}_00000001.jpg", size=(4, 2))
        write_mask(root / "annotations" / split / f"ADE_{split}_00000001.png", ade, mode="L")

    assert pair_files(tmp_path, "ade20k", "train") == pair_files(root, "ade20k", "training")
    (pair,) = pair_files(root, "ade20k", "val")
    assert pair[0].parent.name == "validation"

    ds = folder_dataset(root, layout="ade20k", split="val", num_classes=150, batch_size=1)
    (labels,) = [labels[0] for _, labels in ds.as_numpy_iterator()]
    np.testing.assert_array_equal(labels, [[255, 0, 1, 149], [255, 2, 0, 255]])
    with pytest.raises(ValueError, match="split"):
        pair_files(root, "ade20k")


def test_voc_layout_split_file_and_border(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for i, name in enumerate(["2007_000032", "2007_000033", "2007_000039"]):
        write_image(root / "JPEGImages" / f"{name}.jpg", seed=i)
        ids = labels_map(num_classes=len(VOC_CLASS_NAMES), seed=i)
        write_mask(root / "SegmentationClass" / f"{name}.png", ids)
    write_image(root / "JPEGImages" / "2007_000040.jpg")  # an image without a mask is fine
    splits = root / "ImageSets" / "Segmentation"
    splits.mkdir(parents=True)
    (splits / "train.txt").write_text("2007_000032\n2007_000039\n")

    assert len(VOC_CLASS_NAMES) == 21
    train = pair_files(tmp_path, "voc", "train")  # the VOCdevkit folder is found
    assert [m.stem for _, m in train] == ["2007_000032", "2007_000039"]
    assert len(pair_files(root, "voc")) == 3
    (splits / "val.txt").write_text("2007_000040\n")
    with pytest.raises(ValueError, match=r"val\.txt are missing \(1: .*2007_000040\.png"):
        pair_files(root, "voc", "val")
    labels = read_mask(train[0][1])
    assert (labels[:, -1] == 255).all() and labels.max() == 255

    ds = folder_dataset(root, layout="voc", split="training", num_classes=21, batch_size=1)
    got = [labels[0] for _, labels in ds.as_numpy_iterator()]
    np.testing.assert_array_equal(got[0], labels)


# ---------------------------------------------------------------- errors


def test_missing_mask_and_extra_mask(tmp_path):
    stem_folder(tmp_path)
    write_image(tmp_path / "images" / "lonely.jpg")
    with pytest.raises(ValueError, match=r"images without a mask \(1: .*lonely\.jpg"):
        pair_files(tmp_path)
    (tmp_path / "images" / "lonely.jpg").unlink()
    write_mask(tmp_path / "masks" / "orphan.png", labels_map())
    with pytest.raises(ValueError, match=r"masks without an image \(1: .*orphan\.png"):
        pair_files(tmp_path)


def test_many_unpaired_files_are_counted(tmp_path):
    stem_folder(tmp_path, count=1)
    for i in range(13):
        write_image(tmp_path / "images" / f"extra{i:02d}.png")
    with pytest.raises(ValueError, match=r"\(13: .*extra09\.png, \.\.\. \(3 more\)") as info:
        pair_files(tmp_path)
    assert "extra12" not in str(info.value)


def test_size_mismatch_names_both_files_and_sizes(tmp_path):
    stem_folder(tmp_path)
    write_mask(tmp_path / "masks" / "img1.png", labels_map(height=6, width=10))
    pairs = pair_files(tmp_path)
    with pytest.raises(ValueError, match=r"img1\.jpg is 8x6 but .*img1\.png is 10x6"):
        check_pairs(pairs)
    with pytest.raises(ValueError, match="differ in size"):
        folder_dataset(tmp_path, num_classes=NUM_CLASSES)
    folder_dataset(tmp_path, num_classes=NUM_CLASSES, check_sizes=False)


def test_jpeg_masks_are_refused(tmp_path):
    stem_folder(tmp_path)
    (tmp_path / "masks" / "img1.png").unlink()
    Image.fromarray(labels_map()).save(tmp_path / "masks" / "img1.jpg")
    with pytest.raises(ValueError, match=r"img1\.jpg.*lossy"):
        pair_files(tmp_path)
    # A JPEG saved under a .png name is caught from its header.
    (tmp_path / "masks" / "img1.jpg").rename(tmp_path / "masks" / "img1.png")
    with pytest.raises(ValueError, match=r"img1\.png is a JPEG file.*lossy"):
        check_pairs(pair_files(tmp_path))
    with pytest.raises(ValueError, match="JPEG"):
        read_mask(tmp_path / "masks" / "img1.png")


def test_rgb_mask_without_palette_and_unknown_colour(tmp_path):
    path = write_mask(tmp_path / "rgb.png", labels_map(), mode="RGB")
    with pytest.raises(ValueError, match=r"rgb\.png is an RGB image.*palette="):
        read_mask(path)
    palette = PALETTE[1:NUM_CLASSES] + [PALETTE[255]]  # no colour for id 0
    with pytest.raises(ValueError, match=r"rgb\.png has 1 colour\(s\) .*\[\(200, 0, 100\)\]"):
        read_mask(path, palette=palette)


def test_out_of_range_values(tmp_path):
    labels = stem_folder(tmp_path)
    bad = labels["img1"].copy()
    bad[0, 0] = 9
    write_mask(tmp_path / "masks" / "img1.png", bad)
    pairs = pair_files(tmp_path)
    with pytest.raises(ValueError, match=r"1 masks .*img1\.png: \[9\]"):
        scan_labels(pairs, NUM_CLASSES)
    with pytest.raises(ValueError, match=r"img1\.png: \[9\]"):
        folder_dataset(tmp_path, num_classes=NUM_CLASSES, check_labels=True)
    scan_labels(pairs, 10)

    # Without the up-front scan, decoding the mask fails and names it.
    import tensorflow as tf

    with pytest.raises(tf.errors.OpError, match=r"img1\.png has values \[9\] outside \[0, 6\)"):
        list(decoded_dataset(pairs, NUM_CLASSES).as_numpy_iterator())
    with pytest.raises(tf.errors.OpError, match=r"img1\.png has values \[9\]"):
        list(folder_dataset(tmp_path, num_classes=NUM_CLASSES, batch_size=1))

    # 16-bit masks: values above 255 cannot be class ids.
    wide = np.full((2, 3), 300, np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    with pytest.raises(ValueError, match=r"wide\.png .*\[300, 300\]"):
        read_mask(tmp_path / "wide.png")


def test_missing_directories_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"images folder at .*images for layout 'stem'"):
        pair_files(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match=r"masks folder at .*masks"):
        pair_files(tmp_path)
    (tmp_path / "masks").mkdir()
    with pytest.raises(ValueError, match="No image/mask pairs"):
        pair_files(tmp_path)
    (tmp_path / "images" / "training").mkdir()
    with pytest.raises(FileNotFoundError, match=r"annotations[/\\]training for layout 'ade20k'"):
        pair_files(tmp_path, "ade20k", "training")
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        pair_files(tmp_path, "voc", "train")
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    with pytest.raises(FileNotFoundError, match=r"Segmentation[/\\]val\.txt"):
        pair_files(tmp_path, "voc", "val")
    with pytest.raises(ValueError, match="Unknown layout"):
        pair_files(tmp_path, "cityscapes")


# ---------------------------------------------------------------- the dataset


@pytest.mark.parametrize("training", [True, False])
def test_dataset_elements(tmp_path, training):
    stem_folder(tmp_path, count=3, size=(20, 12))
    ds = folder_dataset(
        tmp_path,
        num_classes=NUM_CLASSES,
        training=training,
        batch_size=2 if training else 1,
        crop_size=(16, 16),
    )
    images_spec, labels_spec = ds.element_spec
    assert images_spec.dtype.name == "float32" and labels_spec.dtype.name == "int32"
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == (1 if training else 3)  # training drops the last partial batch
    for images, labels in batches:
        expected = (2, 16, 16) if training else (1, 12, 20)
        assert images.shape == expected + (3,) and labels.shape == expected
        assert images.min() >= 0.0 and images.max() <= 255.0
        assert set(np.unique(labels)) <= set(range(NUM_CLASSES)) | {255}


def test_training_shuffles_paths_deterministically(tmp_path):
    stem_folder(tmp_path, count=6)
    pairs = pair_files(tmp_path)
    first = [image for image, _ in decoded_dataset(pairs, NUM_CLASSES, shuffle_seed=3)]
    again = [image for image, _ in decoded_dataset(pairs, NUM_CLASSES, shuffle_seed=3)]
    in_order = [image for image, _ in decoded_dataset(pairs, NUM_CLASSES)]
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    np.testing.assert_array_equal(np.stack(in_order)[0], read_image(pairs[0][0]))
    assert not np.array_equal(np.stack(first), np.stack(in_order))


def test_fit_from_a_folder(tmp_path):
    stem_folder(tmp_path, count=4, size=(40, 36))
    ds = folder_dataset(
        tmp_path,
        num_classes=NUM_CLASSES,
        training=True,
        batch_size=2,
        crop_size=(32, 32),
        repeat=False,
    )
    model = small_model()
    model.compile()
    before = [np.array(w) for w in model.get_weights()]
    history = model.fit(ds, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0]), history
    after = model.get_weights()
    assert len(before) == len(after) > 0
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
