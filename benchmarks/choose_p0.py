"""p0 for a budget on a trained model: `choose_prune_threshold` on validation scenes, checked on test scenes.

    python benchmarks/accuracy.py --save-models models/      # the fine-tuned DToP model
    python benchmarks/choose_p0.py models/dtop.keras --target-saving 0.25

Validation scenes (test photographs, another seed than accuracy.py's test
scenes) choose p0, one value and one per pruning head; the choice is then
evaluated on accuracy.py's test scenes, which it has not seen.
"""

import argparse
import os
import sys
import time

import keras

from keras_dtop.evaluation import SlidingWindow, choose_prune_threshold, evaluate_segmentation

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy import scenes  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a fine-tuned .keras file from accuracy.py --save-models")
    parser.add_argument("--target-saving", type=float, default=0.25)
    parser.add_argument("--validation-scenes", type=int, default=100)
    parser.add_argument("--test-scenes", type=int, default=200)
    parser.add_argument("--size", type=int, default=168)
    parser.add_argument("--crop", type=int, default=112)
    parser.add_argument("--stride", type=int, default=56)
    args = parser.parse_args()
    model = keras.saving.load_model(args.model)
    window = SlidingWindow((args.crop, args.crop), (args.stride, args.stride))
    validation = scenes("test", args.validation_scenes, args.size, seed=7)
    test = scenes("test", args.test_scenes, args.size, seed=1)
    print(f"{args.model}: k {model.keep_top_k}, target saving {100 * args.target_saving:.0f}% of GFLOPs")
    for per_stage in (False, True):
        start = time.perf_counter()
        choice = choose_prune_threshold(model, validation, target_saving=args.target_saving,
                                        per_stage=per_stage, sliding_window=window, batch_size=32)  # fmt: skip
        seconds = time.perf_counter() - start
        model.prune_threshold = choice.prune_threshold
        report = evaluate_segmentation(model, test, window, batch_size=32)
        print(f"per_stage={per_stage}: p0 {choice.prune_threshold}, {choice.passes} passes, {seconds:.0f} s; "
              f"validation mIoU {100 * choice.miou:.2f} (estimated {100 * choice.estimated[0]:.2f}), saving "
              f"{100 * choice.flops_saving:.1f}% (estimated {100 * choice.estimated[1]:.1f}%); "
              f"test mIoU {100 * report.miou:.2f}, saving {100 * report.flops_saving:.1f}%")  # fmt: skip


if __name__ == "__main__":
    main()
