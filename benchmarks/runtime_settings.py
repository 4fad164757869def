"""ONNX Runtime and OpenVINO settings for batch-1 latency, each against the runtime's defaults, in one
interleaved run (issue 18, part 1).

    python benchmarks/runtime_settings.py EXPORT_DIR BATCH1_DIR [--label lite0] [--min-time 8] [--threads 2]

EXPORT_DIR: an `edgetl export ... --quantize int8` folder (dynamic batch). BATCH1_DIR: the same run
exported with `--batch 1 --embed-preprocess --quantize int8` (static batch-1 graphs, and the
uint8-in-graph model that takes the crop's pixels with no float input copy).

Every variant runs in a bench worker process of its own (edgetl.bench.isolation, as `edgetl bench`
does, so no runtime's idle threads slow another's turn), on one real validation image prepared by
edgetl.runtime.Classifier, with `--threads` threads, in interleaved rounds. Reported: p50 and IQR,
each variant's p50 over ONNX Runtime's default fp32 session measured in the same rounds, and p50 as a
multiple of the arithmetic floor (the model's MACs over this CPU's measured peak, from
results/cpu_peak.json or `--peak`; benchmarks/cpu_peak.py says how it is measured).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from common import load_result, save

from edgetl.bench.base import Variant
from edgetl.bench.isolation import ArrayFiles, ProcessWorker, interleaved_rounds
from edgetl.bench.timing import latency_stats
from edgetl.hostinfo import host_record

ORT_VARIANTS = {
    "defaults": (),
    "no spinning": (("session.intra_op.allow_spinning", "0"),),
    "graph opt extended (no NCHWc)": (("graph_optimization_level", "extended"),),
    "no memory pattern, no arena": (("enable_mem_pattern", "false"), ("enable_cpu_mem_arena", "false")),
    "dynamic_block_base 4": (("session.dynamic_block_base", "4"),),
}  # fmt: skip
OV_VARIANTS = {
    "LATENCY hint (edgetl)": (),
    "CPU pinning on": (("ENABLE_CPU_PINNING", "YES"),),
    "CPU pinning off": (("ENABLE_CPU_PINNING", "NO"),),
    "denormals flushed": (("CPU_DENORMALS_OPTIMIZATION", "YES"),),
}  # fmt: skip


def _image(export_dir: Path) -> Path:
    """One real validation image of the run the export came from."""
    from edgetl.run import RunFolder

    meta = json.loads((export_dir / "export.json").read_text())
    return Path(RunFolder.open(meta.get("run") or export_dir).dataset().val.refs[0].path)  # the recorded validation list


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("batch1_dir", type=Path)
    ap.add_argument("--label", default="lite0")
    ap.add_argument("--min-time", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--macs", type=float, default=385e6, help="multiply-adds of the model (edgetl backbones)")
    ap.add_argument("--peak", default="cpu_peak", help="the results file of this host's peak (cpu_peak.py --tag T writes cpu_peak_T)")
    args = ap.parse_args()
    from edgetl.runtime import Classifier

    peak = load_result(args.peak, "peak of this CPU (run cpu_peak.py on it)")
    # The floor is this CPU's: a peak measured on another host would put every 'x floor' on a wrong scale.
    here = host_record()
    if (peak["host"]["cpu_model"], peak["host"]["cpu_flags"]) != (here["cpu_model"], here["cpu_flags"]):
        raise SystemExit(f"results/{args.peak}.json was measured on {peak['host']['cpu_model']} with other CPU flags than "
                         f"this {here['cpu_model']}: run cpu_peak.py --tag T here and pass --peak cpu_peak_T")  # fmt: skip
    peaks = peak["peaks_macs_per_s"]
    d, b1 = args.export_dir, args.batch1_dir
    # Every file a variant times, named up front: a wrong folder ends here in one line, not in a worker.
    timed = ("model.onnx", "model.int8.onnx", "openvino/model.xml", "openvino-int8/model.xml")
    needed = [d / "export.json", b1 / "model.uint8.onnx"] + [f / name for f in (d, b1) for name in timed]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise SystemExit(f"not an int8 export (EXPORT_DIR) and a --batch 1 --embed-preprocess one (BATCH1_DIR): no {', '.join(missing)}")
    image = _image(d)
    x_float = Classifier(d / "model.onnx").prepare(image)[None]
    x_uint8 = Classifier(b1 / "model.uint8.onnx").prepare(image)[None]
    floor_ms = {p: args.macs / peaks[p] * 1000 for p in ("fp32", "int8")}

    variants: dict[str, tuple[Variant, str]] = {}
    for prec, onnx_name, ov_dir in (("fp32", "model.onnx", "openvino"), ("int8", "model.int8.onnx", "openvino-int8")):
        for label, settings in ORT_VARIANTS.items():
            variants[f"ort/{prec} {label}"] = (Variant("ort-cpu", d / onnx_name, "onnx", prec, settings=settings), prec)
        variants[f"ort/{prec} static batch 1"] = (Variant("ort-cpu", b1 / onnx_name, "onnx", prec), prec)
        for label, settings in OV_VARIANTS.items():
            xml = d / ov_dir / "model.xml"
            variants[f"openvino/{prec} {label}"] = (Variant("openvino-cpu", xml, "openvino", prec, settings=settings), prec)
        variants[f"openvino/{prec} static batch 1"] = (Variant("openvino-cpu", b1 / ov_dir / "model.xml", "openvino", prec), prec)
    variants["ort/fp32 uint8 input in graph"] = (Variant("ort-cpu", b1 / "model.uint8.onnx", "onnx", "fp32", "uint8"), "fp32")

    with tempfile.TemporaryDirectory() as tmp:
        files = ArrayFiles(Path(tmp))
        workers, inputs = {}, {}
        for name, (v, _) in variants.items():
            x = x_uint8 if v.input_dtype == "uint8" else x_float
            w = ProcessWorker(v, x.shape, args.threads, files)
            if w.error:
                raise SystemExit(f"{name}: {w.error}")
            workers[name], inputs[name] = w, x
        try:
            samples = interleaved_rounds(workers, inputs, args.min_time, warmup=30, rounds=8)
        finally:
            infos = {n: w.info for n, w in workers.items()}
            for w in workers.values():
                w.close()

    ref = latency_stats(samples["ort/fp32 defaults"])["p50_ms"]
    rows, results = [], {}
    for name, (v, prec) in variants.items():
        st = latency_stats(samples[name])
        iqr = float(np.subtract(*np.percentile(samples[name], [75, 25])))
        results[name] = {**st, "iqr_ms": iqr, "settings": dict(v.settings), "model": str(v.model),
                         "resolved_settings": infos[name].get("settings"), "load_seconds": infos[name]["load_seconds"],
                         "over_ort_fp32_defaults": st["p50_ms"] / ref, "floor_ms": floor_ms[prec],
                         "x_floor": st["p50_ms"] / floor_ms[prec]}  # fmt: skip
        rows.append(f"| {name} | {st['p50_ms']:.2f} | {iqr:.2f} | {st['p50_ms'] / ref:.2f}x | {st['p50_ms'] / floor_ms[prec]:.1f}x | "
                    f"{infos[name]['load_seconds']:.2f} |")  # fmt: skip
    md = (f"# Runtime settings at batch 1 ({args.label}, {args.threads} threads, one interleaved run, {args.min_time:g} s a variant)\n\n"
          f"Floor: {floor_ms['fp32']:.2f} ms fp32, {floor_ms['int8']:.2f} ms int8 ({args.macs / 1e6:.0f} M MACs over {args.peak}.json).\n\n"
          "| variant | p50 ms | IQR ms | / ORT fp32 defaults | x floor | load s |\n|---|---|---|---|---|---|\n"
          + "\n".join(rows))  # fmt: skip
    save(f"runtime_settings_{args.label}", {"export_dir": str(d), "batch1_dir": str(b1), "threads": args.threads,
                                             "floor_ms": floor_ms, "results": results}, md)  # fmt: skip


if __name__ == "__main__":
    main()
