"""`keras-dtop` command line: predict, evaluate, info and export.

    keras-dtop predict MODEL IMAGES_OR_FOLDERS... --out DIR [--overlay] [--exit-map]
    keras-dtop evaluate MODEL --data FOLDER [--layout stem|ade20k|voc] [--json OUT]
    keras-dtop info MODEL [--image-size H W]
    keras-dtop export MODEL.keras --format tflite --out OUT

MODEL is a `.keras` file, a preset directory (`model.save_to_preset(dir)`) or,
for predict and info, an exported `.tflite` or `.onnx` file. Errors print one line and exit with 2.
"""

import argparse
import sys

from keras_dtop.cli import evaluate_command, export_command, info_command, predict_command

COMMANDS = {
    "predict": predict_command,
    "evaluate": evaluate_command,
    "info": info_command,
    "export": export_command,
}
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, RuntimeError, ImportError)


def build_parser():
    parser = argparse.ArgumentParser(prog="keras-dtop", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_parser(commands, name)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args) or 0
    except USER_ERRORS as error:
        print(f"keras-dtop {args.command}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
