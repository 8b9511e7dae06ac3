"""The method's augmentation and the batching pipeline (keras_dtop.data.augment / pipeline)."""

import numpy as np
import pytest
import tensorflow as tf

from keras_dtop.data.augment import _crop_is_mixed, photometric_distortion, train_augmentation
from keras_dtop.data.pipeline import array_dataset, segmentation_pipeline
from keras_dtop.models.presets import IMAGENET_MEAN

STEP = 60  # image value = label * STEP: the image tells its own label


def block_pattern(height=48, width=64, block=8, classes=4):
    yy, xx = np.mgrid[0:height, 0:width]
    label = ((yy // block) * 3 + (xx // block)) % classes
    label[:4, :4] = 255  # an ignored corner
    image = np.repeat((np.where(label == 255, 0, label) * STEP)[..., None], 3, axis=-1)
    return image.astype("uint8"), label.astype("uint8")


def augment(image, label, seed, **kwargs):
    kwargs.setdefault("photometric", False)
    out = train_augmentation(image, label, tf.constant([7, seed], tf.int64), (32, 32), **kwargs)
    return out[0].numpy(), out[1].numpy()


def test_crop_and_flip_keep_image_and_label_aligned():
    image, label = block_pattern()
    flipped = 0
    for seed in range(12):
        out_image, out_label = augment(image, label, seed, ratio_range=None)
        assert out_image.shape == (32, 32, 3) and out_label.shape == (32, 32)
        labelled = out_label != 255
        np.testing.assert_array_equal(out_image[..., 0][labelled], out_label[labelled] * STEP)
        flipped += not np.array_equal(out_label, _unflipped_crop(label, out_label))
    assert 0 < flipped < 12  # both branches of the flip ran


def _unflipped_crop(label, crop):
    """The crop of `label` equal to `crop`, if one exists without flipping; else None."""
    h, w = crop.shape
    for top in range(label.shape[0] - h + 1):
        for left in range(label.shape[1] - w + 1):
            if np.array_equal(label[top : top + h, left : left + w], crop):
                return crop
    return None


def test_resize_keeps_alignment_and_never_invents_labels():
    image, label = block_pattern()
    for seed in range(8):
        out_image, out_label = augment(image, label, seed, base_scale=(128, 48))
        assert set(np.unique(out_label)) <= set(np.unique(label))
        labelled = out_label != 255
        agree = np.mean(np.round(out_image[..., 0][labelled] / STEP) == out_label[labelled])
        assert agree > 0.9  # bilinear image vs nearest labels differ only on block edges


def test_small_image_is_padded_with_mean_colour_and_ignore_label():
    image, label = block_pattern(height=16, width=24)
    out_image, out_label = augment(image, label, 0, ratio_range=None, flip_probability=0.0)
    assert np.all(out_label[16:] == 255) and np.all(out_label[:, 24:] == 255)
    np.testing.assert_allclose(out_image[20, 30], IMAGENET_MEAN, rtol=1e-6)
    np.testing.assert_array_equal(out_label[:16, :24], label)


def test_same_seed_same_output_other_seed_other_output():
    image, label = block_pattern()
    first = augment(image, label, 3, photometric=True)
    again = augment(image, label, 3, photometric=True)
    other = augment(image, label, 4, photometric=True)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_photometric_distortion_stays_in_range_and_changes_colours():
    image = tf.constant(np.random.default_rng(0).uniform(0, 255, (8, 8, 3)), tf.float32)
    changed = 0
    for seed in range(6):
        out = photometric_distortion(image, tf.constant([1, seed], tf.int64)).numpy()
        assert out.shape == (8, 8, 3) and out.min() >= 0 and out.max() <= 255
        changed += not np.allclose(out, image.numpy())
    assert changed >= 4


def test_crop_rule_rejects_crops_dominated_by_one_class():
    mostly_zero = tf.constant(np.pad(np.ones((2, 2), "int32"), ((0, 8), (0, 8))))
    balanced = tf.constant(np.repeat([[0, 1]], 10, axis=0).repeat(5, axis=1))
    single = tf.zeros((4, 4), tf.int32)
    assert not _crop_is_mixed(mostly_zero, 0.75)
    assert _crop_is_mixed(balanced, 0.75)
    assert not _crop_is_mixed(single, 0.75)
    # 255 does not count as a class: two ignore-heavy halves are still "one class".
    assert not _crop_is_mixed(tf.constant([[0, 255], [0, 255]]), 0.75)


def test_class_balanced_crop_finds_the_rare_class_more_often():
    label = np.zeros((96, 96), "uint8")
    label[70:90, 70:90] = 1
    image = np.zeros((96, 96, 3), "uint8")

    def crops_with_both(ratio):
        found = 0
        for seed in range(16):
            _, out = augment(image, label, seed, ratio_range=None, flip_probability=0.0, cat_max_ratio=ratio)
            found += len(set(np.unique(out)) - {255}) > 1
        return found

    assert crops_with_both(0.75) > crops_with_both(1.0)


def test_training_pipeline_batches_are_deterministic_and_valid():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 40, 56, 3)).astype("uint8")
    labels = rng.integers(0, 3, (6, 40, 56)).astype("uint8")
    labels[:, :2] = 255

    def run():
        ds = segmentation_pipeline(
            array_dataset(images, labels), num_classes=3, training=True, batch_size=2, crop_size=(32, 32), seed=5
        )
        return [(x.numpy(), y.numpy()) for x, y in ds]

    first, second = run(), run()
    assert len(first) == 3
    for (x, y), (x2, y2) in zip(first, second):
        assert x.dtype == np.float32 and y.dtype == np.int32
        assert x.shape == (2, 32, 32, 3) and y.shape == (2, 32, 32)
        assert set(np.unique(y)) <= {0, 1, 2, 255}
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)


