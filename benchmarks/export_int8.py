"""Export time and parity (issue 3), then int8 accuracy, latency and size (issue 4), for a trained run.

    python benchmarks/export_int8.py RUN [--label efficientnet_lite0] [--skip-int8]

RUN is a run folder trained on clothing-small. Writes results/export_<label>.{json,md} and
results/int8_<label>.{json,md}. int8 accuracy is scored on the clothing-small *test* split (never
used for training, tuning or calibration); calibration uses the training split and the budget the
validation split, as `edgetl export --quantize int8` does.
Targets (issue 4): top-1 drop <= 0.5 point; batch-1 int8/fp32 latency <= 0.55 (ONNX Runtime) and
<= 0.40 (OpenVINO), measured interleaved in one run; int8 file <= 30% of fp32.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import save

from edgetl.backends.onnxruntime import OrtModel
from edgetl.backends.openvino import OpenVinoModel
from edgetl.data import scoring_set
from edgetl.export import ExportOptions, export_run
from edgetl.metadata import read_onnx_metadata, spec_from
from edgetl.parity import prepare
from edgetl.progress import Reporter
from edgetl.quantize import QuantizeOptions, quantize_run

DATA = Path(__file__).resolve().parents[2] / "shared/datasets/clothing-small"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--label", default=None)
    ap.add_argument("--skip-int8", action="store_true")
    args = ap.parse_args()
    run = Path(args.run)
    rep = Reporter()
    t0 = time.perf_counter()
    exp = export_run(run, ExportOptions(force=True, embed_preprocess=True), rep)
    export_wall = time.perf_counter() - t0
    label = args.label or Path(exp["run"]).name
    rows = "".join(
        f"| {k} | {exp['files'][k]['bytes'] / 1e6:.2f} MB | {exp['files'][k]['export_seconds']:.1f} | {v['precision']} | {v['top1']:.2%} | "
        f"{v['top1_agreement']:.2%} | {v['max_abs_diff']:.1e} | {v['gate']} |\n"
        for k, v in exp["parity"].items() if k != "pytorch"
    )  # fmt: skip
    save(f"export_{label}", {"export": exp, "export_wall_seconds": export_wall},
         f"# Export and parity: {label}\n\nParity on {exp['parity_images']['n']} validation images of {exp['parity_images']['source']}; "
         f"PyTorch top-1 {exp['parity']['pytorch']['top1']:.2%}. Whole export command {export_wall:.0f} s (ONNX export, uint8 variant, "
         "OpenVINO conversion, parity runs).\n\n| file | size | export s | precision | top-1 | agreement | max abs logit diff | gate |\n"
         f"|---|---|---|---|---|---|---|---|\n{rows}")  # fmt: skip
    if args.skip_int8:
        return
    q = quantize_run(run, QuantizeOptions(), rep)
    meta = read_onnx_metadata(str(run / "model.onnx"))
    ls, classes, _, _ = scoring_set(DATA, "test")
    assert classes == list(__import__("json").loads(meta["labels"]))
    test = prepare(ls, spec_from(meta), f"{DATA} (test)", rep)
    models = {
        ("onnxruntime", "fp32"): OrtModel(run / "model.onnx"),
        ("onnxruntime", "int8"): OrtModel(run / "model.int8.onnx"),
        ("openvino", "fp32"): OpenVinoModel(run / "openvino/model.xml"),
        ("openvino", "int8"): OpenVinoModel(run / "openvino-int8/model.xml"),
    }  # fmt: skip
    test_top1 = {f"{r}/{p}": float((m.predict(test.floats).argmax(1) == test.labels).mean()) for (r, p), m in models.items()}
    table = []
    out: dict = {"quantize": q, "test_top1": test_top1, "test_n": len(test.labels), "targets": {}}
    for runtime, limit in (("onnxruntime", 0.55), ("openvino", 0.40)):
        r = q["results"][runtime]
        drop = (test_top1[f"{runtime}/fp32"] - test_top1[f"{runtime}/int8"]) * 100
        lat = r["latency"]
        out["targets"][runtime] = {
            "test_drop_points": drop, "drop_ok": drop <= 0.5, "latency_ratio": lat["int8_over_fp32"],
            "latency_ok": lat["int8_over_fp32"] <= limit, "latency_limit": limit, "size_ratio": r["size_ratio"],
            "size_ok": r["size_ratio"] <= 0.30,
        }  # fmt: skip
        table.append(
            f"| {runtime} | {test_top1[f'{runtime}/fp32']:.2%} | {test_top1[f'{runtime}/int8']:.2%} | {drop:+.2f} | "
            f"{r['drop_points']:+.2f} | {lat['fp32']['median_ms']:.2f} | {lat['int8']['median_ms']:.2f} | "
            f"{lat['int8_over_fp32']:.2f} (<= {limit}) | {r['size_ratio']:.0%} | {len(r['kept_in_float'])} | "
            f"{r['executed']['int8_compute_ops']}/{r['executed']['compute_ops']} |\n"
        )
    md = (
        f"# int8: {label} (clothing-small test split, n={len(test.labels)})\n\n"
        "| runtime | fp32 test top-1 | int8 test top-1 | test drop (pt) | val drop (pt) | fp32 ms | int8 ms | int8/fp32 | size "
        "| kept in float | compute ops run in int8 |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n" + "".join(table)
        + f"\nLatency: batch 1, {q['results']['onnxruntime']['latency']['fp32']['runs']} timed runs per model, fp32 and int8 interleaved "
        f"in 6 rounds, medians. ONNX Runtime types: {q['results']['onnxruntime']['types']['why']}.\n"
        + ("\nWarnings: " + "; ".join(q["warnings"]) + "\n" if q["warnings"] else "")
    )
    save(f"int8_{label}", out, md)
    np.set_printoptions(precision=3)


if __name__ == "__main__":
    main()
