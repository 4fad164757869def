"""The metadata every exported model carries: a stable contract for apps.

Keys are flat strings (ONNX `metadata_props` and OpenVINO `rt_info` both hold string pairs); lists
and objects are JSON. `edgetl_metadata_version` changes only when a key's meaning changes, and a
test pins the key set. This module is torch-free so the runtime can read it.
"""

from __future__ import annotations

import json
from typing import Any

from edgetl.preprocess import PreprocessSpec

METADATA_VERSION = "1"
RT_INFO_SECTION = "edgetl"

# Every key an exported fp32 model has; int8 models add the QUANTIZATION_KEYS.
KEYS = (
    "edgetl_metadata_version",
    "edgetl_version",
    "labels",  # JSON list of class names, in output index order
    "input_name",
    "output_name",
    "input_size",  # crop size C: the model takes C x C pixels
    "resize_shorter_side",  # S: resize the shorter side to S, then centre-crop C x C
    "interpolation",  # Pillow/torchvision name: bicubic, bilinear, ...
    "layout",  # NCHW (float input) or NHWC (uint8 input with preprocessing in the graph)
    "dtype",  # float32 or uint8
    "channel_order",  # RGB
    "pixel_scale",  # pixels are divided by this before mean/std (255)
    "mean",  # JSON list, per channel, applied after scaling
    "std",  # JSON list
    "preprocessing_in_graph",  # "true": feed uint8 pixels after resize + crop; "false": feed normalised floats
    "backbone",
    "checkpoint_sha256",
    "validation_metrics",  # JSON: top1, top5, macro_f1, n of the checkpoint on its validation split
)
QUANTIZATION_KEYS = ("quantization",)  # JSON record: backend, parent hash, calibration set, method, kept nodes


def build(
    *,
    spec: PreprocessSpec,
    labels: list[str],
    backbone: str,
    checkpoint_sha256: str,
    validation_metrics: dict[str, Any],
    edgetl_version: str,
    embedded_preprocess: bool,
    input_name: str = "input",
    output_name: str = "logits",
) -> dict[str, str]:
    meta = {
        "edgetl_metadata_version": METADATA_VERSION,
        "edgetl_version": edgetl_version,
        "labels": json.dumps(labels),
        "input_name": input_name,
        "output_name": output_name,
        "input_size": str(spec.input_size),
        "resize_shorter_side": str(spec.resize_size),
        "interpolation": spec.interpolation,
        "layout": "NHWC" if embedded_preprocess else "NCHW",
        "dtype": "uint8" if embedded_preprocess else "float32",
        "channel_order": spec.channel_order,
        "pixel_scale": "255",
        "mean": json.dumps(list(spec.mean)),
        "std": json.dumps(list(spec.std)),
        "preprocessing_in_graph": "true" if embedded_preprocess else "false",
        "backbone": backbone,
        "checkpoint_sha256": checkpoint_sha256,
        "validation_metrics": json.dumps(validation_metrics),
    }
    assert tuple(meta) == KEYS
    return meta


def spec_from(meta: dict[str, str]) -> PreprocessSpec:
    return PreprocessSpec(
        input_size=int(meta["input_size"]),
        resize_size=int(meta["resize_shorter_side"]),
        interpolation=meta["interpolation"],
        mean=tuple(json.loads(meta["mean"])),
        std=tuple(json.loads(meta["std"])),
        channel_order=meta.get("channel_order", "RGB"),
    )


def labels_from(meta: dict[str, str]) -> list[str]:
    return list(json.loads(meta["labels"]))


def read_onnx_metadata(path: str) -> dict[str, str]:
    """Metadata of an ONNX file through onnxruntime (what an app has), without loading weights twice."""
    import onnxruntime as ort

    from edgetl.errors import EdgetlError

    try:
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types for unloadable files
        detail = str(exc).splitlines()[0][-160:] if str(exc) else type(exc).__name__
        raise EdgetlError(f"{path} cannot be loaded by onnxruntime: {detail}") from None
    return dict(sess.get_modelmeta().custom_metadata_map)
