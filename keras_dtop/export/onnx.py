"""ONNX export with pruning in the graph, converted from the TensorFlow trace by tf2onnx.

The graph is the one the SavedModel serves (`serving.py`): with
`pruning_mode` "gathered" every stage after the first runs on a dynamic
number of alive tokens (ONNX `TopK`, `Gather`, `CumSum` with dynamic shapes);
"capacity" gives static token counts. The batch is dynamic unless
`batch_size` is given. Needs the `onnx` extra (`pip install keras-dtop[onnx]`).
"""

import numbers
import os

from keras_dtop.export.serving import OUTPUT_NAMES, inference_settings, serving_outputs
from keras_dtop.export.tensorflow_process import run_export

DEFAULT_OPSET = 17
MIN_OPSET = 13  # CumSum with a dynamic axis input, Split/Squeeze with axes inputs


def check_opset(opset):
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_OPSET}, got {opset!r}.")
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ValueError(f"opset {opset} is newer than the installed onnx supports ({newest}).")
    return int(opset)


def require_converter():
    """Import tf2onnx and onnx, or raise an ImportError that says how to get them."""
    try:
        import onnx  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"ONNX export needs tf2onnx and onnx ({error}): pip install 'keras-dtop[onnx]'."
        ) from None


def export_onnx(
    model,
    path,
    image_size=None,
    batch_size=None,
    input_dtype="float32",
    include_preprocessing=None,
    pruning_mode=None,
    pruning_enabled=None,
    stage_capacity=None,
    input_signature=None,
    opset=DEFAULT_OPSET,
):
    """Write `model` (a `DToPSegmenter` or its `.keras` file) as an `.onnx` file.

    Input `images` `(batch, H, W, 3)` (raw RGB pixels when
    `include_preprocessing`, the default for a model with a preprocessor);
    outputs `scores`, `labels`, `alive_tokens`, `exit_stage` as for
    `export_saved_model`. batch_size None (default) leaves the batch dynamic.
    The file passes `onnx.checker` and runs in ONNX Runtime
    (`keras_dtop.export.ONNXRuntimeSegmenter`). Under JAX or PyTorch the model
    is rebuilt under TensorFlow in a subprocess. Returns the path.
    """
    require_converter()
    opset = check_opset(opset)
    options = dict(
        image_size=image_size,
        batch_size=batch_size,
        input_dtype=input_dtype,
        include_preprocessing=include_preprocessing,
        pruning_mode=pruning_mode,
        pruning_enabled=pruning_enabled,
        stage_capacity=stage_capacity,
    )

    def write(model, spec):
        write_onnx(model, path, spec, options, opset)

    return run_export("onnx", model, path, options, input_signature, write, {"opset": opset})


def write_onnx(model, path, spec, options, opset=DEFAULT_OPSET):
    """Trace the serving function for `spec` (TensorFlow backend), convert it, check it, save it."""
    import onnx
    import tensorflow as tf

    signature = [tf.TensorSpec(spec.shape, spec.input_dtype, name="images")]
    with inference_settings(
        model, options["pruning_mode"], options["pruning_enabled"], options["stage_capacity"]
    ):
        serve = tf.function(lambda images: serving_outputs(model, images, spec), input_signature=signature)
        proto = convert_function(serve.get_concrete_function(), opset)
    name_dynamic_batch(proto)
    outputs = [output.name for output in proto.graph.output]
    if sorted(outputs) != sorted(OUTPUT_NAMES):
        raise RuntimeError(f"The ONNX graph's outputs are {outputs}, expected {list(OUTPUT_NAMES)}.")
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, os.fspath(path))


def convert_function(concrete, opset):
    """A TF concrete function -> ONNX `ModelProto`: the steps of `tf2onnx.convert.from_function`,
    with one graph optimizer left out.

    tf2onnx 1.17's "remove_back_to_back" merges two consecutive Reshapes after
    its "reshape_optimizer" has turned the second one's computed shape into
    copy-this-dimension zeros, which then copy the wrong tensor's dimensions:
    ONNX Runtime failed with "cannot reshape {tokens, C} to {tokens, C, heads, d}"
    in the grading heads (TF's `Tensordot` reshapes around a matmul). ONNX
    Runtime merges such reshapes itself, correctly.
    """
    import tensorflow as tf
    from tf2onnx import optimizer, tf_loader, tfonnx

    resource = tf.dtypes.resource
    input_names = [t.name for t in concrete.inputs if t.dtype != resource]
    output_names = [t.name for t in concrete.outputs if t.dtype != resource]
    renames = dict(zip(input_names, ["images"]))
    renames.update({tensor.name: name for name, tensor in concrete.structured_outputs.items()})
    graph_def = tf_loader.from_function(concrete, input_names, output_names)
    optimizers = {k: v for k, v in optimizer._get_optimizers().items() if k != "remove_back_to_back"}
    with tf.Graph().as_default() as tf_graph:
        tf.import_graph_def(graph_def, name="")
        graph = tfonnx.process_tf_graph(
            tf_graph, continue_on_error=False, opset=opset, custom_op_handlers=CONVERSION_RULES,
            input_names=input_names, output_names=output_names, tensors_to_rename=renames,
        )  # fmt: skip
        graph = optimizer.optimize_graph(graph, catch_errors=True, optimizers=optimizers)
        return graph.make_model("keras-dtop segmenter")


def onnx_operators(path):
    """Sorted operator types of an `.onnx` file's graph (e.g. "MatMul", "TopK")."""
    import onnx

    return sorted({node.op_type for node in onnx.load(os.fspath(path)).graph.node})


def name_dynamic_batch(proto):
    """Call the dynamic first axis of every graph input and output "batch" (tf2onnx: "unk__N")."""
    for value in (*proto.graph.input, *proto.graph.output):
        first = value.type.tensor_type.shape.dim[0]
        if not first.HasField("dim_value"):
            first.dim_param = "batch"


def _erfc_as_one_minus_erf(ctx, node, name, args):
    """tf2onnx rule for TF's `Erfc` (exact GELU in Keras' TF backend), which ONNX lacks:
    rewrite the node in place as `1 - Erf(x)`."""
    import numpy as np
    from tf2onnx import utils

    x = node.input[0]
    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(x))
    erf = ctx.make_node("Erf", [x])
    one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.array(1, dtype))
    node.type = "Sub"
    ctx.replace_inputs(node, [one.output[0], erf.output[0]])


CONVERSION_RULES = {"Erfc": (_erfc_as_one_minus_erf, [])}
