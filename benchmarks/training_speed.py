"""Training throughput: dense vs pruning phase, 1 vs N devices, float32 vs bfloat16.

    python benchmarks/training_speed.py [--backends jax tensorflow torch] [--devices 1 2]
        [--policies float32 mixed_bfloat16] [--steps 6] [--json out.json] [-- example args]

Each cell runs `examples/train_distributed.py` in a fresh process (the device
count is fixed when a backend starts; on CPU the cores are split into virtual
devices or gloo processes) with the same per-device batch, and reads the
images/s it prints for each phase. The machine heads the table. Ratios to
read side by side: pruning/dense (the masked training path costs what the
dense one does: DToP saves at inference, not in training), N/1 devices (on
CPU, virtual devices share the same cores, so more devices cannot be faster
there: this checks the set-up and its overhead; the gain needs real devices).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from speed import machine_info  # noqa: E402


def run_cell(backend, devices, policy, args, extra):
    command = [sys.executable, str(HERE.parent / "examples" / "train_distributed.py"), "--devices", str(devices),
               "--policy", policy, "--steps", str(args.steps), *extra]  # fmt: skip
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["jax", "tensorflow", "torch"])
    parser.add_argument("--devices", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--policies", nargs="+", default=["float32", "mixed_bfloat16"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", default=None)
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    machine = machine_info()
    cells = []
    for backend in args.backends:
        for policy in args.policies:
            for devices in args.devices:
                cell = run_cell(backend, devices, policy, args, extra)
                cell.update(backend=backend, devices=devices, policy=policy)
                cells.append(cell)
                print(f"  ran {backend} {policy} x{devices}", file=sys.stderr, flush=True)
    print(f"machine: {machine['cpu']}, {machine['threads']} threads, ISA {' '.join(machine['isa']) or '-'}; "
          + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()))  # fmt: skip
    print("| backend | policy | devices | batch/device | mechanism | dense img/s | pruning img/s | pruning/dense | dense vs 1 device |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|")
    single = {}
    for cell in cells:
        key = (cell["backend"], cell["policy"])
        if "error" in cell:
            print(f"| {cell['backend']} | {cell['policy']} | {cell['devices']} | | failed: {cell['error'][:60]} | | | | |")
            continue
        dense, pruning = (cell["phases"][p]["images_per_second"] for p in ("dense", "pruning"))
        single.setdefault(key, dense)
        print(f"| {cell['backend']} | {cell['policy']} | {cell['devices']} | {cell['batch_per_device']} | "
              f"{cell['mechanism']} | {dense:.1f} | {pruning:.1f} | {pruning / dense:.2f} | {dense / single[key]:.2f} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "argv": sys.argv[1:], "cells": cells}, f, indent=1)


if __name__ == "__main__":
    main()
