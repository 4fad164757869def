"""What a runtime really executes after its own graph optimisation: proof that an int8 model runs its
convolutions in int8, or a list of the ones that fell back to float (unfused Quantize/DequantizeLinear).

A QDQ file says what *may* run in int8; ONNX Runtime and OpenVINO decide at load time. So both are asked:
ONNX Runtime writes its optimised graph (`SessionOptions.optimized_model_filepath`), OpenVINO describes its
compiled model (`CompiledModel.get_runtime_model()`, with each layer's runtime precision and kernel).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

# Operators that do the multiply-accumulate work, by the precision they compute in.
ORT_INT8_COMPUTE = {"QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat"}
ORT_FLOAT_COMPUTE = {"Conv", "FusedConv", "NhwcFusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}
OV_COMPUTE = {"Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution"}
OV_INT8 = {"i8", "u8"}


def ort_executed_ops(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Operator counts of the graph ONNX Runtime's CPU provider runs for `path`."""
    import onnx

    from edgetl.backends.onnxruntime import load_session, session_options

    with tempfile.TemporaryDirectory(prefix="edgetl-ortopt-") as tmp:
        opts = session_options(threads=1, optimized_model=str(Path(tmp) / "optimized.onnx"))
        opts.log_severity_level = 3  # the "hardware specific optimisations" note is expected: the file is only read here
        load_session(path, opts)
        ops = Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    int8 = sum(n for op, n in ops.items() if op in ORT_INT8_COMPUTE)
    flt = sum(n for op, n in ops.items() if op in ORT_FLOAT_COMPUTE)
    return {
        "compute_ops": int8 + flt, "int8_compute_ops": int8, "float_compute_ops": flt,
        "quantize_dequantize_ops": ops.get("QuantizeLinear", 0) + ops.get("DequantizeLinear", 0),
        "ops": dict(ops.most_common()),
    }  # fmt: skip


def openvino_executed_layers(path: str | os.PathLike[str], precision: str = "f32") -> dict[str, Any]:
    """Compute layers of the model OpenVINO compiles for the CPU, with runtime precision and kernel."""
    from edgetl.backends.openvino import compile_model

    compiled = compile_model(path, precision, threads=1, latency_hint=False)
    kernels: Counter[str] = Counter()
    int8 = total = fake_quantize = 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer, runtime_precision = info["layerType"].astype(str), info["runtimePrecision"].astype(str).lower()
        if layer == "FakeQuantize":
            fake_quantize += 1
        if layer in OV_COMPUTE:
            total += 1
            int8 += runtime_precision in OV_INT8
            kernels[f"{layer}:{info['primitiveType'].astype(str)}"] += 1
    return {
        "compute_ops": total, "int8_compute_ops": int8, "float_compute_ops": total - int8,
        "fake_quantize_ops": fake_quantize, "kernels": dict(kernels.most_common()),
    }  # fmt: skip


LITERT_COMPUTE = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV"}


def litert_executed_ops(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Operator counts of a .tflite file with the type each compute op takes in. LiteRT runs the file's
    operators as written (XNNPACK takes them over one for one), so the file is what executes."""
    from edgetl.backends.litert import read_tflite
    from edgetl.backends.litert import schema as litert_schema

    schema = litert_schema()
    model = schema.Model.GetRootAs(read_tflite(path), 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    graph = model.Subgraphs(0)
    ops: Counter[str] = Counter()
    int8 = flt = 0
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        name = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
        ops[name] += 1
        if name in LITERT_COMPUTE:
            in_type = graph.Tensors(op.Inputs(0)).Type()
            int8 += in_type in (schema.TensorType.INT8, schema.TensorType.UINT8)
            flt += in_type in (schema.TensorType.FLOAT32, schema.TensorType.FLOAT16)
    return {
        "compute_ops": int8 + flt, "int8_compute_ops": int8, "float_compute_ops": flt,
        "quantize_dequantize_ops": ops.get("QUANTIZE", 0) + ops.get("DEQUANTIZE", 0),
        "ops": dict(ops.most_common()),
    }  # fmt: skip


def describe(executed: dict[str, Any]) -> str:
    return f"{executed['int8_compute_ops']}/{executed['compute_ops']} compute ops in int8"
