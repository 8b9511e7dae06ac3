"""LiteRT latency and size of exported TFLite models, pruned against dense (issue: export).

For each model, exports TFLite flatbuffers (builtin ops, float32, batch 1)
of the same weights with pruning off ("dense") and on, then times them side
by side in one process with the LiteRT interpreter (XNNPACK, runs
interleaved, warm-up excluded). Prints size, conversion time, ms/image
(median and min), alive tokens per stage, GFLOPs/image (what runs: auxiliary
heads included when the model prunes), speedup over dense,
ideal speedup (dense GFLOPs / GFLOPs run) and efficiency = speedup / ideal.
Every pruned row is followed by its "capacity" twin: the same exits with
static shapes (`pruning_mode="capacity"`, capacities = the row's largest
alive counts), which XNNPACK can take whole.

    python benchmarks/export_speed.py                         # ViT-B/16 512x512 + tiny, planned exits
    python benchmarks/export_speed.py --config tiny
    python benchmarks/export_speed.py --model quickstart_out/dtop_quickstart.keras

Random weights prune arbitrarily, so for `--config` models the exits follow a
plan baked into the export (`keras_dtop.layers.planned_exits`): "nothing
exits" (all tokens kept: the graders' cost), "paper" (the 21% GFLOPs saving of
ViT-B/16 on ADE20K) and "easy image" (70% of tokens exit after the first
head, 85% by the second). `--model` exports a trained model with its own
rule and times it on the built-in synthetic images it was trained on.
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import CONFIGS, exit_plan  # noqa: E402

EASY_PLAN = (0.30, 0.15)  # alive fractions after each auxiliary head


def planned_rows(config_name):
    """(name, model, images) rows for a random-weight config with planned exits."""
    import keras

    import keras_dtop
    from keras_dtop.layers.planned_exits import plan_exits

    config = CONFIGS[config_name]
    keras.utils.set_random_seed(0)
    model = keras_dtop.DToPSegmenter(
        keras_dtop.DToPBackbone(**config["backbone"]), prune_threshold=0.9, **config["segmenter"]
    )
    image_size = config["backbone"]["image_size"]
    heads = len(model.stage_ends) - 1
    images = np.random.default_rng(0).normal(size=(1, *image_size, 3)).astype("float32")
    plans = {
        "nothing exits": np.ones((1, heads)),
        "paper (21% saving)": exit_plan(model, 1, image_size),
        "easy image": np.array([EASY_PLAN[:heads] + (EASY_PLAN[-1],) * (heads - len(EASY_PLAN))]),
    }
    rows = [("dense", dict(pruning_enabled=False), None)]
    rows += [(name, {}, plan) for name, plan in plans.items()]
    return model, images, rows, lambda m, plan: plan_exits(m, plan)


def trained_rows(path, count):
    import keras

    from keras_dtop.data import synthetic_segmentation

    model = keras.saving.load_model(path, compile=False)
    images, _ = synthetic_segmentation(count, model.backbone.image_size, model.num_classes, seed=123)
    model.pruning_enabled = True
    rows = [("dense", dict(pruning_enabled=False), None), ("pruned (own rule)", {}, None)]
    return model, images.astype("float32"), rows, None


def benchmark(model, images, rows, apply_plan, repeats, warmup, threads):
    from keras_dtop.export import LiteRTSegmenter, export_tflite
    from keras_dtop.flops import segmenter_flops

    weights = model.get_weights()
    image_size = images.shape[1:3]
    tmp = tempfile.mkdtemp(prefix="dtop_export_speed_")
    runners, results = {}, []
    queue = list(rows)
    while queue:
        name, settings, plan = queue.pop(0)
        clone = model.__class__.from_config(model.get_config())
        clone.set_weights(weights)
        for setting, value in settings.items():
            setattr(clone, setting, value)
        if plan is not None:
            apply_plan(clone, plan)
        path = os.path.join(tmp, f"{len(runners)}.tflite")
        start = time.perf_counter()
        export_tflite(clone, path, image_size=image_size)
        convert_s = time.perf_counter() - start
        runners[name] = LiteRTSegmenter(path, num_threads=threads)
        outputs = runners[name](images)
        counts = outputs["alive_tokens"]
        flops = segmenter_flops(clone, counts, image_size, clone.prunes).mean() / 1e9
        results.append(dict(
            row=name, size_mb=os.path.getsize(path) / 2**20, convert_s=convert_s,
            alive_tokens=counts.mean(axis=0).round(1).tolist(), gflops=float(flops), times=[],
        ))  # fmt: skip
        print(f"  exported {name}: {results[-1]['size_mb']:.1f} MiB in {convert_s:.0f} s", flush=True)
        if clone.prunes and settings.get("pruning_mode") != "capacity" and counts[:, 1:].min() < counts[:, 0].max():
            # The same exits with static shapes: capacities = the largest alive counts.
            capacity = tuple(int(c) for c in counts[:, 1:].max(axis=0))
            static = dict(pruning_mode="capacity", stage_capacity=capacity)
            queue.insert(0, (f"{name}, capacity {list(capacity)}", static, plan))
    for repeat in range(warmup + repeats):
        for result in results:
            runner = runners[result["row"]]
            for image in images:
                start = time.perf_counter()
                runner(image[None])
                if repeat >= warmup:
                    result["times"].append((time.perf_counter() - start) * 1e3)
    dense = results[0]
    for result in results:
        result["ms_median"] = float(np.median(result["times"]))
        result["ms_min"] = float(np.min(result["times"]))
        result["speedup"] = dense["ms_median"] / result["ms_median"]
        result["ideal"] = dense["gflops"] / result["gflops"]
        result["efficiency"] = result["speedup"] / result["ideal"]
        del result["times"]
    return results


def print_table(title, results):
    print(f"\n{title}")
    print("| row | size MiB | convert s | alive tokens/stage | GFLOPs | ms/img median (min) | speedup | ideal | efficiency |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['row']} | {r['size_mb']:.1f} | {r['convert_s']:.0f} | {r['alive_tokens']} | "
            f"{r['gflops']:.2f} | {r['ms_median']:.1f} ({r['ms_min']:.1f}) | {r['speedup']:.2f} | "
            f"{r['ideal']:.2f} | {r['efficiency']:.2f} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=["vit_b", "tiny"], choices=sorted(CONFIGS))
    parser.add_argument("--model", help="a trained .keras DToPSegmenter (replaces --config)")
    parser.add_argument("--images", type=int, default=8, help="--model: synthetic images timed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    runs = {}
    sources = [("model", args.model)] if args.model else [("config", c) for c in args.config]
    for kind, source in sources:
        print(f"== {source}", flush=True)
        if kind == "model":
            model, images, rows, apply_plan = trained_rows(source, args.images)
        else:
            model, images, rows, apply_plan = planned_rows(source)
        start = time.perf_counter()
        runs[source] = benchmark(model, images, rows, apply_plan, args.repeats, args.warmup, args.threads)
        print_table(f"{source}: {images.shape[1]}x{images.shape[2]}, batch 1, {args.threads} "
                    f"threads, {time.perf_counter() - start:.0f} s", runs[source])  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
