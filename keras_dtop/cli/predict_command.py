"""`keras-dtop predict MODEL IMAGES_OR_FOLDERS... --out DIR`: label PNGs, overlays, exit maps, a summary.

For every image: `NAME.png`, its class ids as a palette PNG (the model's
palette; `read_mask` reads the ids back), and on request `NAME_overlay.png`
(prediction over the image) and `NAME_exit.png` (each token coloured by the
stage it exited after). `summary.csv` and `summary.json` list per image its
size, GFLOPs, dense GFLOPs, saving and alive tokens per stage.
"""

import csv
import json
from pathlib import Path

import numpy as np

from keras_dtop.cli.image_files import collect_images, read_rgb
from keras_dtop.cli.model_source import open_model


def add_parser(commands, name):
    parser = commands.add_parser(name, help="segment images or folders of images; write label PNGs")
    parser.add_argument("model", help="a .keras file, a preset directory, a .tflite or an .onnx file")
    parser.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--out", required=True, help="folder to write into (created)")
    parser.add_argument("--overlay", action="store_true", help="also write NAME_overlay.png")
    parser.add_argument("--exit-map", action="store_true", help="also write NAME_exit.png")
    parser.add_argument("--opacity", type=float, default=0.5, help="overlay opacity in [0, 1] (0.5)")
    parser.add_argument("--sliding-window", type=int, nargs=2, metavar=("H", "W"),
                        help="segment window by window with this crop (any image size)")  # fmt: skip
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"),
                        help="sliding-window step (default: 2/3 of the crop)")  # fmt: skip
    parser.add_argument("--p0", type=float, nargs="+",
                        help="pruning threshold for this run (.keras / presets): one value, or one per pruning head")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=4, help="images (or windows) per model call")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def sliding_window_argument(args):
    from keras_dtop.evaluation import SlidingWindow

    if args.sliding_window is None:
        if args.stride is not None:
            raise ValueError("--stride needs --sliding-window.")
        return None
    return SlidingWindow(tuple(args.sliding_window), None if args.stride is None else tuple(args.stride))


def image_size(path):
    """(height, width) from the file's header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read {path} as an image: {error}") from None


def save_labels(path, labels, palette):
    """Class ids as a palette PNG (ids <= 255) or a 16-bit greyscale PNG."""
    from PIL import Image

    if len(palette) <= 256:
        picture = Image.fromarray(labels.astype(np.uint8), mode="P")
        picture.putpalette(np.asarray(palette, np.uint8).ravel().tolist())
    else:
        picture = Image.fromarray(labels.astype(np.uint16))
    picture.save(path)


def run(args):
    from keras.utils import Progbar
    from PIL import Image

    from keras_dtop.visualization import exit_stage_overlay, label_overlay

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}.")
    if not 0.0 <= args.opacity <= 1.0:
        raise ValueError(f"--opacity must be in [0, 1], got {args.opacity}.")
    window = sliding_window_argument(args)
    files = collect_images(args.images)
    source = open_model(args.model)
    if args.p0 is not None:
        source.set_prune_threshold(args.p0[0] if len(args.p0) == 1 else args.p0)
    groups = {}  # images of one size share model calls
    for path, name in files:
        size = image_size(path)
        source.check_size(*size, window)
        groups.setdefault(size, []).append((path, name))

    out = Path(args.out)
    rows = []
    progress = None if args.quiet else Progbar(len(files), unit_name="image")
    for size, members in groups.items():
        for start in range(0, len(members), args.batch_size):
            chunk = members[start : start + args.batch_size]
            images = np.stack([read_rgb(path) for path, _ in chunk])
            for (path, name), image, result in zip(chunk, images, source.segment(images, args.batch_size, window)):
                target = out / name
                target.parent.mkdir(parents=True, exist_ok=True)
                save_labels(f"{target}.png", result.labels, source.palette)
                if args.overlay:
                    picture = label_overlay(image, result.labels, source.palette, args.opacity)
                    Image.fromarray(picture).save(f"{target}_overlay.png")
                if args.exit_map:
                    picture = exit_stage_overlay(image, result.exit_stage, source.num_stages, args.opacity)
                    Image.fromarray(picture).save(f"{target}_exit.png")
                rows.append(summary_row(str(path), size, result))
            if progress is not None:
                progress.add(len(chunk))
    write_summary(out, rows, source.num_stages)
    if not args.quiet:
        print(f"wrote {len(rows)} label maps and summary.csv/json to {out}")
    return 0


def summary_row(path, size, result):
    row = {"image": path, "height": size[0], "width": size[1], "gflops": None, "dense_gflops": None, "saving": None}
    if result.gflops is not None:
        saving = 1.0 - result.gflops / result.dense_gflops
        row.update({key: float(f"{value:.6g}") for key, value in
                    (("gflops", result.gflops), ("dense_gflops", result.dense_gflops), ("saving", saving))})  # fmt: skip
    row.update({f"alive_stage_{j + 1}": int(a) for j, a in enumerate(result.alive)})
    return row


def write_summary(out, rows, num_stages):
    out.mkdir(parents=True, exist_ok=True)
    columns = ["image", "height", "width", "gflops", "dense_gflops", "saving"]
    columns += [f"alive_stage_{j + 1}" for j in range(num_stages)]
    with open(out / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
