"""The metadata every exported model carries: a stable contract for apps.

Keys are flat strings (ONNX `metadata_props` and OpenVINO `rt_info` both hold string pairs); lists
and objects are JSON. `edgetl_metadata_version` changes only when a key's meaning changes, and a
test pins the key set. This module is torch-free so the runtime can read it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from edgetl.errors import EdgetlError
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
    layout: str | None = None,  # default: NHWC for uint8 input, NCHW for float; LiteRT files take float NHWC
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
        "layout": layout or ("NHWC" if embedded_preprocess else "NCHW"),
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


class MetadataError(EdgetlError, ValueError):
    """An exported model whose edgetl metadata is missing, malformed or disagrees with its graph."""


REQUIRED = ("labels", "input_size", "resize_shorter_side", "interpolation", "mean", "std")
MAX_INPUT_SIZE = 4096


def _json(meta: dict[str, str], key: str, where: str) -> Any:
    try:
        return json.loads(meta[key])
    except (ValueError, TypeError):
        raise MetadataError(f"{where}: metadata {key!r} is not valid JSON") from None


def _three_floats(value: Any, key: str, where: str) -> tuple[float, float, float]:
    if not isinstance(value, list) or len(value) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise MetadataError(f"{where}: metadata {key!r} must be a list of 3 numbers (one per RGB channel), got {value!r}")
    if not all(math.isfinite(v) for v in value):
        raise MetadataError(f"{where}: metadata {key!r} has a value that is not finite: {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def validate(meta: dict[str, str], where: str, input_name: str | None = None, input_shape: list[Any] | None = None,
             input_type: str | None = None, output_shape: list[Any] | None = None) -> PreprocessSpec:  # fmt: skip
    """Check the metadata once, against the graph when its input/output are given; return the spec.

    A model whose metadata cannot be trusted fails here with one clear message, never later as a
    per-image error, NaN probabilities or wrong labels."""
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise MetadataError(f"{where} has no edgetl metadata ({', '.join(missing)} missing): export it with `edgetl export`")
    labels = _json(meta, "labels", where)
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise MetadataError(f"{where}: metadata 'labels' must be a non-empty list of strings")
    mean = _three_floats(_json(meta, "mean", where), "mean", where)
    std = _three_floats(_json(meta, "std", where), "std", where)
    if min(std) <= 0:
        raise MetadataError(f"{where}: metadata 'std' must be positive, got {list(std)}")
    try:
        size, resize = int(meta["input_size"]), int(meta["resize_shorter_side"])
    except ValueError:
        raise MetadataError(f"{where}: metadata input_size/resize_shorter_side must be whole numbers") from None
    if not (1 <= size <= MAX_INPUT_SIZE and size <= resize <= 2 * MAX_INPUT_SIZE):
        raise MetadataError(f"{where}: metadata sizes out of range (input_size {size}, resize_shorter_side {resize})")
    try:
        spec = PreprocessSpec(size, resize, meta["interpolation"], mean, std, meta.get("channel_order", "RGB"))
    except ValueError as exc:
        raise MetadataError(f"{where}: {exc}") from None
    in_graph = meta.get("preprocessing_in_graph", "false")
    if in_graph not in ("true", "false"):
        raise MetadataError(f"{where}: metadata 'preprocessing_in_graph' must be true or false, got {in_graph!r}")
    if input_name is not None and meta.get("input_name", input_name) != input_name:
        raise MetadataError(f"{where}: metadata names input {meta['input_name']!r}, the graph's is {input_name!r}")
    if input_shape is not None:
        dims = input_shape[1:]
        # LiteRT models take float NHWC; ONNX and OpenVINO models float NCHW, or uint8 NHWC with preprocessing inside.
        layout = "NHWC" if in_graph == "true" else (meta.get("layout") or "NCHW")  # pixels in the graph are always NHWC
        if layout not in ("NCHW", "NHWC"):
            raise MetadataError(f"{where}: metadata 'layout' must be NCHW or NHWC, got {layout!r}")
        want = [size, size, 3] if layout == "NHWC" else [3, size, size]
        want_type = "uint8" if in_graph == "true" else "float"
        fixed = [d for d in dims if isinstance(d, int)]
        if len(input_shape) != 4 or (len(fixed) == 3 and dims != want) or (input_type and want_type not in input_type):
            raise MetadataError(
                f"{where}: the graph takes {input_type or ''} {input_shape}, but its metadata describes "
                f"{'uint8' if in_graph == 'true' else 'float'} {layout} [N, {', '.join(map(str, want))}]"
            )
    if output_shape is not None and len(output_shape) == 2 and isinstance(output_shape[1], int) and output_shape[1] != len(labels):
        raise MetadataError(f"{where}: {len(labels)} labels in the metadata, but the model has {output_shape[1]} outputs")
    return spec


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


def set_onnx_metadata(path: Path, meta: dict[str, str]) -> None:
    """Replace the edgetl metadata of an ONNX file in place, atomically (used by export and quantize)."""
    import onnx

    from edgetl import __version__
    from edgetl.fileio import atomic_path

    with atomic_path(path) as tmp:
        proto = onnx.load(str(path))
        del proto.metadata_props[:]
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        proto.producer_name = "edgetl"
        proto.producer_version = __version__
        onnx.save(proto, str(tmp))


def read_onnx_metadata(path: str) -> dict[str, str]:
    """Metadata of an ONNX file through onnxruntime (what an app has)."""
    from edgetl.backends.onnxruntime import read_metadata

    return read_metadata(path)
