"""DToP models: backbone, segmenter task, preprocessor, presets."""

from keras_dtop.models.backbone import DToPBackbone, default_stage_ends
from keras_dtop.models.preprocessor import DToPImageConverter, DToPImageSegmenterPreprocessor
from keras_dtop.models.presets import PRESETS
from keras_dtop.models.segmenter import DToPSegmenter
