"""Image preprocessing for DToP: optional resize, then per-channel normalisation.

keras-hub applies a task's preprocessor inside `predict`/`fit`/`evaluate`;
calling the model directly (`model(images)`) expects already-normalised images.
"""

import keras
from keras_hub.layers import ImageConverter
from keras_hub.models import ImageSegmenterPreprocessor

from keras_dtop.models.backbone import DToPBackbone
from keras_dtop.models.presets import IMAGENET_MEAN, IMAGENET_STD


@keras.saving.register_keras_serializable(package="keras_dtop")
class DToPImageConverter(ImageConverter):
    """`ImageConverter` for DToP: RGB pixels in [0, 255] -> `(x - mean) / std`.

    `image_size=None` (default) keeps the input resolution, so predictions come
    back at the size of the images given.
    """

    backbone_cls = DToPBackbone

    @classmethod
    def from_mean_std(cls, mean=IMAGENET_MEAN, std=IMAGENET_STD, image_size=None, **kwargs):
        """Converter computing `(x - mean) / std` per channel (0-255 scale)."""
        scale = [1.0 / s for s in std]
        offset = [-m / s for m, s in zip(mean, std)]
        return cls(image_size=image_size, scale=scale, offset=offset, **kwargs)


@keras.saving.register_keras_serializable(package="keras_dtop")
class DToPImageSegmenterPreprocessor(ImageSegmenterPreprocessor):
    """Preprocessor of `DToPSegmenter`: applies a `DToPImageConverter` to images."""

    backbone_cls = DToPBackbone
    image_converter_cls = DToPImageConverter
