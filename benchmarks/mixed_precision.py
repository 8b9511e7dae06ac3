"""How many exit decisions change under bfloat16 / float16: the authors' fixture and a trained model.

    python benchmarks/mixed_precision.py [--model quickstart_out/dtop_quickstart.keras]
        [--policies mixed_bfloat16 mixed_float16]

The same weights run under float32 and under each mixed policy (weights stay
float32, compute in the low dtype; the grading rule decides on float32
scores). Printed per model and policy: tokens whose exit stage differs from
float32's, of all tokens; images whose alive counts differ; the largest score
difference. The fixture's 2 images are the authors' own inputs; the trained
model (`examples/quickstart.py` writes one) runs on 64 synthetic scenes.
"""

import argparse
import os
import sys
from pathlib import Path

import keras
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from speed import machine_info  # noqa: E402

FIXTURE = HERE.parent / "tests" / "fixtures" / "authors-dtop" / "reference_p0.7.npz"


def authors_case(policy):
    from keras_dtop.convert import segmenter_from_authors_state_dict

    keras.mixed_precision.set_global_policy(policy)
    with np.load(FIXTURE) as ref:
        weights = {k[2:]: ref[k] for k in ref.files if k.startswith("w/")}
        images = np.transpose(ref["input/normalized"], (0, 2, 3, 1))
    model = segmenter_from_authors_state_dict(
        weights, num_heads=3, head_num_heads=3, prune_threshold=0.7, keep_top_k=5
    )
    details = model(images, training=False, return_details=True)
    return keras.tree.map_structure(keras.ops.convert_to_numpy, details)


def trained_case(policy, path):
    from keras_dtop.data import synthetic_segmentation

    keras.mixed_precision.set_global_policy(policy)
    model = keras.saving.load_model(path)
    if policy != "float32":  # a .keras file keeps its policy: rebuild under this one
        config = keras.saving.serialize_keras_object(model)
        config["config"]["backbone"]["config"]["dtype"] = policy
        rebuilt = keras.saving.deserialize_keras_object(config)
        rebuilt.set_weights(model.get_weights())
        model = rebuilt
    size = tuple(model.backbone.image_size)
    images, _ = synthetic_segmentation(64, image_size=size, seed=7)
    return model.predict_details(images, batch_size=16)


def compare(reference, other):
    exits = reference["exit_stage"] != other["exit_stage"]
    counts = np.any(reference["alive_counts"] != other["alive_counts"], axis=1)
    score = np.abs(reference["scores"].astype("float32") - other["scores"].astype("float32")).max()
    return exits.sum(), exits.size, counts.sum(), len(counts), score


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="quickstart_out/dtop_quickstart.keras")
    parser.add_argument("--policies", nargs="+", default=["mixed_bfloat16", "mixed_float16"])
    args = parser.parse_args()
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['threads']} threads; backend {keras.backend.backend()}")
    cases = [("authors' fixture (p0 0.7)", authors_case)]
    if os.path.exists(args.model):
        cases.append((f"{args.model} (p0 as saved)", lambda policy: trained_case(policy, args.model)))
    else:
        print(f"({args.model} not found: run examples/quickstart.py for the trained-model rows)")
    print("| model | policy | exit stages changed | images with other alive counts | max score diff |")
    print("|---|---|---:|---:|---:|")
    for name, run in cases:
        reference = run("float32")
        for policy in args.policies:
            changed, tokens, images, count, score = compare(reference, run(policy))
            print(f"| {name} | {policy} | {changed} / {tokens} ({changed / tokens:.2%}) | {images} / {count} | {score:.2e} |")
        keras.mixed_precision.set_global_policy("float32")


if __name__ == "__main__":
    main()
