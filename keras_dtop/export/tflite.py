"""TFLite (LiteRT) export: builtin ops only, float32 / float16 / dynamic-range int8 / full int8.

The flatbuffer is converted from the SavedModel of `saved_model.py`, so it
prunes the same way: with `pruning_mode` "gathered" the tensors of every stage
after the first are resized at run time to the alive tokens (at least one:
XNNPACK fails on empty tensors); "capacity" gives fully static shapes.
"""

import os
import tempfile

import numpy as np

from keras_dtop.export.calibration import calibration_images
from keras_dtop.export.quantization import quantize_full_int8
from keras_dtop.export.saved_model import write_saved_model
from keras_dtop.export.tensorflow_process import run_export, running_tensorflow

QUANTIZATIONS = ("float16", "int8", "full_int8")


def check_quantization(quantization, calibration_data=None):
    if quantization not in (None, "none", *QUANTIZATIONS):
        raise ValueError(
            "quantization must be None, 'float16', 'int8' (dynamic range) or 'full_int8' "
            f"(int8 weights and activations, with calibration_data), got {quantization!r}."
        )
    if calibration_data is not None and quantization != "full_int8":
        raise ValueError(
            f"calibration_data is only used by quantization='full_int8', got quantization={quantization!r}."
        )
    return None if quantization == "none" else quantization


def export_tflite(
    model,
    path,
    image_size=None,
    batch_size=1,
    input_dtype="float32",
    include_preprocessing=None,
    quantization=None,
    pruning_mode=None,
    pruning_enabled=None,
    stage_capacity=None,
    input_signature=None,
    calibration_data=None,
):
    """Write `model` (a `DToPSegmenter` or its `.keras` file) as a `.tflite` flatbuffer.

    Fixed input `(batch_size, H, W, 3)` (H, W: `image_size`, default the
    backbone's); signature outputs as for `export_saved_model`.
    quantization: None (float32), "float16" (weights stored in half precision),
    "int8" (dynamic range: int8 weights, float activations) or "full_int8"
    (int8 weights and activations of the encoder and the heads' layers, with
    ranges calibrated on `calibration_data`: images like those served, see
    `keras_dtop.export.calibration.calibration_images`; the grading rule and
    the token bookkeeping stay float32, inputs and outputs are float32).
    Only TFLite builtin operators are allowed; a conversion needing Flex or
    custom ops raises. Under JAX or PyTorch the model is rebuilt under
    TensorFlow in a subprocess. Returns the path.
    """
    quantization = check_quantization(quantization, calibration_data)
    options = dict(
        image_size=image_size,
        batch_size=batch_size,
        input_dtype=input_dtype,
        include_preprocessing=include_preprocessing,
        pruning_mode=pruning_mode,
        pruning_enabled=pruning_enabled,
        stage_capacity=stage_capacity,
    )
    calibration = {}

    with tempfile.TemporaryDirectory(prefix="keras_dtop_tflite_") as tmp:

        def prepare(spec):
            """Check the calibration images before anything is traced (spec None: a `.keras`
            path exported in a subprocess, which checks their size); hand them to the subprocess."""
            if quantization != "full_int8":
                return {}
            calibration["images"] = calibration_images(calibration_data, spec)
            if running_tensorflow():
                return {}
            np.save(os.path.join(tmp, "calibration.npy"), calibration["images"])
            return {"calibration_data": os.path.join(tmp, "calibration.npy")}

        def write(model, spec):
            saved_model = os.path.join(tmp, "saved_model")
            write_saved_model(model, saved_model, spec, options)
            flatbuffer = convert_saved_model(
                saved_model, quantization, calibration.get("images"), spec.batch_size
            )
            with open(path, "wb") as f:
                f.write(flatbuffer)

        extra = {"quantization": quantization}
        return run_export("tflite", model, path, options, input_signature, write, extra, prepare)


def convert_saved_model(saved_model_dir, quantization=None, calibration=None, batch_size=1):
    """SavedModel -> TFLite flatbuffer bytes with builtin ops only (checked).

    calibration: float32 images `(count, H, W, 3)` for "full_int8".
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(
        os.fspath(saved_model_dir), signature_keys=["serving_default"]
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantization == "full_int8":
        flatbuffer = quantize_full_int8(converter, calibration, batch_size)
    else:
        flatbuffer = converter.convert()
    foreign = custom_operators(flatbuffer)
    if foreign:
        raise RuntimeError(f"The TFLite model needs non-builtin operators {foreign}.")
    return flatbuffer


def tflite_operators(flatbuffer):
    """Sorted names of the operators a `.tflite` model uses (bytes or a path).

    Builtin operators by their schema names (e.g. "FULLY_CONNECTED"), custom
    and Flex operators by their custom code (e.g. "FlexErf").
    """
    return sorted({name for name, _ in _operator_codes(flatbuffer)})


def custom_operators(flatbuffer):
    """Sorted custom and Flex (SELECT_TF_OPS) operators of a `.tflite` model; [] when builtins only."""
    return sorted({name for name, custom in _operator_codes(flatbuffer) if custom})


def int8_operators(flatbuffer):
    """Sorted names of the operators that compute in int8 (an int8 first input) in a `.tflite` model.

    After `quantization="full_int8"`: the encoder's and heads' matrix
    products; QUANTIZE / DEQUANTIZE mark the float32 borders.
    """
    from tensorflow.lite.python import schema_py_generated as schema

    model = _read_model(flatbuffer)
    names = [name for name, _ in _operator_codes(model)]
    found = set()
    for subgraph in model.subgraphs:
        for operator in subgraph.operators:
            inputs = [i for i in operator.inputs if i >= 0]
            if inputs and subgraph.tensors[inputs[0]].type == schema.TensorType.INT8:
                found.add(names[operator.opcodeIndex])
    return sorted(found - {"QUANTIZE", "DEQUANTIZE"})


def _read_model(flatbuffer):
    from tensorflow.lite.tools import flatbuffer_utils

    if isinstance(flatbuffer, (str, os.PathLike)):
        with open(flatbuffer, "rb") as f:
            flatbuffer = f.read()
    if isinstance(flatbuffer, (bytes, bytearray)):
        return flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    return flatbuffer  # already read


def _operator_codes(flatbuffer):
    """(name, is_custom) of every operator code, in the model's opcode order."""
    from tensorflow.lite.python import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = _read_model(flatbuffer)
    for code in model.operatorCodes:
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        if builtin == schema.BuiltinOperator.CUSTOM or code.customCode:
            custom = code.customCode
            yield (custom.decode() if isinstance(custom, bytes) else str(custom)), True
        else:
            yield names[builtin], False
