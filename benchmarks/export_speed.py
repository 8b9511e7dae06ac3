"""Latency of exported models, pruned against dense, in LiteRT and ONNX Runtime (issues: export).

For each model, exports the same weights with pruning off ("dense") and on,
as a builtin-ops float32 TFLite flatbuffer (fixed batch) and an ONNX file
(dynamic batch), then times them side by side in one process: the LiteRT
interpreter (XNNPACK) and ONNX Runtime (CPU provider), each with `--threads`
threads, each pruned row interleaved with its runtime's dense row (two
sessions open at a time), warm-up excluded. Prints size, conversion time,
ms/image (median and min), alive tokens per stage, GFLOPs/image (what runs:
auxiliary heads included when the model prunes), speedup over the same
runtime's dense row, ideal speedup (dense GFLOPs / GFLOPs run) and
efficiency = speedup / ideal, and the ideal at the batch maximum: the
exported "gathered" graph runs every image of a batch at the batch's largest
alive count, so at batch > 1 it cannot beat that. `--capacity` adds each pruned row's
"capacity" twin: the same exits with static shapes (`pruning_mode="capacity"`,
capacities = the row's largest alive counts).

    python benchmarks/export_speed.py                         # ViT-B/16 512x512, batch 1 and 8
    python benchmarks/export_speed.py --config tiny --batch-sizes 1
    python benchmarks/export_speed.py --model quickstart_out/dtop_quickstart.keras

Random weights prune arbitrarily, so for `--config` models the exits follow a
plan baked into the export (`keras_dtop.layers.planned_exits`): "nothing
exits" (all tokens kept: the graders' cost) and planned exits with a mean
README-comparable GFLOPs saving of 21% (the paper's ViT-B/16 on ADE20K) and
40% (`--savings`), spread across the images of a batch. `--model` exports a
trained model with its own rule and times it on the built-in synthetic
images it was trained on. Every export runs in a fresh TensorFlow process
(the timing process holds only the runtimes' sessions).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import CONFIGS, exit_plan, machine_info  # noqa: E402

RUNTIMES = ("LiteRT", "ONNX Runtime")


def planned_rows(config_name, batch, savings):
    """(model, images, rows) for a random-weight config; rows are (name, settings, plan or None)."""
    import keras

    import keras_dtop

    config = CONFIGS[config_name]
    keras.utils.set_random_seed(0)
    model = keras_dtop.DToPSegmenter(
        keras_dtop.DToPBackbone(**config["backbone"]), prune_threshold=0.9, **config["segmenter"]
    )
    image_size = config["backbone"]["image_size"]
    heads = len(model.stage_ends) - 1
    images = np.random.default_rng(0).normal(size=(batch, *image_size, 3)).astype("float32")
    rows = [("dense", dict(pruning_enabled=False), None), ("nothing exits", {}, np.ones((batch, heads)))]
    rows += [(f"{saving:.0%} saving", {}, exit_plan(model, batch, image_size, saving)) for saving in savings]
    return model, images, rows


def trained_rows(path, count):
    import keras

    from keras_dtop.data import synthetic_segmentation

    model = keras.saving.load_model(path, compile=False)
    images, _ = synthetic_segmentation(count, model.backbone.image_size, model.num_classes, seed=123)
    model.pruning_enabled = True
    rows = [("dense", dict(pruning_enabled=False), None), ("pruned (own rule)", {}, None)]
    return model, images.astype("float32"), rows


def export_in_worker(runtime, keras_path, plan, out_path, batch):
    """Export one row in a fresh TensorFlow process (`--export-worker`): the planned exits are
    installed there (a `PlannedExitPruner` is a measuring tool, not saved in `.keras` files), and
    each export's memory (GBs for ViT-B: traces, frozen graphs) goes with the process."""
    plan_path = "-"
    if plan is not None:
        plan_path = out_path + ".plan.npy"
        np.save(plan_path, np.asarray(plan, "float32"))
    command = [sys.executable, os.path.abspath(__file__), "--export-worker", runtime, keras_path, plan_path, out_path, str(batch)]
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"export of {out_path} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def export_worker(runtime, keras_path, plan_path, out_path, batch):
    import keras

    from keras_dtop.export import export_onnx, export_tflite
    from keras_dtop.layers.planned_exits import plan_exits

    model = keras.saving.load_model(keras_path, compile=False)
    if plan_path != "-":
        plan_exits(model, np.load(plan_path))
    if runtime == "LiteRT":
        export_tflite(model, out_path, batch_size=int(batch))
    else:
        export_onnx(model, out_path)  # dynamic batch


