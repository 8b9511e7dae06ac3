"""Evaluation report: accuracy and cost of a segmenter on a labelled dataset.

`evaluate_segmentation` runs the model (pruned as configured, optionally by
sliding windows) over `(images, labels)` batches and collects a confusion
matrix (255 ignored), GFLOPs per image and alive-token fractions per stage.
The `EvaluationReport` prints as a table and saves as JSON.
"""

import dataclasses
import json
import time

import numpy as np

from keras_dtop.data.labels import IGNORE_INDEX, check_labels
from keras_dtop.evaluation.sliding_window import SlidingWindow, sliding_window_batch, window_positions
from keras_dtop.flops import dense_segmenter_flops, segmenter_tokens


@dataclasses.dataclass
class EvaluationReport:
    """What `evaluate_segmentation` measured.

    miou: mean IoU over classes present in truth or prediction (mmseg's
    nan-mean); per_class_iou: `{name: IoU or None}` (None: class absent);
    pixel_accuracy: correct / labelled pixels; gflops: mean per image
    (backbone + final head, summed over windows); gflops_with_auxiliary_heads:
    what the pruned model runs; dense_gflops: the same images unpruned;
    flops_saving: 1 - gflops / dense_gflops; alive_fraction: mean fraction of
    tokens each head sees, one per stage (the first is 1).
    """

    miou: float
    per_class_iou: dict
    pixel_accuracy: float
    gflops: float
    gflops_with_auxiliary_heads: float
    dense_gflops: float
    flops_saving: float
    alive_fraction: list
    num_images: int
    num_windows: int
    seconds: float
    settings: dict = dataclasses.field(default_factory=dict)

    def as_dict(self):
        return dataclasses.asdict(self)

    def metrics(self):
        """Flat scalar metrics, named like `fit`'s logs."""
        out = dict(
            miou=self.miou,
            pixel_accuracy=self.pixel_accuracy,
            gflops=self.gflops,
            flops_saving=self.flops_saving,
        )
        for j, fraction in enumerate(self.alive_fraction[1:]):
            out[f"alive_stage_{j + 2}"] = fraction
        return out

    def save_json(self, path):
        with open(path, "w") as f:
            json.dump(self.as_dict(), f, indent=2)

    def table(self):
        """A plain-text table: per-class IoU, then the summary."""
        width = max([len("class")] + [len(str(name)) for name in self.per_class_iou])
        lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 9)]
        for name, iou in self.per_class_iou.items():
            lines.append(f"{name:<{width}}  {'  n/a' if iou is None else f'{100 * iou:6.2f}'}")
        alive = ", ".join(f"{100 * a:.1f}%" for a in self.alive_fraction)
        lines += [
            "-" * (width + 9),
            f"mIoU {100 * self.miou:.2f}%   pixel accuracy {100 * self.pixel_accuracy:.2f}%",
            f"GFLOPs/image {self.gflops:.3f} (dense {self.dense_gflops:.3f}, "
            f"saving {100 * self.flops_saving:.1f}%; with auxiliary heads {self.gflops_with_auxiliary_heads:.3f})",
            f"tokens alive per stage: {alive}",
            f"{self.num_images} images, {self.num_windows} windows, {self.seconds:.1f} s",
        ]
        return "\n".join(lines)

    def __str__(self):
        return self.table()


def confusion_matrix(labels, predictions, num_classes):
    """`(classes, classes)` counts of (true, predicted), pixels labelled 255 left out."""
    labels = np.asarray(labels).reshape(-1).astype("int64")
    predictions = np.asarray(predictions).reshape(-1).astype("int64")
    valid = labels != IGNORE_INDEX
    index = labels[valid] * num_classes + predictions[valid]
    return np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_from_confusion(confusion):
    """Per-class IoU `(classes,)`, NaN where a class is in neither truth nor prediction."""
    confusion = confusion.astype("float64")
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / union, np.nan)


def _batches(data, batch_size):
    """Yield NumPy `(images, labels)` batches from a dataset, an iterable of batches, or a pair of arrays.

    A pair of arrays `(images (N, H, W, 3), labels (N, H, W))` is cut into
    batches of `batch_size` images.
    """
    if isinstance(data, tuple) and len(data) == 2 and np.ndim(data[0]) == 4:
        images, labels = np.asarray(data[0]), np.asarray(data[1])
        if len(images) != len(labels):
            raise ValueError(f"Got {len(images)} images but {len(labels)} label maps.")
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size], labels[start : start + batch_size]
        return
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(
                "Evaluation data must give (images, labels) batches, or be an (images, labels) "
                f"pair of arrays; got an element of type {type(batch).__name__}."
            )
        yield np.asarray(batch[0]), np.asarray(batch[1])


