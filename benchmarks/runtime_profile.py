"""Where batch-1 time goes, per operator class, in ONNX Runtime and OpenVINO (issue 18, part 1).

    python benchmarks/runtime_profile.py EXPORT_DIR [--label lite0] [--runs 200] [--threads 2]

EXPORT_DIR is an `edgetl export` folder holding model.onnx, model.int8.onnx, openvino/model.xml and
openvino-int8/model.xml. Each model runs `--runs` times on one real validation-sized input (a fixed
seeded image batch is enough: operator times do not depend on pixel values) with the runtime's own
profiler on:

- ONNX Runtime: SessionOptions.enable_profiling; the JSON trace's per-node kernel times ("Node"
  events), classified with the optimised graph ORT saves (optimized_model_filepath), which is the
  graph the trace names (fused Conv+Clip, NCHWc reorders, QLinearConv).
- OpenVINO: PERF_COUNT=YES and InferRequest.get_profiling_info(): each executed node's real time
  and the kernel it ran (exec_type, e.g. jit_avx512_dw_I8, brgconv_avx512_1x1_I8, ref_any).

Operator classes: depthwise convolution (group == channels), pointwise (1x1), other convolution
(the 3x3 stem), layout reorders (ORT ReorderInput/Output, OpenVINO Reorder), quantize/dequantize,
element-wise (activations, adds, clips), pooling + classifier, other. "Overhead" is the p50 wall time
of a profiled call minus the p50 of the summed operator times of a call: input copy, run set-up,
thread wake-up, output copy. Profiling itself adds a little time, so absolute numbers are a few
percent above an unprofiled run; the shares are what this script is for.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from common import save

CLASSES = ("depthwise conv", "pointwise conv", "other conv", "layout reorder", "quantize/dequantize", "element-wise",
           "pooling + classifier", "other")  # fmt: skip


def _conv_class(group: int, kernel: list[int] | None, out_channels: int | None) -> str:
    if group > 1:
        return "depthwise conv"
    if kernel and all(k == 1 for k in kernel):
        return "pointwise conv"
    return "other conv"


def _ort_node_classes(optimized: Path) -> dict[str, str]:
    """Node name -> operator class, from ORT's saved optimised graph."""
    import onnx

    model = onnx.load(str(optimized), load_external_data=False)
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    out: dict[str, str] = {}
    for node in model.graph.node:
        op = node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if op in ("Conv", "QLinearConv", "FusedConv", "ConvInteger"):
            w = node.input[3] if op == "QLinearConv" else node.input[1]
            dims = inits.get(w)
            kernel = list(attrs.get("kernel_shape") or (dims[2:] if dims else []))
            out[node.name] = _conv_class(int(attrs.get("group", 1)), kernel, dims[0] if dims else None)
        elif op in ("ReorderInput", "ReorderOutput", "Transpose"):
            out[node.name] = "layout reorder"
        elif op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
            out[node.name] = "quantize/dequantize"
        elif op in ("Clip", "Relu", "Add", "QLinearAdd", "Mul", "Sub", "Div", "Sigmoid", "HardSwish", "Cast"):
            out[node.name] = "element-wise"
        elif op in ("GlobalAveragePool", "QLinearGlobalAveragePool", "Gemm", "MatMul", "QGemm", "Flatten", "Reshape"):
            out[node.name] = "pooling + classifier"
        else:
            out[node.name] = "other"
    return out


