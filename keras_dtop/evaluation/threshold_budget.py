"""Choose p0 for a budget: the best mIoU whose cost meets a target, in few passes.

`choose_prune_threshold(model, data, target_saving=0.25)` returns the p0 (one
value, or one per pruning head with `per_stage=True`) with the best mIoU among
those that save at least 25% of the GFLOPs, or (`target_ms_per_image=...`)
that run within a time per image on this machine.

Passes over `data`:
1. One recording pass with every token alive and every head graded: each
   head's mask logits and presence logits for every token.
2. Every candidate is simulated from that record with the model's own rule
   (`select_exits`, the canvas, the final scores): estimated exits, GFLOPs and
   mIoU, no model call. The estimate is exact for the first head; later heads
   see the dense features, not the pruned ones, so it is close, not equal.
3. The best candidate that meets the target by estimate is checked with a real
   pruned pass (`evaluate_segmentation`, and timing for a time target). If it
   misses, the next one is checked, at most `max_checks` times.
The result holds the checked numbers, which are what the user gets on `data`.
"""

import dataclasses
import itertools
import time

import numpy as np
from keras import ops

from keras_dtop.evaluation.report import (
    IGNORE_INDEX,
    _batches,
    confusion_matrix,
    evaluate_segmentation,
    iou_from_confusion,
)
from keras_dtop.evaluation.sliding_window import (
    SlidingWindow,
    check_window,
    crop_window,
    pad_pixel,
    window_positions,
)
from keras_dtop.flops import segmenter_flops
from keras_dtop.layers.pruning import check_threshold, select_exits, token_scores
from keras_dtop.models.stage_runner import score_map

DEFAULT_CANDIDATES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 1.0)


@dataclasses.dataclass
class ThresholdChoice:
    """What `choose_prune_threshold` chose and measured.

    prune_threshold: the chosen p0 (float, or tuple per pruning head);
    miou, flops_saving, ms_per_image: measured on the data with a real pruned
    pass (ms_per_image only for a time target; dense_ms_per_image beside it);
    estimated: the simulated `(miou, flops_saving)` of the choice;
    candidates: every candidate's `(p0, estimated miou, estimated saving)`;
    passes: model passes over the data (recording + checks).
    """

    prune_threshold: object
    miou: float
    flops_saving: float
    ms_per_image: float = None
    dense_ms_per_image: float = None
    estimated: tuple = None
    candidates: list = dataclasses.field(default_factory=list)
    passes: int = 0


def _windows(model, images, labels, window):
    """Images and labels cut into the sliding windows the model sees (padded as
    `sliding_window_batch` pads them; padded label pixels are ignored)."""
    if window is None:
        return images, labels
    check_window(model, window)
    fill = pad_pixel(model)
    jobs = [(i, t, l) for i in range(len(images)) for t, l in window_positions(*images.shape[1:3], window)]
    crops = [crop_window(images[i], t, l, window.crop_size, fill) for i, t, l in jobs]
    truth = [crop_window(labels[i], t, l, window.crop_size, IGNORE_INDEX) for i, t, l in jobs]
    return np.stack(crops), np.stack(truth)


def record_heads(model, data, sliding_window=None, batch_size=8):
    """One dense pass: per head `(presence (n, C, 2), mask logits (n, C, tokens))`, labels, image size."""
    window = SlidingWindow.from_argument(sliding_window)
    previous = model.pruning_enabled
    model.pruning_enabled = False
    heads, labels = None, []
    try:
        for images, truth in _batches(data, batch_size):
            images, truth = _windows(model, np.asarray(images), np.asarray(truth), window)
            for start in range(0, len(images), batch_size):
                details = model.predict_details(images[start : start + batch_size], batch_size=batch_size)
                batch = [(h["presence_logits"], h["mask_logits"]) for h in details["heads"]]
                heads = batch if heads is None else [
                    (np.concatenate([p, bp]), np.concatenate([m, bm])) for (p, m), (bp, bm) in zip(heads, batch)
                ]  # fmt: skip
            labels.append(truth)
    finally:
        model.pruning_enabled = previous
    if heads is None:
        raise ValueError("choose_prune_threshold got no data: give (images, labels) batches or arrays.")
    labels = np.concatenate(labels)
    return heads, labels, labels.shape[1:3]


def simulate(model, heads, labels, image_size, p0, keep_top_k, chunk=64):
    """Estimated `(miou, flops_saving, alive_counts)` of p0 from a dense record (see module docstring)."""
    last = len(heads) - 1
    p0 = p0 if isinstance(p0, tuple) else (p0,) * last
    num_images, num_tokens = heads[0][1].shape[0], heads[0][1].shape[2]
    alive = np.ones((num_images, num_tokens), bool)
    exit_stage = np.full((num_images, num_tokens), last)
    counts = []
    for stage in range(last):
        counts.append(alive.sum(-1))
        if p0[stage] < 1.0:
            scores = token_scores(*heads[stage])
            exits = ops.convert_to_numpy(select_exits(scores, alive, p0[stage], keep_top_k))
            exit_stage[exits] = stage
            alive &= ~exits
    counts.append(alive.sum(-1))
    logits = np.stack([m for _, m in heads])  # (stages, n, C, tokens)
    canvas = np.take_along_axis(logits, exit_stage[None, :, None, :], axis=0)[0]
    confusion = 0
    for start in range(0, num_images, chunk):
        part = slice(start, start + chunk)
        final = token_scores(heads[-1][0][part], canvas[part])
        pixels = ops.argmax(score_map(final, image_size, model.backbone.patch_size), axis=-1)
        confusion = confusion + confusion_matrix(labels[part], ops.convert_to_numpy(pixels), model.num_classes)
    miou = float(np.nanmean(iou_from_confusion(confusion)))
    alive_counts = np.stack(counts, axis=-1)
    flops = segmenter_flops(model, alive_counts, image_size)
    dense = segmenter_flops(model, np.full_like(alive_counts, num_tokens), image_size)
    return miou, float(1.0 - np.sum(flops) / np.sum(dense)), alive_counts


