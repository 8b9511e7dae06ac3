"""Full-integer int8 against float32 TFLite on a trained model: mIoU, exits, size, latency (issue: export).

Exports one trained `.keras` model three ways (float32, dynamic-range
"int8", "full_int8" calibrated on held-out validation scenes), runs each with
the LiteRT interpreter on test scenes the model never saw, and prints mIoU,
pixel agreement with the float32 export, exit stages kept, alive tokens,
size and ms/image (batch 1, rows interleaved, warm-up excluded). The scenes
come from the built-in synthetic data the quickstart trains on.

    python benchmarks/int8_accuracy.py                # trains a small model first (about a minute)
    python examples/quickstart.py --out /tmp/qs
    python benchmarks/int8_accuracy.py --model /tmp/qs/dtop_quickstart.keras

Without `--model` it trains the full-int8 test's recipe: a 4-layer ViT
(width 32, patch 8, 64x64, 4 classes) for 12 epochs on 192 scenes, p0 0.9.
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import machine_info  # noqa: E402

ROWS = (("float32", None), ("int8 (dynamic range)", "int8"), ("full int8", "full_int8"))


def mean_iou(labels, predictions, num_classes):
    from keras_dtop.evaluation.report import confusion_matrix, iou_from_confusion

    return float(np.nanmean(iou_from_confusion(confusion_matrix(labels, predictions, num_classes))))


def train_small_model(epochs=12, count=192):
    """The full-int8 test's model (`tests/test_export_full_int8.py`), trained on synthetic scenes."""
    import keras

    import keras_dtop
    from keras_dtop.data import synthetic_segmentation

    keras.utils.set_random_seed(0)
    backbone = keras_dtop.DToPBackbone(
        patch_size=8, hidden_dim=32, num_layers=4, num_heads=2, mlp_dim=64, image_size=(64, 64), stage_ends=(1, 2, 3)
    )
    preprocessor = keras_dtop.DToPImageSegmenterPreprocessor(image_converter=keras_dtop.DToPImageConverter.from_mean_std())
    model = keras_dtop.DToPSegmenter(
        backbone, num_classes=4, head_hidden_dim=16, head_num_heads=2, head_num_layers=2, head_dropout=0.0,
        prune_threshold=0.9, keep_top_k=1, preprocessor=preprocessor,
    )  # fmt: skip
    images, labels = synthetic_segmentation(count, (64, 64), 4, seed=1)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.fit(images.astype("float32"), labels.astype("int32"), batch_size=16, epochs=epochs, verbose=0)
    path = os.path.join(tempfile.mkdtemp(prefix="dtop_int8_model_"), "small.keras")
    model.save(path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained .keras DToPSegmenter (default: train a small one)")
    parser.add_argument("--calibration-images", type=int, default=128)
    parser.add_argument("--test-images", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import keras

    from keras_dtop.data import synthetic_segmentation
    from keras_dtop.export import LiteRTSegmenter, export_tflite, int8_operators

    machine = machine_info()
    print(f"machine: {machine['cpu']} | ISA {' '.join(machine['isa'])} | {machine['threads']} CPUs | "
          + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()))  # fmt: skip
    if args.model is None:
        args.model = train_small_model()
    model = keras.saving.load_model(args.model, compile=False)
    size, classes = model.backbone.image_size, model.num_classes
    calibration, _ = synthetic_segmentation(args.calibration_images, size, classes, seed=2024)
    test_images, test_labels = synthetic_segmentation(args.test_images, size, classes, seed=2025)
    test_images = test_images.astype("float32")
    keras_miou = mean_iou(test_labels, model.predict(test_images, verbose=0).argmax(-1), classes)
    folder = tempfile.mkdtemp(prefix="dtop_int8_")
    results = []
    for name, quantization in ROWS:
        path = os.path.join(folder, f"{quantization or 'float32'}.tflite")
        start = time.perf_counter()
        kwargs = dict(calibration_data=calibration) if quantization == "full_int8" else {}
        export_tflite(model, path, quantization=quantization, **kwargs)
        runner = LiteRTSegmenter(path, num_threads=args.threads)
        outputs = runner(test_images)
        results.append(dict(
            row=name, runner=runner, outputs=outputs, convert_s=time.perf_counter() - start,
            size_mb=os.path.getsize(path) / 2**20, int8=int8_operators(path), times=[],
        ))  # fmt: skip
    for repeat in range(1 + args.repeats):
        for result in results:
            for image in test_images[:16]:
                began = time.perf_counter()
                result["runner"](image[None])
                if repeat:
                    result["times"].append((time.perf_counter() - began) * 1e3)
    reference = results[0]["outputs"]
    print(f"\n{args.model}: {size[0]}x{size[1]}, {classes} classes, p0 {model.prune_threshold}, "
          f"{args.calibration_images} calibration / {args.test_images} test scenes; Keras mIoU {keras_miou:.4f}")  # fmt: skip
    print("| export | mIoU | labels = float32 | exit stage = float32 | alive tokens/stage | MiB | "
          "ms/img median (min) | int8 operators |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        out = r["outputs"]
        print(
            f"| {r['row']} | {mean_iou(test_labels, out['labels'], classes):.4f} | "
            f"{np.mean(out['labels'] == reference['labels']):.4f} | "
            f"{np.mean(out['exit_stage'] == reference['exit_stage']):.4f} | "
            f"{out['alive_tokens'].mean(0).round(1).tolist()} | {r['size_mb']:.2f} | "
            f"{np.median(r['times']):.2f} ({np.min(r['times']):.2f}) | {', '.join(r['int8']) or '-'} |"
        )


if __name__ == "__main__":
    main()