def profile_ort(path: Path, x: np.ndarray, runs: int, threads: int) -> dict:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "trace")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        for _ in range(20):
            sess.run(None, {name: x})
        wall = []
        for _ in range(runs):
            t = time.perf_counter()
            sess.run(None, {name: x})
            wall.append((time.perf_counter() - t) * 1000)
        trace = json.loads(Path(sess.end_profiling()).read_text())
        classes = _ort_node_classes(Path(tmp) / "optimized.onnx")
    # Kernel events of the timed runs: every run has the same node sequence; take the last `runs` runs.
    runs_ms = [e["dur"] / 1000 for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"][-runs:]
    nodes = [e for e in trace if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    per_run = len(nodes) // (runs + 20)
    nodes = nodes[-runs * per_run :]
    per_class: dict[str, list[float]] = defaultdict(lambda: [0.0] * runs)
    per_op: dict[str, float] = defaultdict(float)
    sums = [0.0] * runs
    for i, e in enumerate(nodes):
        node = e["name"][: -len("_kernel_time")]
        cls = classes.get(node, "other")
        ms = e["dur"] / 1000
        per_class[cls][i // per_run] += ms
        per_op[e["args"].get("op_name", "?")] += ms / runs
        sums[i // per_run] += ms
    return _summary(wall, runs_ms, sums, per_class, per_op, per_run)


def _ov_class(node_type: str, exec_type: str) -> str:
    t, e = node_type.lower(), exec_type.lower()
    if t in ("convolution", "groupconvolution"):
        return "depthwise conv" if ("dw" in e or t == "groupconvolution") else ("pointwise conv" if "1x1" in e else "other conv")
    if t in ("reorder", "transpose"):
        return "layout reorder"
    if t in ("fakequantize", "quantize", "dequantize", "convert"):
        return "quantize/dequantize"
    if t in ("eltwise", "clamp", "relu", "add", "multiply", "subtract"):
        return "element-wise"
    if t in ("pooling", "reduce", "reducemean", "fullyconnected", "matmul", "reshape", "squeeze"):
        return "pooling + classifier"
    return "other"


def profile_openvino(xml: Path, x: np.ndarray, runs: int, threads: int) -> dict:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(xml)), "CPU", {"PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY",
                                                                     "INFERENCE_NUM_THREADS": threads,
                                                                     "INFERENCE_PRECISION_HINT": "f32"})  # fmt: skip
    req = compiled.create_infer_request()
    req.set_input_tensor(ov.Tensor(x, shared_memory=True))
    for _ in range(20):
        req.infer()
    wall, sums = [], []
    per_class: dict[str, list[float]] = defaultdict(lambda: [0.0] * runs)
    per_op: dict[str, float] = defaultdict(float)
    count = 0
    for r in range(runs):
        t = time.perf_counter()
        req.infer()
        wall.append((time.perf_counter() - t) * 1000)
        total = 0.0
        executed = [p for p in req.get_profiling_info() if p.status == p.Status.EXECUTED]
        count = len(executed)
        for p in executed:
            ms = p.real_time.total_seconds() * 1000
            per_class[_ov_class(p.node_type, p.exec_type)][r] += ms
            per_op[f"{p.node_type} [{p.exec_type}]"] += ms / runs
            total += ms
        sums.append(total)
    return _summary(wall, None, sums, per_class, per_op, count)


def _summary(wall: list[float], session_ms: list[float] | None, sums: list[float], per_class: dict[str, list[float]],
             per_op: dict[str, float], nodes: int) -> dict:  # fmt: skip
    p50 = statistics.median(wall)
    ops = statistics.median(sums)
    return {
        "wall_p50_ms": p50, "wall_iqr_ms": float(np.subtract(*np.percentile(wall, [75, 25]))),
        "session_p50_ms": statistics.median(session_ms) if session_ms else None,
        "operators_p50_ms": ops, "overhead_ms": p50 - ops, "executed_nodes": nodes,
        "classes_ms": {c: statistics.median(per_class[c]) for c in CLASSES if c in per_class},
        "top_kernels_ms": dict(sorted(per_op.items(), key=lambda kv: -kv[1])[:8]),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--label", default="lite0")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    d = args.export_dir
    import onnx

    size = onnx.load(str(d / "model.onnx"), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    models = {
        "ort-cpu/fp32": (profile_ort, d / "model.onnx"), "ort-cpu/int8": (profile_ort, d / "model.int8.onnx"),
        "openvino-cpu/fp32": (profile_openvino, d / "openvino" / "model.xml"),
        "openvino-cpu/int8": (profile_openvino, d / "openvino-int8" / "model.xml"),
    }  # fmt: skip
    results = {name: fn(path, x, args.runs, args.threads) for name, (fn, path) in models.items() if path.is_file()}
    rows = ["| variant | wall p50 ms | operators ms | overhead ms | " + " | ".join(CLASSES) + " |",
            "|---|---|---|---|" + "---|" * len(CLASSES)]  # fmt: skip
    for name, r in results.items():
        cells = []
        for c in CLASSES:
            ms = r["classes_ms"].get(c)
            cells.append(f"{ms:.2f} ({100 * ms / r['operators_p50_ms']:.0f}%)" if ms else "-")
        head = f"| {name} | {r['wall_p50_ms']:.2f} | {r['operators_p50_ms']:.2f} | {r['overhead_ms']:.2f} | "
        rows.append(head + " | ".join(cells) + " |")
    kernels = []
    for name, r in results.items():
        kernels.append(f"\n**{name}** ({r['executed_nodes']} executed nodes), slowest kernels (ms a call):\n")
        kernels += [f"- {k}: {v:.3f}" for k, v in r["top_kernels_ms"].items()]
    md = (f"# Where batch-1 time goes ({args.label}, {size} px, {args.threads} threads, {args.runs} profiled runs)\n\n"
          + "\n".join(rows) + "\n" + "\n".join(kernels))  # fmt: skip
    save(f"runtime_profile_{args.label}", {"export_dir": str(d), "input_size": size, "threads": args.threads, "runs": args.runs,
                                            "results": results}, md)  # fmt: skip


if __name__ == "__main__":
    main()
