"""Accuracy vs cost of DToP on real photographs: dense vs pruned, trained as the method does.

    apt-get install dataset-fashion-mnist        # MIT licence, offline product photos
    python benchmarks/accuracy.py                # ~40 min on 2 CPU cores (JAX)
    python benchmarks/accuracy.py --quick        # a 2-minute smoke run

Data: scenes of 2-4 Fashion-MNIST items (scaled 1.5-2.25x, tinted) on smooth random
backgrounds (`keras_dtop.data.canvas`), 5 classes: background and 4 item groups (tops,
trousers, footwear, bags; `--fine-classes`: the 10 item classes);
training scenes use the training photographs, test scenes the test
photographs (disjoint items). Training uses the method's augmentation
(`keras_dtop.data.segmentation_pipeline`: random resize 0.5-2.0, class-balanced
crop, flip, photometric distortion); testing slides crop-sized windows over
each scene, every window pruning on its own.

Protocol (design doc §4.1): (1) dense training, pruning off; (2a) the pruning
fine-tune (p0 < 1, pruning active in training) from the dense weights; (2b)
a fair baseline: the same number of extra steps from the same weights with
pruning off. Printed: mIoU, pixel accuracy, GFLOPs per image (summed over
windows, backbone + final head) and the saving against dense, fraction of
tokens alive per stage, for each model and for a sweep of p0 at inference.
`--json` writes everything.
"""

import argparse
import json
import os
import tempfile
import time

import keras
import numpy as np

import keras_dtop
from keras_dtop.data import array_dataset, segmentation_pipeline
from keras_dtop.data.canvas import compose_canvases
from keras_dtop.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from keras_dtop.evaluation import SlidingWindow, evaluate_segmentation

# Coarse classes by default: shape at 8-pixel patches tells a shoe from a bag, but a small ViT
# trained from scratch for minutes on 2 CPU cores does not learn shirt vs T-shirt vs pullover.
GROUPS = {
    "top": ("t-shirt/top", "pullover", "dress", "coat", "shirt"),
    "trouser": ("trouser",),
    "footwear": ("sandal", "sneaker", "ankle boot"),
    "bag": ("bag",),
}
COARSE = np.array([next(i for i, g in enumerate(GROUPS.values()) if name in g) for name in CLASS_NAMES])


def build_model(crop, threshold, num_classes):
    backbone = keras_dtop.DToPBackbone(
        patch_size=8,
        hidden_dim=96,
        num_layers=6,
        num_heads=3,
        mlp_dim=384,
        image_size=crop,
        stage_ends=(1, 3, 5),
    )
    converter = keras_dtop.DToPImageConverter.from_mean_std()
    return keras_dtop.DToPSegmenter(
        backbone,
        num_classes=num_classes,
        prune_threshold=threshold,
        keep_top_k=5,
        head_hidden_dim=64,
        head_num_heads=4,
        head_num_layers=2,
        pruning_enabled=False,
        preprocessor=keras_dtop.DToPImageSegmenterPreprocessor(image_converter=converter),
    )


def scenes(split, count, size, seed, fine):
    items, classes = load_fashion_mnist(split)
    if not fine:
        classes = COARSE[classes]
    return compose_canvases(
        items, classes, count, size, items_per_image=(2, 4), scale_range=(1.5, 2.25), seed=seed
    )


