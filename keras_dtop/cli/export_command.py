"""`keras-dtop export MODEL.keras --format tflite --out OUT`: SavedModel, LiteRT or ONNX.

Exports always run under the TensorFlow backend (in a subprocess when
KERAS_BACKEND names another), so a `.keras` file trained under any backend
can be exported.
"""

import argparse
import os

from keras_dtop.export.onnx import DEFAULT_OPSET


def _capacity(text):
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def add_parser(commands, name):
    export = commands.add_parser(
        name, help="export a .keras DToPSegmenter to a TF SavedModel, a .tflite or an .onnx file"
    )
    export.add_argument("model", help="a .keras file written by DToPSegmenter.save()")
    export.add_argument("--format", choices=("saved_model", "tflite", "onnx"), default="tflite")
    export.add_argument("--out", required=True, help="SavedModel folder, .tflite or .onnx file to write")
    export.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="input height and width (default: the backbone's image_size)")  # fmt: skip
    export.add_argument("--batch-size", type=int, default=None,
                        help="fixed batch (TFLite default 1; SavedModel and ONNX default: dynamic)")  # fmt: skip
    export.add_argument("--input-dtype", choices=("float32", "uint8"), default="float32")
    export.add_argument("--include-preprocessing", action=argparse.BooleanOptionalAction,
                        default=None, help="take raw [0, 255] pixels (default: if the model "
                        "has a preprocessor)")  # fmt: skip
    export.add_argument("--quantization", choices=("none", "float16", "int8", "full_int8"), default="none",
                        help="TFLite: float32 (none), float16 weights, dynamic-range int8 (int8 "
                        "weights) or full_int8 (int8 weights and activations, needs "
                        "--calibration-data)")  # fmt: skip
    export.add_argument("--calibration-data", metavar="PATH",
                        help="full_int8: a .npy array (count, H, W, 3) or a folder of images of "
                        "the export's size, e.g. validation images")  # fmt: skip
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    export.add_argument("--pruning-mode", choices=("gathered", "capacity", "masked"),
                        help="gathered: dynamic alive tokens (default); capacity: static shapes")  # fmt: skip
    export.add_argument("--pruning-enabled", action=argparse.BooleanOptionalAction, default=None,
                        help="--no-pruning-enabled exports the dense model")  # fmt: skip
    export.add_argument("--stage-capacity", type=_capacity, nargs="+",
                        help="capacity mode: tokens (int) or fraction (float) per pruning head")  # fmt: skip
    export.add_argument("--quiet", action="store_true", help="print nothing on success")


def run(args):
    # Under another KERAS_BACKEND the export functions rebuild the model under TensorFlow.
    from keras_dtop.export import export_onnx, export_saved_model, export_tflite, tflite_operators

    options = dict(
        image_size=args.image_size,
        batch_size=args.batch_size,
        input_dtype=args.input_dtype,
        include_preprocessing=args.include_preprocessing,
        pruning_mode=args.pruning_mode,
        pruning_enabled=args.pruning_enabled,
        stage_capacity=args.stage_capacity,
    )
    if args.format != "tflite" and (args.quantization != "none" or args.calibration_data):
        raise ValueError("--quantization and --calibration-data apply to --format tflite only.")
    if args.format != "onnx" and args.opset is not None:
        raise ValueError("--opset applies to --format onnx only.")
    if args.format == "tflite":
        options["batch_size"] = options["batch_size"] or 1
        path = export_tflite(
            args.model, args.out, quantization=args.quantization,
            calibration_data=args.calibration_data, **options,
        )  # fmt: skip
    elif args.format == "onnx":
        path = export_onnx(args.model, args.out, opset=args.opset or DEFAULT_OPSET, **options)
    else:
        path = export_saved_model(args.model, args.out, **options)
    if not args.quiet:
        print(f"wrote {path}")
        if args.format == "tflite":
            print(f"  {os.path.getsize(path) / 2**20:.1f} MiB, operators: {', '.join(tflite_operators(path))}")
    return 0
