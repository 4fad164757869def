"""What was tried for OpenVINO int8 speed on this CPU: NNCF settings, threads and batch, side by side.

    python benchmarks/openvino_int8_variants.py RUN

RUN must hold openvino/model.xml (edgetl export). Every int8 variant is quantized from the same 300
calibration images (training split) and timed against the fp32 IR in one interleaved run; top-1 is on
the run's validation split. For each model the table also says how many compute layers OpenVINO runs
in int8 and with which kernels, so "int8 is not faster" can be told apart from "int8 is not running".
Writes results/openvino_int8_variants.{json,md}.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from common import result_name, save

from edgetl.backends.openvino import OpenVinoModel
from edgetl.bench.timing import interleaved_latency
from edgetl.executed_ops import openvino_executed_layers
from edgetl.metadata import read_onnx_metadata
from edgetl.progress import Reporter
from edgetl.quantize import QuantizeOptions, load_images
from edgetl.run import RunFolder

ROUNDS, RUNS = 6, 50


def interleaved(models: dict[str, Any], x: np.ndarray) -> dict[str, float]:
    """Median ms per call of each model, rounds interleaved so drift on a shared machine hits all alike."""
    samples = interleaved_latency(models, x, min_time=0.0, warmup=10, rounds=ROUNDS, runs_per_round=RUNS)
    return {k: float(np.median(v)) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--label", default="", help="suffix of the result files, so one host's results do not overwrite another's")
    args = ap.parse_args()
    import nncf
    import openvino as ov

    run = Path(args.run)
    xml = run / "openvino" / "model.xml"
    calib, val, _ = load_images(RunFolder.open(run), read_onnx_metadata(str(run / "model.onnx")), QuantizeOptions(), Reporter())
    calib_ds = nncf.Dataset([calib.floats[i : i + 1] for i in range(len(calib.floats))])
    variants = {
        "NNCF PERFORMANCE preset (edgetl default)": {"preset": nncf.QuantizationPreset.PERFORMANCE},
        "NNCF MIXED preset (asymmetric activations)": {"preset": nncf.QuantizationPreset.MIXED},
        "NNCF PERFORMANCE, depthwise convolutions in float": {
            "preset": nncf.QuantizationPreset.PERFORMANCE, "ignored_scope": nncf.IgnoredScope(types=["GroupConvolution"]),
        },
    }  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="edgetl-ov-variants-"))
    paths = {"fp32": xml}
    for i, (name, kw) in enumerate(variants.items()):
        q = nncf.quantize(ov.Core().read_model(str(xml)), calib_ds, subset_size=len(calib.floats), **kw)
        paths[name] = tmp / f"v{i}.xml"
        ov.save_model(q, str(paths[name]), compress_to_fp16=False)

    rows: dict[str, dict[str, Any]] = {}
    two = {k: OpenVinoModel(p, threads=2) for k, p in paths.items()}
    lat2 = interleaved(two, val.floats[:1])
    for k, m in two.items():
        ex = openvino_executed_layers(paths[k])
        rows[k] = {
            "top1": float((m.predict(val.floats).argmax(1) == val.labels).mean()), "p50_ms_2_threads": lat2[k],
            "ratio_2_threads": lat2[k] / lat2["fp32"], "int8_layers": ex["int8_compute_ops"], "layers": ex["compute_ops"],
            "kernels": ex["kernels"],
        }  # fmt: skip
    default = next(iter(variants))
    # The default int8 model against fp32 on one core, and at batch 8 (int8's gain should grow with work per call).
    one = {k: OpenVinoModel(paths[k], threads=1) for k in ("fp32", default)}
    lat1 = interleaved(one, val.floats[:1])
    lat8 = interleaved({k: two[k] for k in ("fp32", default)}, val.floats[:8])
    extra = {
        "1 thread, batch 1": {"fp32_ms": lat1["fp32"], "int8_ms": lat1[default], "ratio": lat1[default] / lat1["fp32"]},
        "2 threads, batch 8": {"fp32_ms": lat8["fp32"], "int8_ms": lat8[default], "ratio": lat8[default] / lat8["fp32"]},
    }
    md = (
        "# OpenVINO int8 settings on this CPU (clothing-small validation)\n\n"
        "| model | val top-1 | p50 ms (batch 1, 2 threads) | int8/fp32 | layers run in int8 | kernels |\n|---|---|---|---|---|---|\n"
        + "".join(
            f"| {k} | {v['top1']:.2%} | {v['p50_ms_2_threads']:.2f} | {v['ratio_2_threads']:.2f} | {v['int8_layers']}/{v['layers']} | "
            f"{', '.join(f'{n} {kern}' for kern, n in v['kernels'].items())} |\n"
            for k, v in rows.items()
        )
        + "\nThe default int8 model against fp32 in other settings:\n\n| setting | fp32 ms | int8 ms | int8/fp32 |\n|---|---|---|---|\n"
        + "".join(f"| {k} | {v['fp32_ms']:.2f} | {v['int8_ms']:.2f} | {v['ratio']:.2f} |\n" for k, v in extra.items())
        + f"\n{RUNS * ROUNDS} runs per model interleaved in {ROUNDS} rounds, medians.\n"
    )
    name = result_name("openvino_int8_variants", args.label)
    save(name, {"run": str(run), "results": rows, "other_settings": extra}, md)


if __name__ == "__main__":
    main()