def test_evaluation_pipeline_pads_varied_sizes_with_mean_and_ignore():
    small = (np.full((20, 30, 3), 9, "uint8"), np.ones((20, 30), "uint8"))
    large = (np.full((24, 40, 3), 9, "uint8"), np.zeros((24, 40), "uint8"))
    raw = tf.data.Dataset.from_generator(
        lambda: iter([small, large]),
        output_signature=(tf.TensorSpec((None, None, 3), tf.uint8), tf.TensorSpec((None, None), tf.uint8)),
    )
    images, labels = next(iter(segmentation_pipeline(raw, num_classes=2, training=False, size_divisor=16)))
    assert images.shape == (2, 32, 48, 3) and labels.shape == (2, 32, 48)
    np.testing.assert_array_equal(labels[0, :20, :30], 1)
    assert np.all(labels.numpy()[0, 20:] == 255) and np.all(labels.numpy()[1, :, 40:] == 255)
    np.testing.assert_allclose(images[0, 25, 40], IMAGENET_MEAN, rtol=1e-6)
    np.testing.assert_allclose(images[0, 5, 5], [9, 9, 9])


def test_pipeline_rejects_bad_labels_and_settings():
    images, labels = np.zeros((2, 8, 8, 3), "uint8"), np.zeros((2, 8, 8), "uint8")
    labels[1, 3, 3] = 7
    ds = segmentation_pipeline(array_dataset(images, labels), num_classes=4, training=False, batch_size=2)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"Labels must be in \[0, 4\) or 255"):
        list(ds)
    with pytest.raises(ValueError, match="crop_size"):
        segmentation_pipeline(array_dataset(images, labels), num_classes=4, training=True, crop_size=(0, 8))
    with pytest.raises(ValueError, match="unbatched"):
        batched = array_dataset(images, labels).batch(2)
        segmentation_pipeline(batched, num_classes=4, training=True)


def test_augment_off_keeps_the_base_scale_and_refuses_augmentation_settings():
    images, labels = np.zeros((2, 20, 40, 3), "uint8"), np.ones((2, 20, 40), "uint8")
    ds = segmentation_pipeline(
        array_dataset(images, labels), num_classes=2, training=True, batch_size=2,
        crop_size=(32, 32), base_scale=(80, 40), augment=False,
    )  # fmt: skip
    _, y = next(iter(ds))
    # 20x40 resized by exactly 2 to 40x80, then cropped: no padding anywhere.
    assert np.all(y.numpy() == 1)
    with pytest.raises(ValueError, match="augment=False ignores"):
        segmentation_pipeline(array_dataset(images, labels), num_classes=2, training=True, augment=False, photometric=True)
