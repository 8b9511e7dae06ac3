"""tensorflow-datasets sources: label mappings, registry errors, mocked loading.

No data is downloaded: `tfds.testing.mock_data` replaces the builders'
`as_dataset` with random examples made from the real feature specs (and makes
`download_and_prepare` a no-op), so the code paths are the real ones.
"""

import functools

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.testing.mocking import RandomFakeGenerator

from keras_dtop.data.tfds_datasets import (
    CITYSCAPES_CLASS_NAMES,
    CITYSCAPES_EVAL_IDS,
    TFDS_DATASETS,
    cityscapes_ids_to_train_ids,
    get_tfds_spec,
    panoptic_to_labels,
    pet_trimap_to_labels,
    tfds_class_names,
    tfds_dataset,
    tfds_examples,
)

IGNORE = 255


def _valid_labels(labels, num_classes):
    labels = np.asarray(labels)
    return bool(np.all((labels == IGNORE) | ((labels >= 0) & (labels < num_classes))))


# ---------------------------------------------------------------- label mappings


def test_pet_trimap_mapping():
    trimap = tf.constant([[1, 2, 3], [0, 4, 255]], tf.uint8)[..., None]
    labels = pet_trimap_to_labels(trimap)
    assert labels.dtype == tf.int32
    np.testing.assert_array_equal(labels, [[1, 0, IGNORE], [IGNORE, IGNORE, IGNORE]])


def test_cityscapes_mapping():
    ids = tf.constant([[7, 33, 0, 255], [8, 6, 34, 26]], tf.uint8)[..., None]
    labels = cityscapes_ids_to_train_ids(ids)
    assert labels.dtype == tf.int32
    np.testing.assert_array_equal(labels, [[0, 18, IGNORE, IGNORE], [1, IGNORE, IGNORE, 13]])


def test_cityscapes_full_table():
    every_id = tf.range(256, dtype=tf.int32)[:, None, None]  # (256, 1, 1)
    labels = cityscapes_ids_to_train_ids(every_id)[:, 0].numpy()
    expected = np.full(256, IGNORE)
    expected[list(CITYSCAPES_EVAL_IDS)] = np.arange(19)
    np.testing.assert_array_equal(labels, expected)
    # -1 (license plate) in a signed dtype is ignored too.
    assert cityscapes_ids_to_train_ids(tf.constant([[[-1]]]))[0, 0] == IGNORE
    assert len(CITYSCAPES_CLASS_NAMES) == 19


def _panoptic_png(segment_ids):
    """(H, W, 3) uint8 PNG pixels for integer segment ids (H, W)."""
    ids = np.asarray(segment_ids)
    return tf.constant(np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1), tf.uint8)


def test_panoptic_mapping():
    big = 2 * 65536 + 3 * 256 + 7  # uses all three channels
    image = _panoptic_png([[0, 300], [big, 42]])  # 42: no object has this id
    labels = panoptic_to_labels(image, tf.constant([big, 300], tf.int64), tf.constant([5, 120], tf.int64))
    assert labels.dtype == tf.int32
    np.testing.assert_array_equal(labels, [[IGNORE, 120], [5, IGNORE]])


def test_panoptic_zero_objects_and_void_id():
    image = _panoptic_png([[0, 1], [2, 3]])
    none = panoptic_to_labels(image, tf.zeros([0], tf.int64), tf.zeros([0], tf.int64))
    np.testing.assert_array_equal(none, np.full((2, 2), IGNORE))
    # Segment id 0 is void even if an object claims it; an out-of-range label is ignored.
    void = panoptic_to_labels(image, tf.constant([0, 1, 3]), tf.constant([4, 6, 133]))
    np.testing.assert_array_equal(void, [[IGNORE, 6], [IGNORE, IGNORE]])


def test_panoptic_mapping_traces():
    fn = tf.function(panoptic_to_labels, input_signature=[
        tf.TensorSpec([None, None, 3], tf.uint8),
        tf.TensorSpec([None], tf.int64),
        tf.TensorSpec([None], tf.int64),
    ])  # fmt: skip
    labels = fn(_panoptic_png([[9, 9, 4]]), tf.constant([4, 9], tf.int64), tf.constant([1, 2], tf.int64))
    np.testing.assert_array_equal(labels, [[2, 2, 1]])


# ---------------------------------------------------------------- registry and errors


@pytest.mark.parametrize(
    "name, why",
    [
        ("scene_parse150", "instance annotations"),
        ("voc", "no segmentation"),
        ("voc/2012", "no segmentation"),
        ("pascal_context", "not in tfds"),
        ("coco_stuff", "not in tfds"),
        ("coco/2017", "2017_panoptic"),
        ("no_such_dataset", "Supported names"),
    ],
)
def test_unsupported_names(name, why):
    with pytest.raises(ValueError, match="not supported") as info:
        tfds_dataset(name, "train")
    message = str(info.value)
    assert why in message
    assert "Supported names: cityscapes, coco_panoptic, oxford_iiit_pet" in message


def test_scene_parse150_error_points_to_folder_pipeline():
    with pytest.raises(ValueError, match="ADE20K-150") as info:
        get_tfds_spec("scene_parse150")
    assert "folder pipeline" in str(info.value)


def test_tfds_names_resolve():
    for key, spec in TFDS_DATASETS.items():
        assert get_tfds_spec(spec.tfds_name) is spec
        assert spec.class_names is None or len(spec.class_names) == spec.num_classes
        assert spec.note
    assert tfds_class_names("oxford_iiit_pet") == ("background", "pet")


