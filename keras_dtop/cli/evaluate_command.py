"""`keras-dtop evaluate MODEL --data FOLDER`: mIoU, per-class IoU, GFLOPs and alive tokens per stage.

Reads a folder of images and masks (`keras_dtop.data.folder_dataset`
layouts), runs the model (whole images padded to the patch size, or the
paper's sliding windows), prints the report table and optionally writes it as JSON.
"""

import numpy as np

from keras_dtop.cli.model_source import open_model
from keras_dtop.cli.predict_command import sliding_window_argument


def add_parser(commands, name):
    parser = commands.add_parser(name, help="evaluate on a folder of images and masks; print the report")
    parser.add_argument("model", help="a .keras file or a preset directory")
    parser.add_argument("--data", required=True, help="dataset folder (see --layout)")
    parser.add_argument("--layout", choices=("stem", "ade20k", "voc"), default="stem",
                        help="stem: images/ and masks/ paired by file stem (default); ade20k; voc")  # fmt: skip
    parser.add_argument("--split", help="the layout's split (ade20k: validation; voc: val, ...)")
    parser.add_argument("--images-dir", default="images", help="stem layout: image subfolder")
    parser.add_argument("--masks-dir", default="masks", help="stem layout: mask subfolder")
    parser.add_argument("--reduce-zero-label", action="store_true", default=None,
                        help="mask value 0 is 'unlabelled' (default for ade20k)")  # fmt: skip
    parser.add_argument("--sliding-window", type=int, nargs=2, metavar=("H", "W"),
                        help="the paper's protocol: windows of this crop over every image")  # fmt: skip
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="window step (2/3 crop)")
    parser.add_argument("--p0", type=float, nargs="+",
                        help="pruning threshold for this run: one value, or one per pruning head")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=4, help="images (or windows) per model call")
    parser.add_argument("--max-images", type=int, help="stop after this many images")
    parser.add_argument("--json", help="also write the report to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def with_progress(dataset, total, quiet):
    """The dataset's batches as NumPy, advancing a progress bar of `total` images."""
    from keras.utils import Progbar

    progress = None if quiet else Progbar(total, unit_name="image")
    for images, labels in dataset:
        images, labels = np.asarray(images), np.asarray(labels)
        yield images, labels
        if progress is not None:
            progress.add(len(images))


def run(args):
    from keras_dtop.data import folder_dataset
    from keras_dtop.data.folder import pair_files
    from keras_dtop.evaluation import evaluate_segmentation

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}.")
    window = sliding_window_argument(args)
    source = open_model(args.model)
    if source.kind != "keras":
        raise ValueError(f"evaluate needs a .keras model or a preset directory, not a .{source.kind} file.")
    model = source.model
    if args.p0 is not None:
        model.prune_threshold = args.p0[0] if len(args.p0) == 1 else args.p0
    pairs = pair_files(args.data, args.layout, args.split, args.images_dir, args.masks_dir)
    dataset = folder_dataset(
        args.data,
        num_classes=model.num_classes,
        layout=args.layout,
        split=args.split,
        images_dir=args.images_dir,
        masks_dir=args.masks_dir,
        reduce_zero_label=args.reduce_zero_label,
        # Windows see each image at its own size; whole images are padded to the patch grid.
        batch_size=1 if window else args.batch_size,
        size_divisor=None if window else model.backbone.patch_size,
    )
    total = len(pairs) if args.max_images is None else min(len(pairs), args.max_images)
    report = evaluate_segmentation(
        model,
        with_progress(dataset, total, args.quiet),
        sliding_window=window,
        class_names=source.class_names,
        batch_size=args.batch_size,
        max_images=args.max_images,
    )
    print(report.table())
    if args.json:
        report.save_json(args.json)
        print(f"wrote {args.json}")
    return 0
