"""PyTorch -> ExecuTorch (.pte) with the XNNPACK delegate: fp32, and int8 through PT2E quantization
with ExecuTorch's XNNPACKQuantizer (the route ExecuTorch's own XNNPACK docs give).

The program is exported for batch 1 (the phone/board case XNNPACK is built for). What XNNPACK does not
take stays in ExecuTorch's portable kernels; the export report names those operators.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgetl.backends.executorch import EXTRA_HINT
from edgetl.errors import EdgetlError

# Operators doing the multiply-adds (edge dialect names contain these).
COMPUTE_OPS = ("convolution", "linear", "addmm", "_mm")


def require_extra() -> None:
    if importlib.util.find_spec("executorch") is None:
        raise EdgetlError(f"ExecuTorch export needs the executorch extra (executorch not installed): {EXTRA_HINT}")


def _lower(exported: Any) -> tuple[bytes, dict[str, Any]]:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
        delegation = _delegation(edge)
        program = edge.to_executorch()
    except Exception as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        raise EdgetlError(f"ExecuTorch lowering failed: {type(exc).__name__}: {first}") from None
    return program.buffer, delegation


def _delegation(edge: Any) -> dict[str, Any]:
    """How much of the graph XNNPACK runs, and which operators it left to the portable kernels."""
    try:
        from executorch.devtools.backend_debug import get_delegation_info

        info = get_delegation_info(edge.exported_program().graph_module)
    except Exception:  # a report, not a gate: older ExecuTorch builds lack devtools
        return {}
    by_op = info.delegation_by_operator
    left = sorted({op for op, d in by_op.items() if d.non_delegated > 0})
    compute = [d for op, d in by_op.items() if any(k in op for k in COMPUTE_OPS)]
    return {"delegated_nodes": info.num_delegated_nodes, "non_delegated_nodes": info.num_non_delegated_nodes,
            "xnnpack_subgraphs": info.num_delegated_subgraphs, "not_delegated_ops": left,
            "compute_ops_delegated": sum(d.delegated for d in compute),
            "compute_ops_not_delegated": sum(d.non_delegated for d in compute)}  # fmt: skip


def _export(model: Any, example: Any) -> Any:
    import torch

    try:
        return torch.export.export(model, (example,))
    except Exception as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        raise EdgetlError(f"torch.export failed for ExecuTorch: {type(exc).__name__}: {first}") from None


def lower_fp32(model: Any, input_size: int) -> tuple[bytes, dict[str, Any]]:
    import torch

    require_extra()
    with torch.no_grad():
        return _lower(_export(model.eval(), torch.zeros(1, 3, input_size, input_size)))


def conv_relu6_quantizer(config: Any) -> Any:
    """A PT2E quantizer for the convolution -> ReLU6 pairs of EfficientNet-Lite and MobileNet, run before
    XNNPACKQuantizer (which leaves nodes already annotated alone).

    XNNPACKQuantizer fuses convolution with ReLU but not with ReLU6 (aten.hardtanh 0..6): it observes
    the convolution's output *before* the clamp, so the int8 range spans negative and large values
    the clamp then throws away, and the clamp runs as a separate quantized op between its own
    dequantize/quantize pair. Annotated like its conv+ReLU pattern instead (input and weights at the
    convolution, the output after the clamp), the range is the clamped one and ExecuTorch's
    FuseActivationPass folds the clamp into XNNPACK's convolution as its output min/max, as LiteRT's
    converter does with its fused ReLU6."""
    import torch
    from torchao.quantization.pt2e.quantizer import (
        QuantizationAnnotation,
        Quantizer,
        get_bias_qspec,
        get_input_act_qspec,
        get_output_act_qspec,
        get_weight_qspec,
    )

    key = "quantization_annotation"
    convs = (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)
    clamps = (torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default)

    class ConvReLU6(Quantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            for clamp in model.graph.nodes:
                if clamp.op != "call_function" or clamp.target not in clamps or tuple(clamp.args[1:3]) != (0.0, 6.0):
                    continue
                conv = clamp.args[0]
                if not isinstance(conv, torch.fx.Node) or conv.target not in convs or len(conv.users) != 1:
                    continue
                if key in conv.meta or key in clamp.meta:
                    continue
                inputs = {conv.args[0]: get_input_act_qspec(config), conv.args[1]: get_weight_qspec(config)}
                if len(conv.args) > 2 and isinstance(conv.args[2], torch.fx.Node):
                    inputs[conv.args[2]] = get_bias_qspec(config)
                conv.meta[key] = QuantizationAnnotation(input_qspec_map=inputs, _annotated=True)
                clamp.meta[key] = QuantizationAnnotation(output_qspec=get_output_act_qspec(config), _annotated=True)
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            pass

    return ConvReLU6()


def lower_int8(model: Any, input_size: int, calibration: Iterable[Any], fuse_relu6: bool = True) -> tuple[bytes, dict[str, Any]]:
    """Static int8: per-channel symmetric int8 weights, int8 activations with ranges observed on the
    calibration batches (float NCHW tensors of batch 1). `fuse_relu6=False` is XNNPACKQuantizer alone
    (kept for the side-by-side benchmark)."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import ComposableQuantizer

    require_extra()
    example = torch.zeros(1, 3, input_size, input_size)
    config = get_symmetric_quantization_config(is_per_channel=True)
    quantizers = [conv_relu6_quantizer(config)] if fuse_relu6 else []
    quantizer = ComposableQuantizer([*quantizers, XNNPACKQuantizer().set_global(config)])
    with torch.no_grad():
        prepared = prepare_pt2e(_export(model.eval(), example).module(), quantizer)
        for batch in calibration:
            prepared(batch)
        converted = convert_pt2e(prepared)
        blob, delegation = _lower(_export(converted, example))
    name = "XNNPACKQuantizer, get_symmetric_quantization_config(is_per_channel=True)"
    name = f"conv+ReLU6 annotation, then {name}" if fuse_relu6 else name
    return blob, {**delegation, "quantizer": name}


def write_program(target: Path, blob: bytes, meta: dict[str, str]) -> None:
    """The sidecar first, then the program, each atomically (see edgetl.backends.executorch)."""
    from edgetl.backends.executorch import sidecar
    from edgetl.fileio import atomic_path, write_json

    write_json(sidecar(target), meta)
    with atomic_path(target) as tmp:
        Path(tmp).write_bytes(blob)
