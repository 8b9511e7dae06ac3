"""keras-dtop: Dynamic Token Pruning for plain-ViT semantic segmentation in Keras 3."""

from keras_dtop import convert, data, distribute, flops, layers, losses, metrics, optimizers
from keras_dtop.models import (
    PRESETS,
    DToPBackbone,
    DToPImageConverter,
    DToPImageSegmenterPreprocessor,
    DToPSegmenter,
)
from keras_dtop.version import __version__

presets = tuple(PRESETS)
