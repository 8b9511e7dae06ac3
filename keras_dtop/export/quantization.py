"""Full-integer (int8) TFLite quantization that leaves DToP's decisions in float32.

Quantizing everything breaks pruning: the grading rule compares token scores
in (0, 1) with p0 and ranks them with -inf sentinels (`layers/pruning.py`),
and one int8 scale per tensor cannot hold both (measured on the test model:
no token exited and 14% of labels agreed with float32). So only the operator
types below run in int8, with ranges calibrated on the user's images; every
other operator (the rule, gathers, top-k, softmax of the presence logits,
the canvas) stays float32, with QUANTIZE / DEQUANTIZE at the borders.
"""

QUANTIZED_OPERATORS = ("FULLY_CONNECTED", "BATCH_MATMUL", "CONV_2D")


def quantize_full_int8(converter, calibration, batch_size, quantized_operators=QUANTIZED_OPERATORS):
    """Convert with int8 weights and activations for `quantized_operators`; returns flatbuffer bytes.

    converter: a `tf.lite.TFLiteConverter` with `Optimize.DEFAULT` set;
    calibration: float32 images `(count, H, W, 3)`, batched by `batch_size`
    as the export's fixed input. Inputs and outputs stay float32.
    """
    import tensorflow as tf
    from tensorflow.lite.python import schema_py_generated as schema

    from keras_dtop.export.calibration import representative_batches

    batches = representative_batches(calibration, batch_size)
    converter.representative_dataset = batches
    converter.target_spec.supported_ops = [
        tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
        tf.lite.OpsSet.TFLITE_BUILTINS,
    ]
    builtin = [name for name in vars(schema.BuiltinOperator) if not name.startswith("_")]
    keep_float = [name for name in builtin if name not in quantized_operators]
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter,
        debug_dataset=batches,
        debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=keep_float),
    )
    return debugger.get_nondebug_quantized_model()
