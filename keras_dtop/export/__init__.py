"""Export DToP segmenters to TF SavedModel and TFLite (LiteRT) with pruning in the graph.

    keras_dtop.export.export_saved_model(model, "dtop_savedmodel")
    keras_dtop.export.export_tflite(model, "dtop.tflite", quantization="float16")
    keras_dtop.export.LiteRTSegmenter("dtop.tflite")(images)

or from the shell: `keras-dtop export model.keras --format tflite --out dtop.tflite`.
Both work from any Keras backend (non-TensorFlow models are rebuilt under
TensorFlow in a subprocess), and `model.export(path, format="tf_saved_model"
| "litert")` routes here.
"""

from keras_dtop.export.litert import LiteRTSegmenter
from keras_dtop.export.saved_model import export_saved_model
from keras_dtop.export.serving import OUTPUT_NAMES, ServingSpec, serving_spec
from keras_dtop.export.tflite import QUANTIZATIONS, custom_operators, export_tflite, tflite_operators

__all__ = [
    "OUTPUT_NAMES",
    "QUANTIZATIONS",
    "LiteRTSegmenter",
    "ServingSpec",
    "custom_operators",
    "export_saved_model",
    "export_tflite",
    "serving_spec",
    "tflite_operators",
]
