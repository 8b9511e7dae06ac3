"""Run an exported `.onnx` DToP model with ONNX Runtime (`onnxruntime`)."""

import os

import numpy as np

from keras_dtop.export.batching import check_images, run_in_batches

_ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8}


class ONNXRuntimeSegmenter:
    """Callable wrapper of an exported `.onnx` segmenter.

    `runner(images)` takes `(count, H, W, 3)` images (raw pixels when the
    export includes preprocessing) and returns NumPy `scores`, `labels`,
    `alive_tokens` and `exit_stage` for all `count` images: one call for a
    dynamic-batch model, chunks of its batch otherwise (the last one padded).
    num_threads: ONNX Runtime's intra-op threads (None: its default).
    `input_shape` (None for a dynamic batch), `input_dtype` and
    `output_shapes` describe the signature.
    """

    format = "onnx"

    def __init__(self, path, num_threads=None, providers=("CPUExecutionProvider",)):
        try:
            import onnxruntime
        except ImportError as error:
            raise ImportError(f"Running .onnx models needs onnxruntime ({error}): pip install 'keras-dtop[onnx]'.") from None
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No .onnx file at {path!r}.")
        options = onnxruntime.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = int(num_threads)
        try:
            self.session = onnxruntime.InferenceSession(os.fspath(path), options, providers=list(providers))
        except Exception as error:  # onnxruntime raises its own Fail / InvalidProtobuf types
            raise ValueError(f"{os.fspath(path)} is not a readable .onnx model: {error}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != "images":
            raise ValueError(f"{os.fspath(path)} is not a keras-dtop export: inputs {[i.name for i in inputs]}.")
        shape = inputs[0].shape
        self.input_shape = tuple(s if isinstance(s, int) else None for s in shape)
        self.input_dtype = np.dtype(_ONNX_DTYPES[inputs[0].type])
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.output_shapes = {
            o.name: tuple(s if isinstance(s, int) else None for s in o.shape) for o in self.session.get_outputs()
        }

    def __call__(self, images):
        images = check_images(images, self.input_shape, self.input_dtype)

        def run(batch):
            return dict(zip(self.output_names, self.session.run(self.output_names, {"images": batch})))

        return run_in_batches(run, images, self.input_shape[0])
