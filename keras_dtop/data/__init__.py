"""Datasets for DToP: the built-in synthetic set."""

from keras_dtop.data.synthetic import (
    CLASS_NAMES,
    synthetic_dataset,
    synthetic_segmentation,
)
