"""Segmentation datasets from tensorflow-datasets (tfds), as DToP batches.

`tfds_dataset(name, split)` loads a prepared tfds dataset, turns every
example into `(image uint8 (H, W, 3), label int32 (H, W))` with labels in
`[0, num_classes)` or 255 (ignore), and hands that to
`keras_dtop.data.pipeline.segmentation_pipeline`.

Supported (`TFDS_DATASETS`):

- `oxford_iiit_pet` (2 classes): the trimap, pet / background, borders ignored.
- `cityscapes` (19 classes, tfds config `semantic_segmentation`): labelIds
  mapped to the 19 standard trainIds. The archives need a Cityscapes login,
  so tfds only builds it from a manual download directory.
- `coco_panoptic` (133 classes, tfds `coco/2017_panoptic`): the panoptic PNG
  turned into per-pixel semantic labels (COCO-Panoptic semantic, not
  COCO-Stuff-164k).

Not available through tfds, and why (use the folder pipeline instead):

- `scene_parse150`: the tfds builder downloads ChallengeData2017
  `annotations_instance.tar`, i.e. *instance* masks, not the 150-class
  semantic `annotations/` of ADEChallengeData2016, so it cannot give
  ADE20K-150 labels. Its `test` split is in fact the validation set.
- `voc`: tfds has Pascal VOC with boxes and image labels only, no
  segmentation masks.
- Pascal-Context, COCO-Stuff (and ADE20K itself) have no tfds builder.
"""

import dataclasses
from typing import Callable

import tensorflow as tf
import tensorflow_datasets as tfds

from keras_dtop.data.labels import IGNORE_INDEX
from keras_dtop.data.pipeline import segmentation_pipeline

CITYSCAPES_CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

# Cityscapes labelIds of the 19 evaluated classes, in trainId order 0..18.
CITYSCAPES_EVAL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)

_PANOPTIC_VOID_ID = 0  # segment id 0: unlabelled pixels in COCO panoptic PNGs
_COCO_PANOPTIC_CLASSES = 133


def _lookup_table(mapping):
    """int32 `(256,)` table: `mapping[value]` where given, else 255."""
    table = [IGNORE_INDEX] * 256
    for value, label in mapping.items():
        table[value] = label
    return tf.constant(table, tf.int32)


def _apply_table(values, mapping):
    """Map integer `values` (any shape) through a 256-entry table; out of [0, 255] -> 255."""
    values = tf.cast(values, tf.int32)
    in_range = (values >= 0) & (values <= 255)
    mapped = tf.gather(_lookup_table(mapping), tf.clip_by_value(values, 0, 255))
    return tf.where(in_range, mapped, IGNORE_INDEX)


def pet_trimap_to_labels(trimap):
    """Oxford-IIIT Pet trimap `(H, W, 1)` (1 pet, 2 background, 3 border) -> int32 `(H, W)`.

    1 -> 1 ("pet"), 2 -> 0 ("background"), 3 and anything else -> 255.
    """
    return _apply_table(trimap[..., 0], {1: 1, 2: 0})


def cityscapes_ids_to_train_ids(label_ids):
    """Cityscapes labelIds `(H, W, 1)` -> the 19 trainIds, int32 `(H, W)`, others 255.

    Covers void ids 0..6, the unevaluated classes and the license plate (-1,
    stored as 255 in the uint8 PNG).
    """
    mapping = {label_id: train_id for train_id, label_id in enumerate(CITYSCAPES_EVAL_IDS)}
    return _apply_table(label_ids[..., 0], mapping)