def train(model, images, labels, steps, learning_rate, args, seed):
    """`steps` optimiser steps of `fit` on the augmented pipeline, a fresh schedule."""
    model.compile(
        optimizer=keras_dtop.optimizers.dtop_optimizer(
            total_steps=steps, learning_rate=learning_rate, warmup_steps=min(100, steps // 10),
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
        augment=not args.no_augment,
    )
    start = time.perf_counter()
    epochs = max(1, round(steps / 100))
    history = model.fit(data, steps_per_epoch=-(-steps // epochs), epochs=epochs, verbose=2)
    return time.perf_counter() - start, {k: float(v[-1]) for k, v in history.history.items()}


def evaluate(model, images, labels, window, names, threshold=None, pruning=True):
    previous = model.prune_threshold, model.pruning_enabled
    if threshold is not None:
        model.prune_threshold = threshold
    model.pruning_enabled = pruning
    try:
        report = evaluate_segmentation(model, (images, labels), window, class_names=names, batch_size=64)
    finally:
        model.prune_threshold, model.pruning_enabled = previous
    return report


def row(name, report, dense_gflops):
    alive = " ".join(f"{a:.2f}" for a in report.alive_fraction)
    saving = 1 - report.gflops / dense_gflops
    return (
        f"{name:44}{100 * report.miou:7.2f}{100 * report.pixel_accuracy:8.2f}"
        f"{report.gflops:9.4f}{100 * saving:8.1f}%  {alive}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-scenes", type=int, default=2000)
    parser.add_argument("--test-scenes", type=int, default=200)
    parser.add_argument("--size", type=int, default=96, help="scene side (pixels)")
    parser.add_argument("--crop", type=int, default=64, help="training crop = test window")
    parser.add_argument("--stride", type=int, default=32, help="test window stride")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dense-steps", type=int, default=4000)
    parser.add_argument("--prune-steps", type=int, default=1000)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="dense phase; the fine-tune uses 1/5")
    parser.add_argument("--head-lr-multiplier", type=float, default=1.0, help="the method uses 10")
    parser.add_argument("--threshold", type=float, default=0.9, help="p0 of the fine-tune")
    parser.add_argument("--sweep", type=float, nargs="*", default=[0.8, 0.95, 0.99])
    parser.add_argument("--no-augment", action="store_true", help="random crops only, no resize/flip/colour")
    parser.add_argument("--fine-classes", action="store_true", help="the 10 item classes, not 4 groups")
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.train_scenes, args.test_scenes, args.dense_steps, args.prune_steps = 64, 8, 20, 10
    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    size, crop = (args.size, args.size), (args.crop, args.crop)
    names = ("background",) + (CLASS_NAMES if args.fine_classes else tuple(GROUPS))
    images, labels = scenes("train", args.train_scenes, size, 0, args.fine_classes)
    test_images, test_labels = scenes("test", args.test_scenes, size, 1, args.fine_classes)
    window = SlidingWindow(crop, (args.stride, args.stride))
    print(f"backend {keras.config.backend()}; {len(images)} training scenes, {len(test_images)} test scenes "
          f"{size}, crop/window {crop}, stride {args.stride}", flush=True)  # fmt: skip

    model = build_model(crop, args.threshold, len(names))
    print(f"\n(1) dense training, {args.dense_steps} steps", flush=True)
    dense_s, _ = train(model, images, labels, args.dense_steps, args.learning_rate, args, seed=1)
    dense_report = evaluate(model, test_images, test_labels, window, names, pruning=False)
    path = os.path.join(tempfile.mkdtemp(), "dense.keras")
    model.save(path)

    print(f"\n(2a) pruning fine-tune, p0 = {args.threshold}, {args.prune_steps} steps", flush=True)
    model.pruning_enabled = True
    prune_s, _ = train(model, images, labels, args.prune_steps, args.learning_rate / 5, args, seed=2)
    print(f"\n(2b) fair baseline: {args.prune_steps} more dense steps", flush=True)
    baseline = keras.saving.load_model(path)
    baseline_s, _ = train(baseline, images, labels, args.prune_steps, args.learning_rate / 5, args, seed=2)

    reports = {
        "dense phase only, no pruning": dense_report,
        "dense + more dense steps (baseline)": evaluate(baseline, test_images, test_labels, window, names, pruning=False),
        "DToP fine-tuned, pruning off": evaluate(model, test_images, test_labels, window, names, pruning=False),
        f"DToP fine-tuned, pruned p0={args.threshold}": evaluate(model, test_images, test_labels, window, names),
    }
    for threshold in args.sweep:
        reports[f"DToP fine-tuned, pruned p0={threshold}"] = evaluate(
            model, test_images, test_labels, window, names, threshold=threshold
        )
    dense_gflops = dense_report.dense_gflops
    total_s = time.perf_counter() - start
    print(f"\n=== {len(test_images)} test scenes, sliding window {crop} stride {args.stride} ===")
    print(f"{'':44}{'mIoU':>7}{'pixAcc':>8}{'GFLOPs':>9}{'saved':>9}  alive per stage")
    for name, report in reports.items():
        print(row(name, report, dense_gflops))
    base, pruned = reports["dense + more dense steps (baseline)"], reports[f"DToP fine-tuned, pruned p0={args.threshold}"]
    print(
        f"\nDToP at p0={args.threshold} vs the equally trained dense baseline: "
        f"mIoU {100 * (pruned.miou - base.miou):+.2f} points, GFLOPs {100 * (pruned.gflops / dense_gflops - 1):+.1f}% "
        "(paper: 20-35% fewer GFLOPs for at most 0.5 mIoU lost)"
    )
    print(f"time: dense {dense_s:.0f} s, fine-tune {prune_s:.0f} s, baseline {baseline_s:.0f} s, total {total_s:.0f} s")
    print("\nper-class IoU (%), baseline vs DToP pruned:")
    for name in names:
        a, b = base.per_class_iou[name], pruned.per_class_iou[name]
        print(f"  {name:12} {100 * (a or 0):6.2f} {100 * (b or 0):6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    args=vars(args),
                    backend=keras.config.backend(),
                    seconds=dict(dense=dense_s, fine_tune=prune_s, baseline=baseline_s, total=total_s),
                    reports={k: r.as_dict() for k, r in reports.items()},
                ),
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
