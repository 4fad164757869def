"""What else was tried for ONNX Runtime int8 speed on this CPU: quantization settings side by side.

    python benchmarks/int8_variants.py RUN

RUN must hold model.onnx (edgetl export). Each variant is quantized with the same 300 calibration
images (training split) and timed at batch 1 against the fp32 model, all interleaved in one run;
top-1 is on the run's validation split. Writes results/int8_variants.{json,md}.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
from common import result_name, save

from edgetl.backends.onnxruntime import OrtModel
from edgetl.metadata import read_onnx_metadata
from edgetl.progress import Reporter
from edgetl.quantize import QuantizeOptions, _Reader, load_images
from edgetl.run import RunFolder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--label", default="", help="suffix of the result files, so one host's results do not overwrite another's")
    args = ap.parse_args()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    run = Path(args.run)
    meta = read_onnx_metadata(str(run / "model.onnx"))
    calib, val, _ = load_images(RunFolder.open(run), meta, QuantizeOptions(), Reporter())
    tmp = Path(tempfile.mkdtemp())
    pre = tmp / "pre.onnx"
    quant_pre_process(str(run / "model.onnx"), str(pre))
    depthwise = [n.name for n in onnx.load(str(pre)).graph.node
                 if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]  # fmt: skip
    variants = {
        "QDQ U8S8 per-channel reduce_range (edgetl default here)": dict(quant_format=QuantFormat.QDQ, weight_type=QuantType.QInt8,
                                                                        reduce_range=True),
        "QDQ U8S8 per-channel full range": dict(quant_format=QuantFormat.QDQ, weight_type=QuantType.QInt8, reduce_range=False),
        "QOperator U8S8 per-channel reduce_range": dict(quant_format=QuantFormat.QOperator, weight_type=QuantType.QInt8, reduce_range=True),
        "QDQ U8U8 per-channel": dict(quant_format=QuantFormat.QDQ, weight_type=QuantType.QUInt8, reduce_range=False),
        # Signed activations: ORT's docs name S8S8 in QDQ the first choice on x86-64; MLAS has symmetric conv kernels per sign.
        "QDQ S8S8 per-channel": dict(quant_format=QuantFormat.QDQ, weight_type=QuantType.QInt8, reduce_range=False,
                                     activation_type=QuantType.QInt8),
        f"QDQ U8S8 reduce_range, {len(depthwise)} depthwise convs in float": dict(quant_format=QuantFormat.QDQ, weight_type=QuantType.QInt8,
                                                                                 reduce_range=True, nodes_to_exclude=depthwise),
    }  # fmt: skip
    models = {"fp32": OrtModel(run / "model.onnx")}
    for i, (name, kw) in enumerate(variants.items()):
        out = tmp / f"v{i}.onnx"
        kw = {"activation_type": QuantType.QUInt8, **kw}
        quantize_static(str(pre), str(out), _Reader(calib.floats, "input"), per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                        **kw)  # fmt: skip
        models[name] = OrtModel(out)
    top1 = {k: float((m.predict(val.floats).argmax(1) == val.labels).mean()) for k, m in models.items()}
    x = val.floats[:1]
    times: dict[str, list[float]] = {k: [] for k in models}
    import time

    for m in models.values():
        for _ in range(10):
            m(x)
    for _ in range(6):
        for k, m in models.items():
            for _ in range(50):
                t = time.perf_counter()
                m(x)
                times[k].append((time.perf_counter() - t) * 1000)
    med = {k: float(np.median(v)) for k, v in times.items()}
    rows = {k: {"top1": top1[k], "p50_ms": med[k], "ratio": med[k] / med["fp32"], "bytes": (run / "model.onnx").stat().st_size
                if k == "fp32" else None} for k in models}  # fmt: skip
    md = ("# ONNX Runtime int8 settings on this CPU (efficientnet_lite0, clothing-small validation)\n\n"
          "| variant | val top-1 | p50 ms | int8/fp32 |\n|---|---|---|---|\n"
          + "".join(f"| {k} | {v['top1']:.2%} | {v['p50_ms']:.2f} | {v['ratio']:.2f} |\n" for k, v in rows.items())
          + "\nBatch 1, 300 runs per model interleaved in 6 rounds, medians.\n")  # fmt: skip
    save(result_name("int8_variants", args.label), {"run": str(run), "results": rows}, md)


if __name__ == "__main__":
    main()
