"""Draw where tokens exit: panels of the quickstart model on its held-out scenes.

    python examples/see_it.py [quickstart_out/dtop_quickstart.keras] [--out docs/see_it.png]

Each row: image | ground truth | prediction | exit stage of every token (green:
exited after stage 1, yellow: after stage 2, red: reached the last stage),
with the legend and the image's GFLOPs and saving. Run the quickstart first.
"""

import argparse

import numpy as np
from PIL import Image

from keras_dtop.data import CLASS_NAMES, synthetic_segmentation
from keras_dtop.flops import dense_segmenter_flops
from keras_dtop.models import load_segmenter
from keras_dtop.visualization import class_palette, grid, panel


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="quickstart_out/dtop_quickstart.keras")
    parser.add_argument("--out", default="see_it.png")
    parser.add_argument("--count", type=int, default=3, help="scenes to draw")
    args = parser.parse_args()

    model = load_segmenter(args.model)
    images, labels = synthetic_segmentation(args.count, (64, 64), seed=1)  # the quickstart's test scenes
    details = model.predict_details(images)
    dense = dense_segmenter_flops(model, images.shape[1:3]) / 1e9
    names = list(model.class_names or CLASS_NAMES)
    palette = np.asarray(model.palette or class_palette(len(names)))
    panels = [
        panel(image.astype(np.uint8), scores.argmax(-1), exits, len(model.stage_ends), label=label,
              palette=palette, class_names=names, caption=f"{gflops:.4f} GFLOPs, {1 - gflops / dense:.0%} saved")
        for image, label, scores, exits, gflops in
        zip(images, labels, details["scores"], details["exit_stage"], details["gflops"])
    ]  # fmt: skip
    Image.fromarray(grid(panels)).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