def candidate_thresholds(values, num_pruning_heads, per_stage):
    """Scalars, or every combination of one value per pruning head."""
    values = sorted({check_threshold(float(v)) for v in values})
    if not per_stage or num_pruning_heads < 2:
        return values
    combinations = len(values) ** num_pruning_heads
    if combinations > 5000:
        raise ValueError(
            f"per_stage search over {len(values)} values and {num_pruning_heads} heads is "
            f"{combinations} combinations; give fewer candidate values."
        )
    return list(itertools.product(values, repeat=num_pruning_heads))


def _ms_per_image(model, images, batch_size, repeats=3):
    """Median ms per image of `predict_on_batch` over `images` (one warm-up pass)."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            model.predict_on_batch(images[i : i + batch_size])
        times.append((time.perf_counter() - start) / len(images))
    return 1000 * float(np.median(times[1:]))


def choose_prune_threshold(
    model,
    data,
    target_saving=None,
    target_ms_per_image=None,
    candidates=DEFAULT_CANDIDATES,
    per_stage=False,
    sliding_window=None,
    batch_size=8,
    timing_images=32,
    max_checks=4,
):
    """The p0 with the best mIoU on `data` that meets a cost target (see module docstring).

    model: a trained `DToPSegmenter` (its k is used; its p0 is left as it was).
    data: what `evaluate_segmentation` takes: `(images, labels)` arrays or
        batches, raw pixels. It is read several times: give arrays, a list or
        a `tf.data.Dataset`, not a one-shot generator.
    target_saving: fraction of GFLOPs (backbone + final head) to save, in (0, 1).
    target_ms_per_image: measured ms per image of `predict_on_batch` at
        `batch_size` on this machine (timed on the first `timing_images`
        images, or windows); give exactly one of the two targets.
    candidates: p0 values tried; per_stage: try every combination of one
        value per pruning head.
    Returns a `ThresholdChoice`; raises ValueError if no candidate meets the
    target after `max_checks` real passes.
    """
    if (target_saving is None) == (target_ms_per_image is None):
        raise ValueError("Give exactly one target: target_saving or target_ms_per_image.")
    if target_saving is not None and not 0.0 < float(target_saving) < 1.0:
        raise ValueError(f"target_saving is a fraction of GFLOPs in (0, 1), got {target_saving}.")
    if target_ms_per_image is not None and not float(target_ms_per_image) > 0:
        raise ValueError(f"target_ms_per_image must be > 0, got {target_ms_per_image}.")
    if isinstance(max_checks, bool) or int(max_checks) < 1:
        raise ValueError(f"max_checks must be an int >= 1, got {max_checks}.")
    num_heads = len(model.stage_ends) - 1
    if num_heads < 1:
        raise ValueError("The model has a single stage: there is no p0 to choose.")
    window = SlidingWindow.from_argument(sliding_window)
    options = candidate_thresholds(candidates, num_heads, per_stage)
    heads, labels, image_size = record_heads(model, data, window, batch_size)
    passes = 1
    table = []
    for p0 in options:
        miou, saving, _ = simulate(model, heads, labels, image_size, p0, model.keep_top_k)
        table.append((p0, miou, saving))

    timing = dense_ms = None
    if target_ms_per_image is not None:
        images = np.concatenate([b[0] for b in _batches(data, batch_size)])
        timing = _windows(model, images, np.zeros(images.shape[:3], "uint8"), window)[0][:timing_images]
        previous = model.pruning_enabled
        model.pruning_enabled = False
        try:
            dense_ms = _ms_per_image(model, timing, batch_size)
        finally:
            model.pruning_enabled = previous
        # Rank by estimated time: dense time scaled by the GFLOPs left.
        estimate_ok = [row for row in table if dense_ms * (1 - row[2]) <= target_ms_per_image]
    else:
        estimate_ok = [row for row in table if row[2] >= target_saving]
    ranked = sorted(estimate_ok, key=lambda row: (-row[1], -row[2]))
    if not ranked:
        best = max(row[2] for row in table)
        raise ValueError(
            f"No candidate p0 reaches the target by estimate: the most any saves is {100 * best:.1f}% "
            "of GFLOPs. Give lower candidate values or a looser target."
        )

    previous = model.prune_threshold, model.pruning_enabled
    misses = []
    try:
        for p0, est_miou, est_saving in ranked[: int(max_checks)]:
            model.prune_threshold, model.pruning_enabled = p0, True
            report = evaluate_segmentation(model, data, window, batch_size=batch_size)
            passes += 1
            ms = _ms_per_image(model, timing, batch_size) if timing is not None else None
            met = ms <= target_ms_per_image if timing is not None else report.flops_saving >= target_saving
            if met:
                return ThresholdChoice(p0, report.miou, report.flops_saving, ms, dense_ms,
                                       (est_miou, est_saving), table, passes)  # fmt: skip
            misses.append((p0, report.flops_saving, ms))
    finally:
        model.prune_threshold, model.pruning_enabled = previous
    raise ValueError(
        f"The {len(misses)} best candidates by estimate missed the target when run: "
        + "; ".join(f"p0 {p} saved {100 * s:.1f}%" + ("" if m is None else f", {m:.2f} ms") for p, s, m in misses)
        + ". Raise max_checks or loosen the target."
    )
