"""Export DToP segmenters to TF SavedModel, TFLite (LiteRT) and ONNX with pruning in the graph.

    keras_dtop.export.export_saved_model(model, "dtop_savedmodel")
    keras_dtop.export.export_tflite(model, "dtop.tflite", quantization="float16")
    keras_dtop.export.export_tflite(model, "dtop_int8.tflite", quantization="full_int8",
                                    calibration_data=validation_images)
    keras_dtop.export.export_onnx(model, "dtop.onnx")
    keras_dtop.export.LiteRTSegmenter("dtop.tflite")(images)
    keras_dtop.export.ONNXRuntimeSegmenter("dtop.onnx")(images)

or from the shell: `keras-dtop export model.keras --format onnx --out dtop.onnx`.
All work from any Keras backend (non-TensorFlow models are rebuilt under
TensorFlow in a subprocess), and `model.export(path, format="tf_saved_model"
| "litert" | "onnx")` routes here.
"""

from keras_dtop.export.litert import LiteRTSegmenter
from keras_dtop.export.onnx import export_onnx
from keras_dtop.export.onnx_runtime import ONNXRuntimeSegmenter
from keras_dtop.export.saved_model import export_saved_model
from keras_dtop.export.serving import OUTPUT_NAMES, ServingSpec, serving_spec
from keras_dtop.export.tflite import (
    QUANTIZATIONS,
    custom_operators,
    export_tflite,
    int8_operators,
    tflite_operators,
)

__all__ = [
    "OUTPUT_NAMES",
    "QUANTIZATIONS",
    "LiteRTSegmenter",
    "ONNXRuntimeSegmenter",
    "ServingSpec",
    "custom_operators",
    "export_onnx",
    "export_saved_model",
    "export_tflite",
    "int8_operators",
    "serving_spec",
    "tflite_operators",
]
