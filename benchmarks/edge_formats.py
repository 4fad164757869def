"""LiteRT and ExecuTorch beside ONNX Runtime and OpenVINO (issue 17): one trained run exported to every
format, int8 of each under the same budget and calibration images, then one `edgetl bench` run on the
clothing-small *test* split (never used for training, tuning or calibration), all variants interleaved.

    python benchmarks/edge_formats.py RUN --label lite0 [--min-time 15] [--threads 2]

Writes results/edge_formats_<label>.{json,md}: per variant top-1, batch-1 p50/p90/p99, size, the
int8/fp32 ratio, export and quantize records, and which runtime is fastest at batch 1 and by how much.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import save

from edgetl.bench.runner import BenchOptions, bench
from edgetl.errors import EdgetlError
from edgetl.export import ExportOptions, export_run
from edgetl.progress import Reporter
from edgetl.quantize import QuantizeOptions, quantize_run

DATA = Path(__file__).resolve().parents[2] / "shared/datasets/clothing-small"
TARGETS = ("ort-cpu", "openvino-cpu", "litert-cpu", "executorch-cpu")
FORMATS = "onnx,openvino,litert,executorch"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", help="export folder (default: <run>-edge beside the run)")
    ap.add_argument("--min-time", type=float, default=15.0, help="seconds of timed batch-1 runs per variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-drop", type=float, default=1.0)
    args = ap.parse_args()
    run = Path(args.run)
    out = Path(args.out) if args.out else run.with_name(run.name + "-edge")
    rep = Reporter()
    t0 = time.perf_counter()
    exp = export_run(run, ExportOptions(format=FORMATS, out=str(out), force=True), rep)
    t1 = time.perf_counter()
    # One format at a time, so one that cannot meet the budget does not stop the others (each call draws the
    # same seeded calibration sample; the refusal is reported).
    q: dict = {"results": {}, "refused": {}}
    for fmt in FORMATS.split(","):
        try:
            one = quantize_run(out, QuantizeOptions(format=fmt, max_drop=args.max_drop), rep)
        except EdgetlError as exc:
            q["refused"][fmt] = str(exc)
            continue
        q["results"].update(one["results"])
        q["calibration"] = one["calibration"]
    t2 = time.perf_counter()
    b = bench([out], BenchOptions(data=str(DATA), targets=TARGETS, batches=(1,), threads=args.threads, min_time=args.min_time,
                                  out=str(out)), rep)  # fmt: skip

    rows = [r for r in b["results"] if "latency" in r]
    fastest = min(rows, key=lambda r: r["latency"]["p50_ms"])
    fp32 = [r for r in rows if r["precision"] == "fp32"]
    fastest_fp32 = min(fp32, key=lambda r: r["latency"]["p50_ms"])
    table = ""
    for r in sorted(rows, key=lambda r: r["latency"]["p50_ms"]):
        lat, acc = r["latency"], r.get("accuracy", {})
        ratio = r.get("ratio_to_fp32_same_target")
        ratio_text = "-" if ratio is None else f"{ratio:.2f}x"
        vs_fastest = lat["p50_ms"] / fastest["latency"]["p50_ms"]
        table += (f"| {r['variant']} | {acc.get('top1', float('nan')):.2%} | {lat['p50_ms']:.2f} | {lat['p90_ms']:.2f} | "
                  f"{lat['p99_ms']:.2f} | {r['bytes'] / 1e6:.2f} | {ratio_text} | {vs_fastest:.2f}x |\n")  # fmt: skip
    parity = "".join(
        f"| {k} | {v['top1_agreement']:.2%} | {v['max_abs_diff']:.1e} | {v['gate']} | {exp['files'][k]['export_seconds']:.1f} |\n"
        for k, v in exp["parity"].items() if k != "pytorch"
    )  # fmt: skip
    int8 = "".join(
        f"| {k} | {v['fp32_top1']:.2%} | {v.get('int8_top1', v.get('top1')):.2%} | {v['drop_points']:+.2f} | "
        f"{v['executed']['int8_compute_ops']}/{v['executed']['compute_ops']} | {v['size_ratio']:.0%} |\n"
        for k, v in q["results"].items()
    )  # fmt: skip
    refused = "".join(f"- {k}: {v}\n" for k, v in q["refused"].items())
    delegation = exp["files"].get("executorch", {}).get("delegation", {})
    n_test = rows[0].get("accuracy", {}).get("n")
    md = (
        f"# Edge formats side by side: {args.label}\n\n"
        f"Run `{run}`; every format exported from one checkpoint, int8 calibrated on the same {q['calibration']['n']} "
        f"stratified training images under a {args.max_drop}-point budget on validation. Bench: clothing-small test split "
        f"({n_test} photos), batch 1, {args.threads} threads, every variant in its own worker process, interleaved rounds, "
        f">= {args.min_time:g} s timed each.\n\n"
        "| variant | test top-1 | p50 ms | p90 ms | p99 ms | MB | vs fp32 same runtime | vs fastest |\n|---|---|---|---|---|---|---|---|\n"
        f"{table}\n"
        f"Fastest at batch 1: **{fastest['variant']}** {fastest['latency']['p50_ms']:.2f} ms; fastest fp32: "
        f"**{fastest_fp32['variant']}** {fastest_fp32['latency']['p50_ms']:.2f} ms.\n\n"
        "## Export parity (validation images, each file in its own runtime)\n\n"
        f"| file | top-1 agreement | max abs logit diff | gate | export s |\n|---|---|---|---|---|\n{parity}\n"
        f"ExecuTorch delegation: {delegation}.\n\n"
        "## int8 (validation images, the budget's view)\n\n"
        f"| runtime | fp32 top-1 | int8 top-1 | drop (points) | compute ops in int8 | size |\n|---|---|---|---|---|---|\n{int8}\n"
        + (f"Refused by the budget (no int8 file written):\n\n{refused}\n" if refused else "")
        + f"Wall time: export {t1 - t0:.0f} s, quantize {t2 - t1:.0f} s, bench {time.perf_counter() - t2:.0f} s.\n"
    )
    save(f"edge_formats_{args.label}", {"export": exp, "quantize": q, "bench": b, "fastest": fastest["variant"],
                                        "fastest_fp32": fastest_fp32["variant"]}, md)  # fmt: skip


if __name__ == "__main__":
    main()
