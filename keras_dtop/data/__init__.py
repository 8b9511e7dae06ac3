"""Datasets for DToP: tfds and folder pipelines, the method's augmentation, built-in sets.

The pipelines load on first use, so `import keras_dtop` does not import
tensorflow-datasets or PIL.
"""

import importlib

from keras_dtop.data.synthetic import (
    CLASS_NAMES,
    synthetic_dataset,
    synthetic_segmentation,
)

_LAZY = {
    "array_dataset": "pipeline",
    "segmentation_pipeline": "pipeline",
    "folder_dataset": "folder",
    "pair_files": "folder",
    "read_image": "folder",
    "read_mask": "folder",
    "VOC_CLASS_NAMES": "folder",
    "tfds_dataset": "tfds_datasets",
    "tfds_class_names": "tfds_datasets",
    "TFDS_DATASETS": "tfds_datasets",
}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f"keras_dtop.data.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'keras_dtop.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