def test_coco_class_names_from_builder():
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE):
        names = tfds_class_names("coco/2017_panoptic")
    assert len(names) == TFDS_DATASETS["coco_panoptic"].num_classes == 133


@pytest.mark.parametrize("name", ["oxford_iiit_pet", "cityscapes"])
def test_not_prepared_raises_file_not_found(name, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        tfds_dataset(name, "train", data_dir=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message and "tfds build" in message
    if name == "cityscapes":
        assert "--manual_dir" in message and "gtFine_trainvaltest.zip" in message


def test_missing_manual_archives_raise_file_not_found(tmp_path, monkeypatch):
    """Cityscapes' builder asserts that the manual archives exist; download=True
    turns that into a FileNotFoundError with the preparation steps."""

    def missing_archives(self, **kwargs):
        raise AssertionError("You must download the dataset files manually")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", missing_archives)
    manual = tmp_path / "manual"
    with pytest.raises(FileNotFoundError, match="download the dataset files manually") as info:
        tfds_examples("cityscapes", "train", data_dir=str(tmp_path), download=True, manual_dir=str(manual))
    assert f"--manual_dir={manual}" in str(info.value)


# ---------------------------------------------------------------- mocked tfds data


def _consistent_fake_data(num_examples, max_value=None):
    """`as_dataset_fn` for `mock_data`: tfds's random examples, but every
    unknown dimension is 10, so an image and its mask have the same size.
    (The default generator draws each feature's unknown sizes independently,
    which real data never does; see `test_default_mock_sizes_disagree`.)"""

    def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
        features = self.info.features
        specs = features.get_tensor_info()
        generator = functools.partial(
            RandomFakeGenerator,
            features,
            num_examples,
            max_value=max_value,
            constant_dynamic_shape=True,
        )
        return tf.data.Dataset.from_generator(
            generator,
            output_types=tf.nest.map_structure(lambda t: t.dtype, specs),
            output_shapes=tf.nest.map_structure(lambda t: t.shape, specs),
        )

    return as_dataset


def _mock(name, num_examples=2):
    """mock_data for one dataset. Cityscapes has fixed sizes (1024, 2048), so
    the default generator already agrees; the others need equal sizes. Small
    `max_value`s make the random masks hit the interesting label values
    (trimap 0..3; panoptic ids that match the objects' ids)."""
    policy = tfds.testing.MockPolicy.USE_CODE
    if name == "cityscapes":
        return tfds.testing.mock_data(num_examples=num_examples, policy=policy)
    max_value = {"oxford_iiit_pet": 4, "coco_panoptic": 3}[name]
    return tfds.testing.mock_data(policy=policy, as_dataset_fn=_consistent_fake_data(num_examples, max_value))


@pytest.mark.parametrize("name", sorted(TFDS_DATASETS))
def test_mocked_examples(name):
    spec = TFDS_DATASETS[name]
    with _mock(name, num_examples=2):
        examples = tfds_examples(name, "train")
        assert examples.element_spec[0].dtype == tf.uint8
        assert examples.element_spec[1].dtype == tf.int32
        pairs = [(image.numpy(), label.numpy()) for image, label in examples]
    assert len(pairs) == 2
    labelled = 0
    for image, label in pairs:
        assert image.ndim == 3 and image.shape[-1] == 3
        assert label.shape == image.shape[:2]
        assert _valid_labels(label, spec.num_classes)
        labelled += int((label != IGNORE).sum())
    assert labelled > 0  # the mapping does not just ignore everything


@pytest.mark.parametrize("name", sorted(TFDS_DATASETS))
@pytest.mark.parametrize("training", [True, False])
def test_mocked_tfds_dataset(name, training):
    spec = TFDS_DATASETS[name]
    crop = (16, 24)
    kwargs = dict(batch_size=2, crop_size=crop) if training else dict(batch_size=1, base_scale=(32, 16))
    with _mock(name, num_examples=2):
        dataset = tfds_dataset(name, "validation", training=training, **kwargs)
        batches = [(images.numpy(), labels.numpy()) for images, labels in dataset]
    assert batches
    for images, labels in batches:
        assert images.dtype == np.float32 and labels.dtype == np.int32
        assert images.ndim == 4 and images.shape[-1] == 3
        assert labels.shape == images.shape[:3]
        if training:
            assert images.shape[:3] == (2, *crop)
        else:
            assert max(images.shape[1:3]) <= 32 and images.shape[0] == 1
        assert images.min() >= 0.0 and images.max() <= 255.0
        assert _valid_labels(labels, spec.num_classes)


def test_cityscapes_manual_dir_with_download(tmp_path):
    """download=True with a manual_dir goes through download_and_prepare (a no-op
    under mock_data) to the data."""
    with _mock("cityscapes", num_examples=1):
        examples = tfds_examples("cityscapes", "train", download=True, manual_dir=str(tmp_path))
        image, label = next(iter(examples))
    assert image.shape == (1024, 2048, 3) and label.shape == (1024, 2048)
    assert _valid_labels(label, 19)


def test_default_mock_sizes_disagree():
    """tfds's default fake examples give the pet image and mask different sizes;
    the size check turns that into a clear error instead of a bad crop."""
    with tfds.testing.mock_data(num_examples=1, policy=tfds.testing.MockPolicy.USE_CODE):
        examples = tfds_examples("oxford_iiit_pet", "train")
        with pytest.raises(tf.errors.InvalidArgumentError, match="differ from the image"):
            next(iter(examples))
