"""DToP models: backbone, segmenter task, the stage engine, preprocessor, presets."""

from keras_dtop.models.backbone import DToPBackbone, default_stage_ends
from keras_dtop.models.preprocessor import DToPImageConverter, DToPImageSegmenterPreprocessor
from keras_dtop.models.presets import PRESETS
from keras_dtop.models.saving import load_segmenter
from keras_dtop.models.segmenter import DToPSegmenter
from keras_dtop.models.stage_runner import ExecutionPlan, ExecutionPolicy, StageRunner
