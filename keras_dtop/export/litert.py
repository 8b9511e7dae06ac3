"""Run an exported `.tflite` DToP model with the LiteRT interpreter (`ai-edge-litert`)."""

import os

import numpy as np

from keras_dtop.export.batching import check_images, run_in_batches


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # older setups: TensorFlow's bundled interpreter
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter


class LiteRTSegmenter:
    """Callable wrapper of an exported `.tflite` segmenter.

    `input_shape`, `input_dtype` and `output_shapes` describe the signature.

    `runner(images)` takes `(count, H, W, 3)` images (what the export's input
    expects: raw pixels when it includes preprocessing), runs them in chunks
    of the model's fixed batch (padding the last), and returns NumPy
    `scores`, `labels`, `alive_tokens` and `exit_stage` for all `count` images.
    """

    format = "tflite"

    def __init__(self, path, num_threads=None, **interpreter_kwargs):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No .tflite file at {path!r}.")
        try:
            self.interpreter = _interpreter_class()(
                model_path=os.fspath(path), num_threads=num_threads, **interpreter_kwargs
            )
        except ValueError as error:  # LiteRT: "The model is not a valid Flatbuffer buffer"
            raise ValueError(f"{os.fspath(path)} is not a readable .tflite model: {error}") from None
        self.runner = self.interpreter.get_signature_runner("serving_default")
        spec = self.runner.get_input_details()["images"]
        self.input_shape = tuple(int(s) for s in spec["shape"])
        self.input_dtype = np.dtype(spec["dtype"])
        outputs = self.runner.get_output_details()
        self.output_shapes = {name: tuple(int(s) for s in v["shape"]) for name, v in outputs.items()}

    def __call__(self, images):
        images = check_images(images, self.input_shape, self.input_dtype)
        return run_in_batches(lambda batch: self.runner(images=batch), images, self.input_shape[0])
