"""int8 for a deployment target (issue 13): `--int8-target portable` (7-bit weights, correct on every
x86 and ARM CPU) against `vnni` (full 8-bit weights, exact only with VNNI), accuracy and speed.

    python benchmarks/int8_targets.py [RUN]

RUN is a run trained on clothing-small (default: trains Lite0 with one fine-tune epoch into
/tmp/edgetl-bench-runs/int8-targets). Accuracy on the clothing-small *test* split; batch-1 latency
with 2 threads, each runtime's three models (fp32, portable, vnni) timed in their own interleaved
rounds so one runtime's idle threads never slow another's. Writes results/int8_targets.{json,md}.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from common import save

from edgetl.backends.onnxruntime import OrtModel
from edgetl.backends.openvino import OpenVinoModel
from edgetl.bench.timing import interleaved_latency, latency_stats
from edgetl.config import TrainConfig
from edgetl.data import relabel, scoring_set
from edgetl.export import ExportOptions, export_run
from edgetl.metadata import labels_from, read_onnx_metadata, spec_from
from edgetl.parity import prepare
from edgetl.progress import Reporter
from edgetl.quantize import QuantizeOptions, quantize_run
from edgetl.train import train

DATA = Path(__file__).resolve().parents[2] / "shared/datasets/clothing-small"
WORK = Path("/tmp/edgetl-bench-runs/int8-targets")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", nargs="?")
    ap.add_argument("--min-time", type=float, default=20.0)
    args = ap.parse_args()
    rep = Reporter()
    if args.run:
        run = Path(args.run)
    else:
        shutil.rmtree(WORK, ignore_errors=True)
        run = train(DATA, TrainConfig(epochs_finetune=1), out=str(WORK / "run"), reporter=rep).run_dir
    export_run(run, ExportOptions(force=True), rep)
    folders = {}
    for target in ("portable", "vnni"):
        folder = WORK / f"run-{target}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(run, folder, ignore=shutil.ignore_patterns("*int8*", "quantize.json", "bench.*"))
        quantize_run(folder, QuantizeOptions(int8_target=target, max_drop=100.0, latency_runs=30), rep)
        folders[target] = folder
    meta = read_onnx_metadata(str(run / "model.onnx"))
    ls, classes, source, _ = scoring_set(DATA, "test")
    test = prepare(relabel(ls, classes, labels_from(meta), source), spec_from(meta), source, rep)
    models = {
        "onnxruntime": {"fp32": lambda: OrtModel(run / "model.onnx", threads=2),
                        **{t: (lambda f=f: OrtModel(f / "model.int8.onnx", threads=2)) for t, f in folders.items()}},
        "openvino": {"fp32": lambda: OpenVinoModel(run / "openvino" / "model.xml", threads=2),
                     **{t: (lambda f=f: OpenVinoModel(f / "openvino-int8" / "model.xml", threads=2)) for t, f in folders.items()}},
    }  # fmt: skip
    results: dict[str, dict[str, dict]] = {}
    for runtime, makers in models.items():
        loaded = {name: make() for name, make in makers.items()}
        results[runtime] = {}
        samples = interleaved_latency(loaded, test.floats[:1], args.min_time, warmup=20)
        for name, model in loaded.items():
            top1 = float((model.predict(test.floats).argmax(1) == test.labels).mean())
            results[runtime][name] = {"top1": top1, "latency": latency_stats(samples[name])}
        for name in loaded:
            r = results[runtime][name]
            r["drop_points"] = (results[runtime]["fp32"]["top1"] - r["top1"]) * 100
            r["ratio_to_fp32"] = r["latency"]["p50_ms"] / results[runtime]["fp32"]["latency"]["p50_ms"]
        del loaded
    rows = "".join(
        f"| {rt} | {name} | {r['top1']:.2%} | {r['drop_points']:+.2f} | {r['latency']['p50_ms']:.2f} | "
        f"{r['latency']['p90_ms']:.2f} | {r['ratio_to_fp32']:.2f}x |\n"
        for rt, by in results.items() for name, r in by.items()
    )  # fmt: skip
    save("int8_targets", {"run": str(run), "test_images": test.describe(), "results": results, "argv": sys.argv},
         f"# int8 deployment targets: portable vs vnni\n\nLite0 on clothing-small, accuracy on the {len(test.labels)} test images; "
         "batch-1 latency, 2 threads, each runtime's models interleaved in their own rounds.\n\n"
         "| runtime | model | test top-1 | drop (points) | p50 ms | p90 ms | p50 / fp32 |\n"
         "|---|---|---|---|---|---|---|\n" + rows)  # fmt: skip


if __name__ == "__main__":
    main()