def panoptic_segment_ids(panoptic_image):
    """COCO panoptic PNG `(H, W, 3)` -> segment ids int64 `(H, W)`: R + 256 G + 256^2 B."""
    rgb = tf.cast(panoptic_image, tf.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def panoptic_to_labels(panoptic_image, object_ids, object_labels, num_classes=_COCO_PANOPTIC_CLASSES):
    """Per-pixel category of a COCO panoptic image, int32 `(H, W)`.

    panoptic_image: `(H, W, 3)` uint8 segment-id PNG.
    object_ids: `(K,)` segment ids; object_labels: `(K,)` their categories
        in `[0, num_classes)`. K may be 0.
    Pixels of segment id 0, of an id no object has, or of an object whose
    label is out of range get 255. Each pixel id is looked up in the
    objects' sorted ids (`tf.searchsorted`, O(H W log K) time and O(H W)
    memory, unlike an `(H, W, K)` comparison) and kept only where the id
    found is equal to the pixel's.
    """
    ids = panoptic_segment_ids(panoptic_image)
    object_ids = tf.cast(tf.reshape(object_ids, [-1]), tf.int64)
    object_labels = tf.cast(tf.reshape(object_labels, [-1]), tf.int32)
    # A sentinel id -1 that no pixel has keeps the table non-empty for K = 0.
    object_ids = tf.concat([object_ids, [-1]], axis=0)
    object_labels = tf.concat([object_labels, [IGNORE_INDEX]], axis=0)
    order = tf.argsort(object_ids)
    sorted_ids = tf.gather(object_ids, order)
    sorted_labels = tf.gather(object_labels, order)

    flat_ids = tf.reshape(ids, [-1])
    position = tf.searchsorted(sorted_ids, flat_ids, side="left")
    position = tf.minimum(position, tf.size(sorted_ids) - 1)
    found = tf.gather(sorted_ids, position) == flat_ids
    labels = tf.gather(sorted_labels, position)
    valid = found & (flat_ids != _PANOPTIC_VOID_ID) & (labels >= 0) & (labels < num_classes)
    labels = tf.where(valid, labels, IGNORE_INDEX)
    return tf.reshape(labels, tf.shape(ids))


def _pet_labels(example):
    return pet_trimap_to_labels(example["segmentation_mask"])


def _cityscapes_labels(example):
    return cityscapes_ids_to_train_ids(example["segmentation_label"])


def _coco_panoptic_labels(example):
    objects = example["panoptic_objects"]
    return panoptic_to_labels(example["panoptic_image"], objects["id"], objects["label"])


@dataclasses.dataclass(frozen=True)
class TFDSSegmentationSpec:
    """How to read one tfds dataset as semantic segmentation.

    tfds_name: the tfds name with config, e.g. "cityscapes/semantic_segmentation".
    image_key / mask_key: the example's image `(H, W, 3)` and mask features.
    num_classes: number of label classes (255 = ignore is extra).
    class_names: tuple of `num_classes` names, or None to read them from the
        builder's info at `class_names_feature` (a path of feature keys).
    to_labels: `example dict -> int32 (H, W)` in `[0, num_classes) ∪ {255}`, tf ops.
    note: one line on where the labels come from.
    manual_download: the archives must be downloaded by hand into `manual_dir`.
    """

    tfds_name: str
    image_key: str
    mask_key: str
    num_classes: int
    class_names: tuple | None
    to_labels: Callable
    note: str
    manual_download: bool = False
    class_names_feature: tuple = ()


TFDS_DATASETS = {
    "oxford_iiit_pet": TFDSSegmentationSpec(
        tfds_name="oxford_iiit_pet",
        image_key="image",
        mask_key="segmentation_mask",
        num_classes=2,
        class_names=("background", "pet"),
        to_labels=_pet_labels,
        note="Trimap: 1 pet -> 1, 2 background -> 0, 3 border -> 255 (ignore).",
    ),
    "cityscapes": TFDSSegmentationSpec(
        tfds_name="cityscapes/semantic_segmentation",
        image_key="image_left",
        mask_key="segmentation_label",
        num_classes=19,
        class_names=CITYSCAPES_CLASS_NAMES,
        to_labels=_cityscapes_labels,
        note="gtFine labelIds -> the 19 trainIds, the rest 255; needs a manual download.",
        manual_download=True,
    ),
    "coco_panoptic": TFDSSegmentationSpec(
        tfds_name="coco/2017_panoptic",
        image_key="image",
        mask_key="panoptic_image",
        num_classes=_COCO_PANOPTIC_CLASSES,
        class_names=None,
        to_labels=_coco_panoptic_labels,
        note="Panoptic PNG segment ids -> the segment's category (133), void/unmatched 255.",
        class_names_feature=("panoptic_objects", "label"),
    ),
}

# tfds names that look like segmentation data but cannot give the labels DToP needs.
UNSUPPORTED_TFDS_DATASETS = {
    "scene_parse150": (
        "the tfds builder ships the ChallengeData2017 instance annotations "
        "(annotations_instance.tar), not ADE20K's 150-class semantic masks, so it cannot "
        "give ADE20K-150 labels; use the folder pipeline with the ADEChallengeData2016 layout"
    ),
    "voc": (
        "tfds's Pascal VOC has bounding boxes and image labels only, no segmentation "
        "masks; use the folder pipeline with VOC's SegmentationClass(Aug) PNGs"
    ),
    "ade20k": "ADE20K has no tfds builder; use the folder pipeline with the ADEChallengeData2016 layout",
    "pascal_context": "Pascal-Context is not in tfds; use the folder pipeline",
    "coco_stuff": "COCO-Stuff is not in tfds (only COCO panoptic is); use the folder pipeline",
}


def get_tfds_spec(name):
    """The `TFDSSegmentationSpec` for a registry name or its tfds name, else a ValueError."""
    if name in TFDS_DATASETS:
        return TFDS_DATASETS[name]
    for spec in TFDS_DATASETS.values():
        if name == spec.tfds_name:
            return spec
    supported = ", ".join(sorted(TFDS_DATASETS))
    base = str(name).split("/")[0].split(":")[0].lower().replace("-", "_")
    reason = UNSUPPORTED_TFDS_DATASETS.get(base)
    if reason is None and base == "coco":
        reason = "only the coco/2017_panoptic config has per-pixel labels (name 'coco_panoptic')"
    if reason is None and base == "cityscapes":
        reason = "only the semantic_segmentation config (fine labels) is supported (name 'cityscapes')"
    why = f": {reason}" if reason else ""
    raise ValueError(
        f"tfds dataset {name!r} is not supported for segmentation{why}. "
        f"Supported names: {supported}."
    )


def _nested_feature(features, path):
    for key in path:
        features = features[key]
    return features


def tfds_class_names(name, data_dir=None):
    """Class names, a tuple of `num_classes` strings, for a supported tfds dataset.

    COCO panoptic reads them from the tfds builder's info: the real category
    names once the dataset is prepared in `data_dir`, "0".."132" before.
    """
    spec = get_tfds_spec(name)
    if spec.class_names is not None:
        return tuple(spec.class_names)
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    return tuple(_nested_feature(builder.info.features, spec.class_names_feature).names)


def _not_prepared_message(spec, builder, manual_dir):
    """Where tfds looked for the data and how to prepare it."""
    root = builder.data_dir_root
    message = (
        f"tfds dataset {spec.tfds_name!r} is not prepared: no data in {builder.data_dir} "
        f"(data_dir {root}). Prepare it once with `tfds build {spec.tfds_name} "
        f"--data_dir={root}"
    )
    if spec.manual_download:
        where = manual_dir or f"{root}/downloads/manual"
        instructions = " ".join((getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None) or "").split())
        message += (
            f" --manual_dir={where}` after putting the archives the dataset needs in {where} "
            f"({instructions}), or call "
            "tfds_dataset(..., download=True, manual_dir=...)."
        )
    else:
        message += "`, or call tfds_dataset(..., download=True)."
    return message


