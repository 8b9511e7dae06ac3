"""Train a small DToP segmenter on the built-in synthetic data, dense then pruned.

    python examples/quickstart.py [--out quickstart_out] [--threshold 0.9]

Runs in a few minutes on 2 CPU cores with any KERAS_BACKEND:
1. dense phase: pruning off, backbone and all grading heads trained jointly;
2. pruning fine-tune: the same model with p0 < 1, pruning active in training;
3. evaluation of both on held-out images: mIoU, tokens pruned per stage,
   GFLOPs per image with and without pruning (analytic count);
4. writes `dtop_quickstart.keras` and `quickstart.png` (image | ground truth |
   prediction | exit stage of every token) to --out.
"""

import argparse
import os
import time

import keras
import numpy as np

import keras_dtop
from keras_dtop.data import CLASS_NAMES, synthetic_segmentation
from keras_dtop.flops import segmenter_flops
from keras_dtop.visualization import class_palette, panel

IMAGE_SIZE = (64, 64)
def build_model(threshold):
    backbone = keras_dtop.DToPBackbone(
        patch_size=8,
        hidden_dim=96,
        num_layers=6,
        num_heads=3,
        mlp_dim=192,
        image_size=IMAGE_SIZE,
        stage_ends=(1, 3, 5),
    )
    converter = keras_dtop.DToPImageConverter.from_mean_std()
    return keras_dtop.DToPSegmenter(
        backbone,
        num_classes=len(CLASS_NAMES),
        class_names=list(CLASS_NAMES),
        palette=class_palette(len(CLASS_NAMES)).tolist(),
        prune_threshold=threshold,
        keep_top_k=5,
        head_hidden_dim=48,
        head_num_heads=3,
        head_num_layers=2,
        pruning_enabled=False,
        preprocessor=keras_dtop.DToPImageSegmenterPreprocessor(image_converter=converter),
    )


def evaluate(model, images, labels):
    """mIoU, per-stage kept fractions and GFLOPs per image for the current setting."""
    result = model.evaluate(images, labels, batch_size=16, verbose=0, return_dict=True)
    details = model.predict_details(images, batch_size=16)
    counts = details["alive_counts"]
    tokens = details["exit_stage"][0].size
    flops = segmenter_flops(model, counts, IMAGE_SIZE)
    flops_with_aux = segmenter_flops(model, counts, IMAGE_SIZE, include_auxiliary_heads=True)
    return {
        "miou": result["miou"],
        "kept": counts.mean(0) / tokens,
        "gflops": flops.mean() / 1e9,
        "gflops_with_aux": flops_with_aux.mean() / 1e9,
        "details": details,
    }


def save_png(path, image, label, prediction, exit_stage, num_stages, caption):
    from PIL import Image

    picture = panel(image, prediction, exit_stage, num_stages, label=label,
                    class_names=list(CLASS_NAMES), palette=class_palette(len(CLASS_NAMES)), caption=caption)  # fmt: skip
    Image.fromarray(picture).save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="quickstart_out")
    parser.add_argument("--threshold", type=float, default=0.9, help="p0 for the fine-tune")
    parser.add_argument("--train-images", type=int, default=512)
    parser.add_argument("--dense-epochs", type=int, default=24)
    parser.add_argument("--prune-epochs", type=int, default=6)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    keras.utils.set_random_seed(0)
    start = time.time()

    images, labels = synthetic_segmentation(args.train_images, IMAGE_SIZE, seed=0)
    test_images, test_labels = synthetic_segmentation(64, IMAGE_SIZE, seed=1)
    images, test_images = images.astype("float32"), test_images.astype("float32")
    labels, test_labels = labels.astype("int32"), test_labels.astype("int32")

    model = build_model(args.threshold)
    steps = args.train_images // 16 * (args.dense_epochs + args.prune_epochs)
    model.compile(
        optimizer=keras_dtop.optimizers.dtop_optimizer(
            total_steps=steps, learning_rate=1e-3, warmup_steps=20, head_lr_multiplier=1.0
        )
    )
    print(f"backend {keras.config.backend()}: dense phase ({args.dense_epochs} epochs)")
    model.fit(images, labels, batch_size=16, epochs=args.dense_epochs, verbose=2)
    dense = evaluate(model, test_images, test_labels)

    print(f"pruning fine-tune, p0 = {args.threshold} ({args.prune_epochs} epochs)")
    model.pruning_enabled = True
    model.fit(images, labels, batch_size=16, epochs=args.prune_epochs, verbose=2)
    pruned = evaluate(model, test_images, test_labels)
    model.pruning_enabled = False
    dense_after = evaluate(model, test_images, test_labels)
    model.pruning_enabled = True

    stages = len(model.stage_ends)
    print("\n=== held-out images (64) ===")
    print(f"{'':34}{'mIoU':>7}{'GFLOPs':>9}{'+aux heads':>12}  tokens seen by head 1..{stages}")
    for name, r in (
        ("after dense phase, no pruning", dense),
        ("after fine-tune, no pruning", dense_after),
        (f"after fine-tune, pruning p0={args.threshold}", pruned),
    ):
        kept = " ".join(f"{k:.2f}" for k in r["kept"])
        print(f"{name:34}{r['miou']:7.3f}{r['gflops']:9.4f}{r['gflops_with_aux']:12.4f}  {kept}")
    exited = pruned["details"]["exit_stage"].reshape(len(test_images), -1)
    for j in range(stages - 1):
        print(f"tokens pruned after stage {j + 1}: {np.mean(exited == j):.1%}")
    saving = 1 - pruned["gflops"] / dense_after["gflops"]
    print(f"GFLOPs saved by pruning: {saving:.1%} (backbone + final head, per image)")

    model.save(os.path.join(args.out, "dtop_quickstart.keras"))
    scores = model.predict(test_images[:1], verbose=0)
    save_png(
        os.path.join(args.out, "quickstart.png"),
        test_images[0].astype(np.uint8),
        test_labels[0],
        scores[0].argmax(-1),
        pruned["details"]["exit_stage"][0],
        stages,
        f"p0 = {args.threshold}: {pruned['details']['gflops'][0]:.4f} GFLOPs, "
        f"{1 - pruned['details']['gflops'][0] / dense_after['gflops']:.0%} saved vs dense",
    )
    print(f"wrote {args.out}/dtop_quickstart.keras and {args.out}/quickstart.png")
    print(f"total time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
