"""Why interleaved in-process timing opens each turn with untimed runs (edgetl.bench.timing.interleaved_latency,
used by `edgetl export --quantize`'s latency columns).

Short turns measure the switch between models: the first runs after the other model ran find the caches holding
its weights. `edgetl demo` (100 runs in 6 rounds, 16 a turn) once reported ONNX Runtime int8 at 1.21x its fp32
model while `edgetl bench` (one process per model, >= 2 s turns) measured 0.67x on the same files.

    python benchmarks/turn_warmup.py RUN [--reps 5] [--warmups 0 3 5 10]

For each runtime with both files in RUN: the int8/fp32 ratio of medians from 16-run turns (6 rounds) with each
per-turn warm-up count, repeated --reps times in alternation, beside 100-run turns without warm-up (the long-turn
reference). Writes benchmarks/results/turn_warmup[_<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
from common import result_name, save, spread

ROUNDS, SHORT, LONG = 6, 16, 100


def main() -> None:
    from edgetl.backends.onnxruntime import OrtModel
    from edgetl.backends.openvino import OpenVinoModel
    from edgetl.bench.timing import interleaved_latency

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmups", type=int, nargs="+", default=[0, 3, 5, 10])
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    pairs = {"onnxruntime": (OrtModel, args.run / "model.onnx", args.run / "model.int8.onnx"),
             "openvino": (OpenVinoModel, args.run / "openvino" / "model.xml", args.run / "openvino-int8" / "model.xml")}  # fmt: skip
    size = OrtModel(args.run / "model.onnx").input_shape[-1]  # the run's input size, from its ONNX file
    results: dict[str, dict[str, dict[str, float]]] = {}
    for runtime, (cls, fp32, int8) in pairs.items():
        if not (fp32.is_file() and int8.is_file()):
            continue
        models = {"fp32": cls(fp32), "int8": cls(int8)}
        x = np.zeros((1, 3, size, size), np.float32)
        settings = {f"{SHORT}-run turns, {w} warm-up": (SHORT, w) for w in args.warmups}
        settings[f"{LONG}-run turns, 0 warm-up (reference)"] = (LONG, 0)
        ratios: dict[str, list[float]] = {name: [] for name in settings}
        for _ in range(args.reps):
            for name, (runs, warm) in settings.items():
                s = interleaved_latency(models, x, 0.0, warmup=10, rounds=ROUNDS, runs_per_round=runs, turn_warmup=warm)
                ratios[name].append(statistics.median(s["int8"]) / statistics.median(s["fp32"]))
        results[runtime] = {name: spread(v) for name, v in ratios.items()}
        print(runtime, {name: round(v["median"], 2) for name, v in results[runtime].items()}, flush=True)

    lines = ["# Per-turn warm-up in interleaved in-process timing", "",
             f"int8/fp32 ratio of medians, batch 1, {ROUNDS} rounds; median (min-max) of {args.reps} repetitions run in "
             f"alternation. Run: `{args.run}`.", "", "| runtime | turns | int8/fp32 |", "|---|---|---|"]  # fmt: skip
    for runtime, rows in results.items():
        for name, v in rows.items():
            lines.append(f"| {runtime} | {name} | {v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f}) |")
    save(result_name("turn_warmup", args.tag), {"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
         "\n".join(lines))  # fmt: skip


if __name__ == "__main__":
    main()
