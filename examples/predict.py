"""Build a DToP segmenter, run it on a few images, and show what pruning did.

    python examples/predict.py [--preset dtop_vit_tiny] [--threshold 0.3]

Weights are random (no pretrained DToP weights exist), so the predicted
classes mean nothing. Untrained heads are never confident, so by default p0
is set to the median confidence of the first head on these images: about half
the tokens become exit candidates and the exit bookkeeping can be seen.
Works on any KERAS_BACKEND.
"""

import argparse

import keras
import numpy as np

import keras_dtop


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="dtop_vit_tiny", choices=keras_dtop.presets)
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--size", type=int, default=128, help="image side, a multiple of 16")
    parser.add_argument("--threshold", type=float, default=None, help="p0 in (0, 1]")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    # An architecture preset: random weights (load_weights=False says we know).
    model = keras_dtop.DToPSegmenter.from_preset(
        args.preset, num_classes=args.num_classes, load_weights=False
    )
    images = np.random.default_rng(0).uniform(0, 255, (2, args.size, args.size, 3))
    if args.threshold is None:
        model.pruning_enabled = False
        first_head = model.predict_details(images)["heads"][0]["token_scores"]
        model.pruning_enabled = True
        args.threshold = float(np.median(first_head.max(axis=1)))
    model.prune_threshold = args.threshold

    scores = model.predict(images, verbose=0)  # preprocessing + pruned ("gathered") inference
    details = model.predict_details(images)
    model.pruning_mode = "masked"  # the static-shape reference: same result, no saving
    reference = model.predict(images, verbose=0)
    model.pruning_mode = "auto"
    print(f"backend {keras.config.backend()}, preset {args.preset}, p0 {model.prune_threshold:.4f}")
    print(f"scores {scores.shape}, label map {np.argmax(scores, -1).shape}")
    print(f"pruned vs masked inference: max |difference| {np.abs(scores - reference).max():.1e}")
    print(f"GFLOPs per image: {np.round(details['gflops'], 3)} (auxiliary heads included: "
          f"{np.round(details['gflops_with_auxiliary_heads'], 3)})")
    tokens = details["exit_stage"][0].size
    for image, counts in enumerate(details["alive_counts"]):
        seen = ", ".join(f"head {j}: {int(c)}/{tokens}" for j, c in enumerate(counts))
        print(f"image {image}: tokens seen by each head: {seen}")
    print("exit stage of every token, image 0 (2 = reached the last stage):")
    print(details["exit_stage"][0])


if __name__ == "__main__":
    main()
