"""Wall-clock speed of pruned inference against the dense model (issue: fast inference).

Same weights, same images, every execution mode side by side in one process
per backend; warm-up excluded; min and median of repeated runs, modes
interleaved so that machine noise hits all of them alike. Prints one table:

    backend, batch, mode, ms/image (median, min), images/s, GFLOPs/image,
    measured speedup over dense, ideal speedup (dense GFLOPs / GFLOPs run),
    efficiency = measured / ideal (from medians; eff.min from the minima, less VM noise).

Untrained graders prune arbitrarily, so by default the exits follow a plan
(`keras_dtop.layers.planned_exits`): per-image alive fractions that differ
across the batch, with a mean saving of 21%, 40% and 60% of the
README-comparable GFLOPs (`--savings`; 21% is the paper's ViT-B/16 ADE20K
result). `--model file.keras` times a trained model with its own grading rule
instead. The machine (CPU, ISA flags, threads, versions) heads the table.

    python benchmarks/speed.py                       # ViT-B/16 512x512, all backends
    python benchmarks/speed.py --config vit_s        # class token + 4 registers
    python benchmarks/speed.py --config tiny         # a quick run
    python benchmarks/speed.py --model quickstart_out/dtop_quickstart.keras

GFLOPs/image counts the alive tokens (auxiliary heads included), not the
padding a layout or a JAX bucket adds: that overhead shows as efficiency < 1.

Rows: dense (pruning off: no auxiliary heads, as predict runs it), dense 1
program (pruning off, the masked layout; speedups are against the faster
dense row), masked (the training-time
reference: pruning decided, nothing skipped), gathered (the default
inference), capacity (fixed per-stage capacity = the batch's largest alive
count, one static program), per-image loop (gathered, one image at a time:
the authors' approach; a model of its own) and nothing-exits (gathered with every token kept:
the cost of grading without any saving).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

CONFIGS = {
    # ViT-B/16 at 512x512, ADE20K's 150 classes, the paper's heads.
    "vit_b": dict(
        backbone=dict(
            patch_size=16, hidden_dim=768, num_layers=12, num_heads=12, mlp_dim=3072,
            image_size=(512, 512), stage_ends=(5, 7, 11),
        ),
        segmenter=dict(num_classes=150, head_hidden_dim=384, head_num_heads=6),
    ),
    # ViT-S/14-like width with a class token and 4 registers (DINOv2 with registers).
    "vit_s": dict(
        backbone=dict(
            patch_size=16, hidden_dim=384, num_layers=12, num_heads=6, mlp_dim=1536,
            image_size=(512, 512), stage_ends=(5, 7, 11), class_token=True,
            num_register_tokens=4, layer_scale_init=1e-5,
        ),
        segmenter=dict(num_classes=150, head_hidden_dim=384, head_num_heads=6),
    ),
    "tiny": dict(
        backbone=dict(
            patch_size=16, hidden_dim=192, num_layers=6, num_heads=3, mlp_dim=768,
            image_size=(256, 256), stage_ends=(1, 3, 5),
        ),
        segmenter=dict(num_classes=21, head_hidden_dim=96, head_num_heads=3, head_num_layers=2),
    ),
}
# README-comparable GFLOPs saved: 21% is DToP's ViT-B/16 ADE20K result; easy
# images and Cityscapes-like scenes prune far more.
SAVINGS = (0.21, 0.40, 0.60)
PRUNED_MODES = ("masked", "gathered", "capacity", "per-image loop")
MODES = (
    "dense", "dense 1 program", "masked", "gathered", "capacity", "per-image loop", "nothing exits"
)


def exit_plan(model, batch, image_size, target=SAVINGS[0]):
    """Per-image alive fractions after each auxiliary head, spread across the
    batch, shifted so that the mean README-comparable saving is `target`."""
    from keras_dtop.flops import segmenter_flops

    tokens = (image_size[0] // model.backbone.patch_size) * (image_size[1] // model.backbone.patch_size)
    heads = len(model.stage_ends) - 1
    spread = np.linspace(-0.3, 0.3, batch) if batch > 1 else np.zeros(1)
    dense = segmenter_flops(model, [[tokens] * (heads + 1)], image_size)[0]

    def plan(shift):
        first = np.clip(0.6 + shift + spread, 0.02, 1.0)
        fractions = np.stack([first * 0.9**j for j in range(heads)], axis=1)
        return np.clip(np.round(fractions * tokens), 1, tokens) / tokens

    def saving(shift):
        counts = np.concatenate([np.ones((batch, 1)), plan(shift)], axis=1) * tokens
        return 1 - segmenter_flops(model, counts, image_size).mean() / dense

    low, high = -1.0, 1.0  # saving decreases as the shift grows
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if saving(mid) > target else (low, mid)
    return plan(high)


def build_models(args):
    import keras

    import keras_dtop
    from keras_dtop.layers.planned_exits import plan_exits

    if args.model:
        reference = keras.saving.load_model(args.model, compile=False)
        reference.preprocessor = None
    else:
        config = CONFIGS[args.config]
        keras.utils.set_random_seed(0)
        backbone = keras_dtop.DToPBackbone(**config["backbone"])
        reference = keras_dtop.DToPSegmenter(backbone, prune_threshold=0.9, **config["segmenter"])
    weights = reference.get_weights()

    def clone(**settings):
        model = reference.__class__.from_config(reference.get_config())
        model.set_weights(weights)
        for name, value in settings.items():
            setattr(model, name, value)
        return model

    models = {
        "dense": clone(pruning_enabled=False),
        "dense 1 program": clone(pruning_enabled=False, pruning_mode="masked"),
        "masked": clone(pruning_mode="masked"),
        "gathered": clone(pruning_mode="gathered"),
        "capacity": clone(pruning_mode="capacity"),
        "per-image loop": clone(pruning_mode="gathered"),
        "nothing exits": clone(pruning_mode="gathered"),
    }
    if not args.model:
        heads = len(reference.stage_ends) - 1
        for name in ("masked", "gathered", "capacity", "per-image loop"):
            plan_exits(models[name], np.ones((args.max_batch, heads)))
        plan_exits(models["nothing exits"], np.ones((args.max_batch, heads)))
    return models


def run_backend(args):
    import keras

    from keras_dtop.flops import segmenter_flops

    models = build_models(args)
    reference = models["masked"]
    size = tuple(reference.backbone.image_size)
    tokens = (size[0] // reference.backbone.patch_size) * (size[1] // reference.backbone.patch_size)
    rng = np.random.default_rng(0)
    rows = []
    savings = [None] if args.model else args.savings
    for batch in args.batch_sizes:
        images = rng.normal(size=(batch, *size, 3)).astype("float32")
        dense_counts = np.full((batch, len(reference.stage_ends)), tokens)
        dense_flops = segmenter_flops(models["dense"], dense_counts, size).mean()
        graded_flops = segmenter_flops(models["dense"], dense_counts, size, True).mean()
        # Rows that do not depend on the exits are timed once per batch size.
        shared = [m for m in args.modes if m not in PRUNED_MODES]
        if args.model:
            shared = [m for m in shared if m != "nothing exits"]
        times = time_modes(models, shared, images, None, args)
        baseline = min((m for m in shared if m.startswith("dense")), key=lambda m: times[m][0])
        dense_time = times[baseline][:2]  # (median, min) of the faster dense row
        flops = {"dense": dense_flops, "dense 1 program": dense_flops, "nothing exits": graded_flops}
        for name in shared:
            rows.append(row(keras, batch, "-", name, times[name], dense_time, dense_flops, flops[name]))
        for target in savings:
            plan = None if target is None else exit_plan(reference, batch, size, target)
            if plan is not None:
                for name in PRUNED_MODES:
                    models[name].pruner.set_plan(plan)
            details = to_numpy(models["masked"](images, training=False, return_details=True))
            counts = details["alive_counts"]
            models["capacity"].stage_capacity = tuple(int(c) for c in counts[:, 1:].max(axis=0))
            pruned = segmenter_flops(reference, counts, size, True).mean()
            readme = 1 - segmenter_flops(reference, counts, size).mean() / dense_flops
            modes = [m for m in args.modes if m in PRUNED_MODES and not (m == "per-image loop" and batch == 1)]
            times = time_modes(models, modes, images, plan, args)
            label = f"{100 * readme:.0f}%"
            for name in modes:
                run_flops = graded_flops if name == "masked" else pruned  # masks skip nothing
                rows.append(row(keras, batch, label, name, times[name], dense_time, dense_flops, run_flops))
            diffs = {
                name: float(np.abs(times[name][2] - times["masked"][2]).max())
                for name in ("gathered", "capacity")
                if name in times and "masked" in times
            }
            rows.append(
                dict(
                    backend=keras.backend.backend(), batch=batch, mode="_info", saving=label,
                    alive=counts.tolist(), readme_saving=float(readme),
                    max_abs_diff_vs_masked=diffs, baseline=baseline,
                )
            )
    return rows


def time_modes(models, modes, images, plan, args):
    """{mode: (median s, min s, outputs)}: warm-up, then runs interleaved across modes."""
    batch = len(images)

    def run(name):
        model = models[name]
        if name != "per-image loop":
            return model.predict_on_batch(images)
        out = []
        for i in range(batch):
            if plan is not None:
                model.pruner.set_plan(plan[i : i + 1])
            out.append(model.predict_on_batch(images[i : i + 1]))
        if plan is not None:
            model.pruner.set_plan(plan)
        return np.concatenate(out)

    outputs = {}
    for name in modes:  # warm-up: compile every program
        for _ in range(args.warmup):
            outputs[name] = np.asarray(run(name))
    times = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name in modes:
            start = time.perf_counter()
            np.asarray(run(name))  # results on the host: synchronised
            times[name].append(time.perf_counter() - start)
    return {name: (np.median(times[name]), np.min(times[name]), outputs[name]) for name in modes}


def row(keras, batch, saving, name, timing, dense_time, dense_flops, run_flops):
    """One table row; efficiencies from medians and from minima (less VM noise)."""
    median, best, _ = timing
    speedup, ideal = dense_time[0] / median, dense_flops / run_flops
    return dict(
        backend=keras.backend.backend(), batch=batch, saving=saving, mode=name,
        ms_median=1e3 * median / batch, ms_min=1e3 * best / batch, images_per_s=batch / median,
        gflops=run_flops / 1e9, speedup=speedup, ideal=ideal, efficiency=speedup / ideal,
        efficiency_min=dense_time[1] / best / ideal,
    )


def machine_info():
    """CPU model, ISA flags that matter for matmuls, threads, library versions."""
    import platform

    info = {"cpu": platform.processor() or platform.machine(), "threads": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
        flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split())
        info["cpu"] = model[0] if model else info["cpu"]
        wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
        info["isa"] = [flag for flag in wanted if flag in flags]
    except (OSError, StopIteration):
        info["isa"] = []
    versions = {}
    for module in ("keras", "tensorflow", "jax", "torch"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            pass
    info["versions"] = versions
    return info


def to_numpy(tree):
    import keras

    return keras.tree.map_structure(keras.ops.convert_to_numpy, tree)


def print_table(rows, machine):
    print(
        f"machine: {machine['cpu']}, {machine['threads']} threads, ISA {' '.join(machine['isa']) or '-'}; "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    )
    header = (
        f"{'backend':<11}{'batch':>6}{'saving':>7}  {'mode':<16}{'ms/img med':>11}{'ms/img min':>11}"
        f"{'img/s':>8}{'GFLOPs/img':>11}{'speedup':>9}{'ideal':>7}{'effic.':>8}{'eff.min':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        if row["mode"] == "_info":
            diffs = ", ".join(f"{k} {v:.1e}" for k, v in row["max_abs_diff_vs_masked"].items())
            print(
                f"{'':<17}{row['saving']}: speedups vs '{row['baseline']}'; alive tokens per head: "
                f"{row['alive']}; max |scores - masked|: {diffs}"
            )
            continue
        print(
            f"{row['backend']:<11}{row['batch']:>6}{row['saving']:>7}  {row['mode']:<16}"
            f"{row['ms_median']:>11.1f}{row['ms_min']:>11.1f}{row['images_per_s']:>8.2f}"
            f"{row['gflops']:>11.2f}{row['speedup']:>9.2f}{row['ideal']:>7.2f}{row['efficiency']:>8.2f}"
            f"{row['efficiency_min']:>8.2f}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="vit_b")
    parser.add_argument("--model", help="a trained .keras DToPSegmenter (its own exit rule)")
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--savings", type=float, nargs="+", default=list(SAVINGS),
        help="README-comparable GFLOPs savings of the planned exits, one row set each",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.max_batch = max(args.batch_sizes)
    if "dense" not in args.modes:
        args.modes.insert(0, "dense")  # the baseline of every ratio

    if args.child:
        print("ROWS " + json.dumps(run_backend(args)))
        return
    rows = []
    for backend in args.backends.split(","):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        command = [sys.executable, __file__, "--child", *sys.argv[1:]]
        print(f"running {backend} ...", file=sys.stderr, flush=True)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("ROWS ")]
        if done.returncode or not lines:
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{backend} failed (exit code {done.returncode})")
        rows += json.loads(lines[-1][5:])
    machine = machine_info()
    print_table(rows, machine)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "argv": sys.argv[1:], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