def open_runner(runtime, path, threads):
    from keras_dtop.export import LiteRTSegmenter, ONNXRuntimeSegmenter

    return (LiteRTSegmenter if runtime == "LiteRT" else ONNXRuntimeSegmenter)(path, num_threads=threads)


def benchmark(model, images, rows, repeats, warmup, threads, runtimes, batch, capacity):
    """Export every row for every runtime, then time each pruned row against dense, interleaved.

    Only two sessions are open at a time (a row and its runtime's dense
    model): eight ViT-B sessions at batch 8 did not fit in 24 GiB. Each row's
    speedup is against the dense timings taken beside it.
    """
    from keras_dtop.flops import segmenter_flops

    weights = model.get_weights()
    image_size = images.shape[1:3]
    folder = tempfile.mkdtemp(prefix="dtop_export_speed_")
    results = []
    queue = list(rows)
    while queue:
        name, settings, plan = queue.pop(0)
        clone = model.__class__.from_config(model.get_config())
        clone.set_weights(weights)
        for setting, value in settings.items():
            setattr(clone, setting, value)
        keras_path = os.path.join(folder, f"row{len(results)}.keras")
        clone.save(keras_path)
        for runtime in runtimes:
            suffix = "tflite" if runtime == "LiteRT" else "onnx"
            path = os.path.join(folder, f"{len(results)}.{suffix}")
            convert_s = export_in_worker(runtime, keras_path, plan, path, batch)
            counts = open_runner(runtime, path, threads)(images)["alive_tokens"]
            flops = segmenter_flops(clone, counts, image_size, clone.prunes).mean() / 1e9
            # What a batch runs in the exported "gathered" graph: every image at the batch's largest count.
            padded = np.repeat(counts.max(axis=0, keepdims=True), len(counts), axis=0)
            padded_flops = segmenter_flops(clone, padded, image_size, clone.prunes).mean() / 1e9
            results.append(dict(
                runtime=runtime, batch=batch, row=name, path=path, size_mb=os.path.getsize(path) / 2**20,
                convert_s=convert_s, alive_tokens=counts.mean(axis=0).round(1).tolist(),
                gflops=float(flops), padded_gflops=float(padded_flops), times=[], dense_times=[],
            ))  # fmt: skip
            print(f"  {runtime}, batch {batch}, {name}: {results[-1]['size_mb']:.1f} MiB, alive "
                  f"{results[-1]['alive_tokens']}, exported in {convert_s:.0f} s", flush=True)  # fmt: skip
        os.remove(keras_path)
        pruned = clone.prunes and settings.get("pruning_mode") != "capacity"
        if capacity and pruned and counts[:, 1:].min() < counts[:, 0].max():
            # The same exits with static shapes: capacities = the largest alive counts.
            capacities = tuple(int(c) for c in counts[:, 1:].max(axis=0))
            static = dict(pruning_mode="capacity", stage_capacity=capacities)
            queue.insert(0, (f"{name}, capacity {list(capacities)}", static, plan))
    for runtime in runtimes:
        dense = next(r for r in results if r["runtime"] == runtime and r["row"] == "dense")
        for result in [r for r in results if r["runtime"] == runtime and r is not dense]:
            pair = [(open_runner(runtime, dense["path"], threads), result["dense_times"]),
                    (open_runner(runtime, result["path"], threads), result["times"])]  # fmt: skip
            for repeat in range(warmup + repeats):
                for runner, times in pair:
                    for start in range(0, len(images), batch):
                        chunk = images[start : start + batch]
                        began = time.perf_counter()
                        runner(chunk)
                        if repeat >= warmup:
                            times.append((time.perf_counter() - began) * 1e3 / len(chunk))
            del pair
            dense["times"] += result["dense_times"]
            print(f"  timed {runtime}, {result['row']}: {np.median(result['times']):.0f} ms/img against "
                  f"dense {np.median(result['dense_times']):.0f}", flush=True)  # fmt: skip
    for result in results:
        if result["row"] == "dense":
            result["dense_times"] = result["times"]
        result["ms_median"] = float(np.median(result["times"]))
        result["ms_min"] = float(np.min(result["times"]))
        result["speedup"] = float(np.median(result["dense_times"])) / result["ms_median"]
        result["ideal"] = next(
            r["gflops"] for r in results if r["runtime"] == result["runtime"] and r["row"] == "dense"
        ) / result["gflops"]
        result["efficiency"] = result["speedup"] / result["ideal"]
        result["ideal_batch_max"] = result["ideal"] * result["gflops"] / result["padded_gflops"]
        result["efficiency_min"] = float(np.min(result["dense_times"])) / result["ms_min"] / result["ideal"]
    for result in results:
        del result["times"], result["dense_times"], result["path"]
    shutil.rmtree(folder, ignore_errors=True)
    return results


