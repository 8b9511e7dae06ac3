"""`keras-dtop export MODEL.keras --format tflite --out OUT`: SavedModel or LiteRT.

Exports always run under the TensorFlow backend (in a subprocess when
KERAS_BACKEND names another), so a `.keras` file trained under any backend
can be exported.
"""

import argparse
import os


def _capacity(text):
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def add_parser(commands, name):
    export = commands.add_parser(
        name, help="export a .keras DToPSegmenter to a TF SavedModel or a .tflite file"
    )
    export.add_argument("model", help="a .keras file written by DToPSegmenter.save()")
    export.add_argument("--format", choices=("saved_model", "tflite"), default="tflite")
    export.add_argument("--out", required=True, help="SavedModel folder or .tflite file to write")
    export.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="input height and width (default: the backbone's image_size)")  # fmt: skip
    export.add_argument("--batch-size", type=int, default=None,
                        help="fixed batch (TFLite default 1; SavedModel default: dynamic)")  # fmt: skip
    export.add_argument("--input-dtype", choices=("float32", "uint8"), default="float32")
    export.add_argument("--include-preprocessing", action=argparse.BooleanOptionalAction,
                        default=None, help="take raw [0, 255] pixels (default: if the model "
                        "has a preprocessor)")  # fmt: skip
    export.add_argument("--quantization", choices=("none", "float16", "int8"), default="none",
                        help="TFLite weights: float32 (none), float16 or dynamic-range int8")  # fmt: skip
    export.add_argument("--pruning-mode", choices=("gathered", "capacity", "masked"),
                        help="gathered: dynamic alive tokens (default); capacity: static shapes")  # fmt: skip
    export.add_argument("--pruning-enabled", action=argparse.BooleanOptionalAction, default=None,
                        help="--no-pruning-enabled exports the dense model")  # fmt: skip
    export.add_argument("--stage-capacity", type=_capacity, nargs="+",
                        help="capacity mode: tokens (int) or fraction (float) per pruning head")  # fmt: skip
    export.add_argument("--quiet", action="store_true", help="print nothing on success")


def run(args):
    # Under another KERAS_BACKEND the export functions rebuild the model under TensorFlow.
    from keras_dtop.export import export_saved_model, export_tflite, tflite_operators

    options = dict(
        image_size=args.image_size,
        batch_size=args.batch_size,
        input_dtype=args.input_dtype,
        include_preprocessing=args.include_preprocessing,
        pruning_mode=args.pruning_mode,
        pruning_enabled=args.pruning_enabled,
        stage_capacity=args.stage_capacity,
    )
    if args.format == "tflite":
        options["batch_size"] = options["batch_size"] or 1
        path = export_tflite(args.model, args.out, quantization=args.quantization, **options)
    else:
        path = export_saved_model(args.model, args.out, **options)
    if not args.quiet:
        print(f"wrote {path}")
        if args.format == "tflite":
            print(f"  {os.path.getsize(path) / 2**20:.1f} MiB, operators: {', '.join(tflite_operators(path))}")
    return 0
