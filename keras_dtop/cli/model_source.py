"""The model a CLI command runs: a `.keras` file, a preset directory or an exported `.tflite` / `.onnx` file.

`open_model(path)` returns a `KerasSource` or an `ExportedSource`; both segment a
batch of raw images `(count, H, W, 3)` into per-image results (labels, exit
stages, alive counts, GFLOPs where known), so that the commands need not care
which one they hold.
"""

import dataclasses
import os

import numpy as np

from keras_dtop.visualization import class_palette


@dataclasses.dataclass
class ImageResult:
    """One image's segmentation: labels `(H, W)`, exit_stage `(h, w)` tokens or
    `(H, W)` pixels (sliding windows), alive tokens per stage (summed over
    windows), GFLOPs and dense GFLOPs (None for a `.tflite` model)."""

    labels: np.ndarray
    exit_stage: np.ndarray
    alive: list
    gflops: float = None
    dense_gflops: float = None


def open_model(path):
    """A `KerasSource` or `ExportedSource` for `path`, with errors that say what is wrong with it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No model at {path!r}: give a .keras file, a preset directory (model.save_to_preset), "
            "a .tflite or an .onnx file."
        )
    if path.endswith(".tflite"):
        from keras_dtop.export import LiteRTSegmenter

        return ExportedSource(path, LiteRTSegmenter(path))
    if path.endswith(".onnx"):
        from keras_dtop.export import ONNXRuntimeSegmenter

        return ExportedSource(path, ONNXRuntimeSegmenter(path))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(
                f"{path} is a folder without config.json, not a preset directory: "
                "write one with model.save_to_preset(folder)."
            )
        from keras_dtop.models import DToPSegmenter

        return KerasSource(path, DToPSegmenter.from_preset(path))
    from keras_dtop.models import load_segmenter

    return KerasSource(path, load_segmenter(path, compile=False))


class KerasSource:
    """A `DToPSegmenter` (from a `.keras` file or a preset directory)."""

    kind = "keras"

    def __init__(self, path, model):
        self.path, self.model = path, model
        self.num_classes = model.num_classes
        self.num_stages = len(model.stage_ends)
        self.patch_size = model.backbone.patch_size
        self.class_names = list(model.class_names) if model.class_names else None
        self.palette = np.asarray(model.palette if model.palette else class_palette(model.num_classes), np.uint8)

    def set_prune_threshold(self, p0):
        self.model.prune_threshold = p0

    def check_size(self, height, width, sliding_window):
        if sliding_window is None and (height % self.patch_size or width % self.patch_size):
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}: "
                "pass --sliding-window H W (a crop the model runs at) to segment it window by window."
            )

    def segment(self, images, batch_size, sliding_window=None):
        from keras_dtop.evaluation import sliding_window_batch
        from keras_dtop.flops import dense_segmenter_flops

        if sliding_window is not None:
            return [
                ImageResult(
                    d["scores"].argmax(-1), d["exit_stage"], d["alive_counts"].sum(0).tolist(),
                    d["gflops"], d["dense_gflops"],
                )  # fmt: skip
                for d in sliding_window_batch(self.model, images, sliding_window, batch_size)
            ]
        details = self.model.predict_details(images, batch_size=batch_size)
        dense = dense_segmenter_flops(self.model, images.shape[1:3]) / 1e9
        return [
            ImageResult(scores.argmax(-1), exits, alive.tolist(), float(gflops), dense)
            for scores, exits, alive, gflops in zip(
                details["scores"], details["exit_stage"], details["alive_counts"], details["gflops"]
            )
        ]


class ExportedSource:
    """An exported `.tflite` or `.onnx` DToP model: fixed input size, p0 built in, no GFLOPs."""

    def __init__(self, path, runner):
        self.path, self.runner = path, runner
        self.kind = runner.format
        self.input_size = runner.input_shape[1:3]
        self.num_stages = int(runner.output_shapes["alive_tokens"][-1])
        self.num_classes = int(runner.output_shapes["scores"][-1])
        self.class_names = None
        self.palette = class_palette(self.num_classes)

    def set_prune_threshold(self, p0):
        raise ValueError(f"--p0 needs a .keras model or a preset directory: a .{self.kind} file has p0 built in.")

    def check_size(self, height, width, sliding_window):
        if sliding_window is not None:
            raise ValueError(f"--sliding-window needs a .keras model or a preset directory, not a .{self.kind} file.")
        if (height, width) != self.input_size:
            raise ValueError(
                f"image size {height}x{width} differs from the .{self.kind} model's input "
                f"{self.input_size[0]}x{self.input_size[1]}: export it at this size (--image-size)."
            )

    def segment(self, images, batch_size, sliding_window=None):
        outputs = self.runner(images)
        return [
            ImageResult(labels, exits, alive.tolist())
            for labels, exits, alive in zip(outputs["labels"], outputs["exit_stage"], outputs["alive_tokens"])
        ]