def evaluate_segmentation(
    model,
    data,
    sliding_window=None,
    class_names=None,
    batch_size=8,
    max_images=None,
):
    """Evaluate `model` on `data`; returns an `EvaluationReport`.

    data: batched `tf.data.Dataset` / iterable of `(images (B, H, W, 3),
        labels (B, H, W))`, raw pixels as `predict` takes, or a tuple
        `(images, labels)` of arrays. Labels are compared at the size the
        images have here: a pipeline that resized images (`base_scale`)
        resized its labels too (nearest), unlike mmsegmentation, which
        resizes the scores back to the original labels.
    sliding_window: None predicts whole images (sides multiples of the patch
        size); a `SlidingWindow`, a crop size (int or `(h, w)`) or
        `((h, w), (stride_h, stride_w))` slides windows with per-window pruning.
    class_names: names for the per-class table (default "class_i").
    batch_size: images (or windows) per model call.
    max_images: stop after this many images.
    """
    window = SlidingWindow.from_argument(sliding_window)
    num_classes = model.num_classes
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"Got {len(names)} class names for a model with {num_classes} classes.")
    confusion = np.zeros((num_classes, num_classes), "int64")
    gflops, gflops_aux, dense, alive = [], [], [], []
    windows, images_seen, start = 0, 0, time.perf_counter()
    for images, labels in _batches(data, batch_size):
        check_labels(labels, num_classes, images.shape)
        if max_images is not None:
            images, labels = images[: max_images - images_seen], labels[: max_images - images_seen]
        if window:
            # About `batch_size` windows per call; one score map per image in flight.
            per_call = max(1, batch_size // len(window_positions(*images.shape[1:3], window)))
            results = [
                details
                for start in range(0, len(images), per_call)
                for details in sliding_window_batch(model, images[start : start + per_call], window, batch_size)
            ]
            for details, label in zip(results, labels):
                confusion += confusion_matrix(label, details["scores"].argmax(-1), num_classes)
                gflops.append(details["gflops"])
                gflops_aux.append(details["gflops_with_auxiliary_heads"])
                dense.append(details["dense_gflops"])
                alive.append(details["alive_counts"] / segmenter_tokens(model, window.crop_size))
                windows += len(details["windows"])
        else:
            details = model.predict_details(images, batch_size=batch_size)
            confusion += confusion_matrix(labels, details["scores"].argmax(-1), num_classes)
            gflops.extend(details["gflops"])
            gflops_aux.extend(details["gflops_with_auxiliary_heads"])
            dense.extend([dense_segmenter_flops(model, images.shape[1:3]) / 1e9] * len(images))
            alive.append(details["alive_counts"] / segmenter_tokens(model, images.shape[1:3]))
            windows += len(images)
        images_seen += len(images)
        if max_images is not None and images_seen >= max_images:
            break
    if images_seen == 0:
        raise ValueError("The evaluation data is empty.")
    iou = iou_from_confusion(confusion)
    alive_rows = np.concatenate(alive, axis=0)
    return EvaluationReport(
        miou=float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
        per_class_iou={n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)},
        pixel_accuracy=float(np.trace(confusion) / max(confusion.sum(), 1)),
        gflops=float(np.mean(gflops)),
        gflops_with_auxiliary_heads=float(np.mean(gflops_aux)),
        dense_gflops=float(np.mean(dense)),
        flops_saving=float(1.0 - np.sum(gflops) / np.sum(dense)),
        alive_fraction=alive_rows.mean(axis=0).tolist(),
        num_images=images_seen,
        num_windows=windows,
        seconds=time.perf_counter() - start,
        settings=dict(
            prune_threshold=model.prune_threshold,  # a float, or a tuple per head
            keep_top_k=int(model.keep_top_k),
            pruning_enabled=bool(model.pruning_enabled),
            pruning_mode=model.pruning_mode,
            sliding_window=None if window is None else dataclasses.asdict(window),
        ),
    )

