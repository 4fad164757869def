"""This CPU's measured multiply-add peak, fp32 and int8, and each batch-1 latency as a multiple of the
arithmetic floor it implies (issue 18, part 1: "p50 as a fraction of the floor").

    python benchmarks/cpu_peak.py [--edge-results results/edge_formats_lite0.json] [--threads 2] [--tag TAG]

`--edge-results` takes edge_formats.py result files or an `edgetl bench --out DIR` folder's bench.json.
Only latencies measured on this CPU (the same model name and instruction-set flags in the result's host
record) are set against this CPU's floor; the others are listed as skipped. A row's multiply-adds come
from its model file's edgetl metadata (backbone and input size) where the file is still on disk, else
from the result's name (a path with "lite2" in it is Lite2 at 260 px, anything else Lite0 at 224).
bf16 rows are measured against the bf16 floor where the CPU has bf16 instructions, else against the
fp32 floor.

Method: the peak is what the runtimes' best kernels reach on a large square matrix product, not a data
sheet figure (the clock under load is unknown on a shared VM): fp32 with torch.mm (oneDNN/MKL), int8
with ONNX Runtime's MatMulInteger (uint8 x int8, MLAS, which uses VNNI or AMX where the CPU has it), N = 2048,
`--threads` threads, the best of 20 timed runs after 5 warm-ups (best, because the floor is what the
hardware *can* do); bf16, where the CPU has bf16 instructions, with torch.mm on bf16 matrices (oneDNN:
AMX tiles where the CPU has them, else AVX-512 bf16 dot products). The floor of a model is its
multiply-adds (timm's count, `edgetl backbones`) divided by that peak; a latency's "x floor" is
p50 / floor. Real networks sit well above it: depthwise convolutions and small late layers cannot use
a GEMM's full width.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from common import RESULTS, result_name, save

from edgetl.hostinfo import has_bf16

N = 2048
MACS = {"efficientnet_lite0": 385e6, "efficientnet_lite2": 860e6}  # timm's counts at 224 / 260 px (`edgetl backbones`)


def _best_seconds(fn, runs: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def fp32_peak(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(N, N), torch.randn(N, N)
    return N**3 / _best_seconds(lambda: torch.mm(a, b))


def bf16_peak(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(N, N, dtype=torch.bfloat16), torch.randn(N, N, dtype=torch.bfloat16)
    return N**3 / _best_seconds(lambda: torch.mm(a, b))


def int8_peak(threads: int) -> float:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "mm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [N, N]), helper.make_tensor_value_info("b", TensorProto.INT8, [N, N])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [N, N])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts)
    rng = np.random.default_rng(0)
    feed = {"a": rng.integers(0, 255, (N, N), dtype=np.uint8), "b": rng.integers(-127, 127, (N, N), dtype=np.int8)}
    return N**3 / _best_seconds(lambda: sess.run(None, feed))


def same_cpu(result: dict) -> bool:
    """Whether a result file was measured on a CPU like this one (a floor is only meaningful against its own CPU)."""
    from edgetl.hostinfo import host_record

    here, there = host_record(), result.get("host") or result.get("bench", {}).get("host") or {}
    return (there.get("cpu_model"), there.get("cpu_flags")) == (here["cpu_model"], here["cpu_flags"])


def model_macs(model: str, fallback: str) -> tuple[str, float]:
    """A bench row's backbone (with its input size when not the default) and multiply-adds: from the model
    file's edgetl metadata where it is still here, else the result name's backbone at its default size."""
    path = Path(model)
    meta: dict[str, str] = {}
    if path.suffix == ".onnx" and path.is_file():
        from edgetl.metadata import read_onnx_metadata

        meta = read_onnx_metadata(str(path))
    elif path.suffix == ".xml" and path.is_file():
        from edgetl.backends.openvino import read_metadata

        meta = read_metadata(path)
    if "backbone" in meta and "input_size" in meta:
        from edgetl.profile import count_macs_and_params

        backbone, size = meta["backbone"], int(meta["input_size"])
        return f"{backbone}@{size}", float(count_macs_and_params(backbone, size)[0])
    return fallback, MACS[fallback]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--edge-results", nargs="*",
                    default=[str(RESULTS / "edge_formats_lite0.json"), str(RESULTS / "edge_formats_lite2-head.json")])  # fmt: skip
    ap.add_argument("--tag", default="", help="suffix of the results file name (another machine's peak)")
    args = ap.parse_args()
    peaks = {"fp32": fp32_peak(args.threads), "int8": int8_peak(args.threads)}
    if has_bf16():
        peaks["bf16"] = bf16_peak(args.threads)
    rows, table, other_cpu = [], "", []
    macs_of: dict[str, tuple[str, float]] = {}
    for path in args.edge_results:
        if not Path(path).is_file():
            continue
        report = json.loads(Path(path).read_text())
        if not same_cpu(report):
            other_cpu.append(path)
            continue
        bench = report.get("bench", report)  # edge_formats.py wraps the bench report; bench.json is one
        fallback = "efficientnet_lite2" if "lite2" in str(path) else "efficientnet_lite0"
        for r in sorted((r for r in bench["results"] if "latency" in r), key=lambda r: r["latency"]["p50_ms"]):
            if r["model"] not in macs_of:
                macs_of[r["model"]] = model_macs(r["model"], fallback)
            backbone, macs = macs_of[r["model"]]
            precision = r["precision"] if r["precision"] in peaks else "fp32"
            floor_ms = macs / peaks[precision] * 1e3
            row = {"model": backbone, "variant": r["variant"], "p50_ms": r["latency"]["p50_ms"], "floor_ms": floor_ms,
                   "x_floor": r["latency"]["p50_ms"] / floor_ms}  # fmt: skip
            rows.append(row)
            table += f"| {backbone} | {r['variant']} | {row['p50_ms']:.2f} | {floor_ms:.2f} | {row['x_floor']:.1f}x |\n"
    payload = {"edge_results": args.edge_results, "peaks_macs_per_s": peaks, "n": N, "threads": args.threads, "rows": rows,
               "skipped_other_cpu": other_cpu}  # fmt: skip
    save(result_name("cpu_peak", args.tag), payload,
         f"# This CPU's multiply-add peak and the arithmetic floor\n\n"
         f"Measured peak ({args.threads} threads, {N}x{N} matrix product, best of 20): fp32 **{peaks['fp32'] / 1e9:.1f} GMAC/s** "
         f"(torch.mm), int8 **{peaks['int8'] / 1e9:.1f} GMAC/s** (ONNX Runtime MatMulInteger u8 x s8; "
         f"{peaks['int8'] / peaks['fp32']:.2f}x fp32)"
         + (f", bf16 **{peaks['bf16'] / 1e9:.1f} GMAC/s** (torch.mm; {peaks['bf16'] / peaks['fp32']:.2f}x fp32)" if "bf16" in peaks else "")
         + ". Floor = the model's multiply-adds / peak (timm's count at the model's input size: Lite0 at 224 px 385 M).\n\n"
         + ("| model | variant | p50 ms | floor ms | x floor |\n|---|---|---|---|---|\n" + table if table else "")
         + ("\nNot set against this floor (measured on another CPU): " + ", ".join(f"`{Path(p).name}`" for p in other_cpu) + ".\n"
            if other_cpu else ""))  # fmt: skip


if __name__ == "__main__":
    main()
