"""ExecuTorch int8 with XNNPACKQuantizer alone vs with edgetl's convolution -> ReLU6 annotation first
(issue 17): validation top-1 and batch-1 latency against the fp32 program, interleaved.

    python benchmarks/executorch_relu6.py RUN EXPORT_DIR --label lite0

RUN is a trained run, EXPORT_DIR a folder with its model.pte (`edgetl export RUN --format executorch`).
Writes results/executorch_relu6_<label>.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import save

from edgetl import checkpoint
from edgetl import executorch_export as ee
from edgetl.backends.executorch import ExecuTorchModel, read_metadata
from edgetl.bench.timing import interleaved_latency, latency_stats
from edgetl.progress import Reporter
from edgetl.quantize import QuantizeOptions, load_images
from edgetl.run import RunFolder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("export_dir")
    ap.add_argument("--label", required=True)
    args = ap.parse_args()
    folder = RunFolder.open(args.run)
    fp32_path = f"{args.export_dir}/model.pte"
    meta = read_metadata(fp32_path)
    calib, val, record = load_images(folder, meta, QuantizeOptions(), Reporter(quiet=True))
    model = checkpoint.build_model(folder.checkpoint())
    size = int(meta["input_size"])
    batches = [torch.from_numpy(calib.floats[i : i + 1]) for i in range(len(calib.floats))]
    results: dict[str, dict] = {}
    runners = {"fp32": ExecuTorchModel(fp32_path, threads=2)}
    for name, fuse in (("XNNPACKQuantizer alone", False), ("conv+ReLU6 annotation first", True)):
        t0 = time.perf_counter()
        blob, info = ee.lower_int8(model, size, batches, fuse_relu6=fuse)
        path = f"{args.export_dir}/.relu6-{len(results)}.pte"
        with open(path, "wb") as f:
            f.write(blob)
        runners[name] = ExecuTorchModel(path, threads=2)
        results[name] = {"delegated_nodes": info.get("delegated_nodes"), "seconds": time.perf_counter() - t0}
    for name, runner in runners.items():
        results.setdefault(name, {})["top1"] = float((runner.predict(val.floats).argmax(1) == val.labels).mean())
    samples = interleaved_latency(runners, np.ascontiguousarray(val.floats[:1]), min_time=0.0, warmup=10, rounds=8, runs_per_round=100)
    for name, ms in samples.items():
        results[name]["latency"] = latency_stats(ms)
    for runner in list(runners.values())[1:]:
        Path(runner.path).unlink()
    fp32 = results["fp32"]
    rows = "".join(
        f"| {n} | {r['top1']:.2%} | {(fp32['top1'] - r['top1']) * 100:+.2f} | {r['latency']['p50_ms']:.2f} | "
        f"{r['latency']['p50_ms'] / fp32['latency']['p50_ms']:.2f}x | {r.get('delegated_nodes', '-')} |\n"
        for n, r in results.items()
    )  # fmt: skip
    save(f"executorch_relu6_{args.label}", {"results": results, "calibration": {k: v for k, v in record.items() if k != "files"}},
         f"# ExecuTorch int8: the ReLU6 annotation ({args.label})\n\nValidation split ({len(val.labels)} images), batch 1, "
         "2 threads, interleaved rounds; calibration: the 300 stratified training images `edgetl quantize` uses.\n\n"
         "| program | top-1 | drop (points) | p50 ms | vs fp32 | delegated nodes |\n|---|---|---|---|---|---|\n" + rows)  # fmt: skip


if __name__ == "__main__":
    main()