def _download_and_prepare(spec, builder, manual_dir):
    """`builder.download_and_prepare`, with `manual_dir` for manual datasets."""
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    try:
        builder.download_and_prepare(download_config=config)
    except AssertionError as error:
        if spec.manual_download and not builder.is_prepared():
            # Cityscapes' builder asserts that the manual archives exist.
            raise FileNotFoundError(f"{error}\n{_not_prepared_message(spec, builder, manual_dir)}") from error
        raise


def _as_dataset(spec, builder, split, shuffle_files, read_config, manual_dir):
    try:
        return builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config)
    except AssertionError as error:
        # tfds asserts that the data folder exists ("could not find data in ...").
        if "could not find data" not in str(error):
            raise
        raise FileNotFoundError(_not_prepared_message(spec, builder, manual_dir)) from error


def _check_same_size(image, label, tfds_name):
    """`label` `(H, W)` after checking it has the image's `(H, W)`."""
    check = tf.debugging.assert_equal(
        tf.shape(image)[:2],
        tf.shape(label),
        message=f"{tfds_name}: the mask's height and width differ from the image's.",
    )
    with tf.control_dependencies([check]):
        return tf.identity(label)


def tfds_examples(
    name,
    split,
    *,
    data_dir=None,
    manual_dir=None,
    download=False,
    shuffle_files=False,
    read_config=None,
):
    """Unbatched `tf.data.Dataset` of `(image uint8 (H, W, 3), label int32 (H, W))`.

    Labels are in `[0, num_classes)` or 255. `download=True` downloads and
    prepares the data first (`manual_dir` holds manually downloaded archives,
    e.g. Cityscapes'); otherwise unprepared data raises a FileNotFoundError
    that says where tfds looked and how to prepare it.
    """
    spec = get_tfds_spec(name)
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    if download:
        _download_and_prepare(spec, builder, manual_dir)
    examples = _as_dataset(spec, builder, split, shuffle_files, read_config, manual_dir)

    def to_pair(example):
        image = tf.ensure_shape(tf.cast(example[spec.image_key], tf.uint8), [None, None, 3])
        label = _check_same_size(image, spec.to_labels(example), spec.tfds_name)
        return image, label

    return examples.map(to_pair, num_parallel_calls=tf.data.AUTOTUNE)


def tfds_dataset(
    name,
    split,
    *,
    data_dir=None,
    manual_dir=None,
    training=False,
    download=False,
    read_config=None,
    **pipeline_kwargs,
):
    """A tfds segmentation dataset as DToP batches.

    name: a key of `TFDS_DATASETS` ("oxford_iiit_pet", "cityscapes",
        "coco_panoptic") or its tfds name ("coco/2017_panoptic").
    split: a tfds split, e.g. "train", "validation", "train[:90%]".
    training: shuffled files and the training augmentation (see
        `segmentation_pipeline`); `pipeline_kwargs` (batch_size, crop_size,
        base_scale, seed, ...) go to `segmentation_pipeline`.
    Returns batches of float32 images `(B, H, W, 3)` in [0, 255] and int32
    labels `(B, H, W)` in `[0, num_classes)` or 255. Unsupported names
    (scene_parse150, voc, ...) raise a ValueError saying why.
    """
    spec = get_tfds_spec(name)
    if training and read_config is None:
        # Shuffled files in an order fixed by the seed, like the rest of the pipeline.
        read_config = tfds.ReadConfig(shuffle_seed=pipeline_kwargs.get("seed", 0))
    raw = tfds_examples(
        name,
        split,
        data_dir=data_dir,
        manual_dir=manual_dir,
        download=download,
        shuffle_files=training,
        read_config=read_config,
    )
    return segmentation_pipeline(raw, training=training, num_classes=spec.num_classes, **pipeline_kwargs)