def print_table(title, results):
    print(f"\n{title}")
    print("| runtime | batch | row | size MiB | convert s | alive tokens/stage | GFLOPs/img | ms/img median (min) | speedup | ideal | efficiency (from minima) | ideal at batch max |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: (r["runtime"], r["batch"])):
        print(
            f"| {r['runtime']} | {r['batch']} | {r['row']} | {r['size_mb']:.1f} | {r['convert_s']:.0f} | "
            f"{r['alive_tokens']} | {r['gflops']:.2f} | {r['ms_median']:.1f} ({r['ms_min']:.1f}) | "
            f"{r['speedup']:.2f} | {r['ideal']:.2f} | {r['efficiency']:.2f} ({r['efficiency_min']:.2f}) | "
            f"{r['ideal_batch_max']:.2f} |"
        )


def print_machine(threads):
    machine = machine_info()
    versions = dict(machine["versions"])
    for module, name in (("ai_edge_litert", "ai-edge-litert"), ("onnxruntime", "onnxruntime"), ("tf2onnx", "tf2onnx")):
        try:
            versions[name] = __import__(module).__version__
        except (ImportError, AttributeError):
            versions[name] = "?"
    print(f"machine: {machine['cpu']} | ISA {' '.join(machine['isa'])} | {machine['threads']} CPUs, "
          f"{threads} runtime threads | " + ", ".join(f"{k} {v}" for k, v in versions.items()))  # fmt: skip
    return machine, versions


def main():
    if sys.argv[1:2] == ["--export-worker"]:
        return export_worker(*sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=["vit_b"], choices=sorted(CONFIGS))
    parser.add_argument("--model", help="a trained .keras DToPSegmenter (replaces --config)")
    parser.add_argument("--images", type=int, default=8, help="--model: synthetic images timed")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--savings", type=float, nargs="+", default=[0.21, 0.40])
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--capacity", action="store_true", help="add the static-shape twin of each pruned row")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    machine, versions = print_machine(args.threads)
    runs = {"machine": machine, "versions": versions}
    sources = [("model", args.model)] if args.model else [("config", c) for c in args.config]
    for kind, source in sources:
        for batch in args.batch_sizes:
            print(f"== {source}, batch {batch}", flush=True)
            if kind == "model":
                model, images, rows = trained_rows(source, args.images)
            else:
                model, images, rows = planned_rows(source, batch, args.savings)
            start = time.perf_counter()
            results = benchmark(
                model, images, rows, args.repeats, args.warmup, args.threads, args.runtimes, batch, args.capacity
            )
            runs[f"{source}, batch {batch}"] = results
            print_table(f"{source}: {images.shape[1]}x{images.shape[2]}, batch {batch}, {args.threads} "
                        f"threads, {time.perf_counter() - start:.0f} s", results)  # fmt: skip
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
