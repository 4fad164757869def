"""Export a trained run to self-describing ONNX and OpenVINO models, each checked against PyTorch.

Exporter choice: the dynamo exporter (torch.export). For the TF-ported EfficientNet-Lite models,
timm's "same" padding is computed at run time from the input shape; the TorchScript exporter keeps
that arithmetic in the graph (629 nodes for Lite0: Shape/Gather/Cast/Pad chains around every strided
convolution), while torch.export sees static spatial sizes and folds it into Conv pads (94 nodes:
Conv, Clip, Add, one pooling and one Gemm). Fewer nodes means a faster graph and a clean target for
int8 quantization. Its output goes through onnxscript's optimizer (part of the exporter) and then
`onnx.checker` and shape inference.

This module never quantizes (see quantize.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl import __version__, checkpoint, metadata
from edgetl.errors import EdgetlError
from edgetl.fileio import atomic_path, write_json, write_text
from edgetl.parity import ParityData, compare, load_parity_data
from edgetl.progress import Reporter
from edgetl.runners import OpenVinoModel, OrtModel

FORMATS = ("onnx", "openvino", "all")
MIN_OPSET = 17
PARITY_MIN_AGREEMENT = 0.995
PARITY_MAX_ABS_DIFF = 1e-3


@dataclass(frozen=True)
class ExportOptions:
    format: str = "all"
    opset: int = 18
    batch: str = "dynamic"  # "dynamic" or a fixed batch size
    embed_preprocess: bool = False
    fp16: bool = False  # also write an fp16-compressed OpenVINO IR
    out: str | None = None  # folder; default: the run folder
    force: bool = False
    data: str | None = None  # images for the parity check; default: the run's validation split
    parity_samples: int = 300
    seed: int = 0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise EdgetlError(f"unknown format {self.format!r}: choose onnx, openvino or all")
        if self.batch != "dynamic" and not (self.batch.isdigit() and int(self.batch) > 0):
            raise EdgetlError(f"--batch must be 'dynamic' or a positive number, got {self.batch!r}")

    @property
    def fixed_batch(self) -> int | None:
        return None if self.batch == "dynamic" else int(self.batch)


def check_opset(opset: int) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise EdgetlError(f"opset {opset} is too old: edgetl exports opset {MIN_OPSET} to {newest}")
    if opset > newest:
        raise EdgetlError(f"opset {opset} is newer than this onnx package supports ({newest})")


def output_paths(out_dir: Path, opts: ExportOptions) -> dict[str, Path]:
    paths = {"onnx": out_dir / "model.onnx", "labels": out_dir / "labels.txt"}
    if opts.embed_preprocess:
        paths["onnx_uint8"] = out_dir / "model.uint8.onnx"
    if opts.format in ("openvino", "all"):
        paths["openvino"] = out_dir / "openvino" / "model.xml"
        if opts.fp16:
            paths["openvino_fp16"] = out_dir / "openvino-fp16" / "model.xml"
    return paths


class _PixelsToLogits:
    """Factory for the --embed-preprocess wrapper (a torch module, built lazily to keep imports light)."""

    @staticmethod
    def build(model: Any, spec: Any) -> Any:
        import torch
        from torch import nn

        class PixelsToLogits(nn.Module):
            """uint8 NHWC RGB at the crop size -> logits: scaling, mean/std and layout inside the graph."""

            def __init__(self) -> None:
                super().__init__()
                self.model = model
                scale = torch.tensor(spec.std, dtype=torch.float32) * 255.0
                self.register_buffer("mul", (1.0 / scale).view(1, 3, 1, 1))
                self.register_buffer("sub", (torch.tensor(spec.mean, dtype=torch.float32) / torch.tensor(spec.std)).view(1, 3, 1, 1))

            def forward(self, pixels: torch.Tensor) -> torch.Tensor:
                # (x/255 - mean)/std == x * 1/(255 std) - mean/std: one Mul and one Sub after the cast.
                x = pixels.permute(0, 3, 1, 2).to(torch.float32)
                return self.model(x * self.mul - self.sub)

        return PixelsToLogits().eval()


def _export_onnx(module: Any, example: Any, target: Path, opset: int, fixed_batch: int | None, input_name: str = "input") -> None:
    import onnx
    import torch

    dynamic_shapes = None if fixed_batch else ({0: torch.export.Dim("batch", min=1, max=4096)},)
    # The exporter prints its progress on stdout; keep it for errors only.
    with atomic_path(target) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, (example,), dynamo=True, opset_version=opset, input_names=[input_name], output_names=["logits"],
                dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
            )  # fmt: skip
        except Exception as exc:
            first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise EdgetlError(f"the ONNX exporter failed at opset {opset}: {type(exc).__name__}: {first_line}") from None
        program.save(str(tmp))
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto, full_check=True)
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
        onnx.save(proto, str(tmp))


def set_onnx_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    with atomic_path(path) as tmp:
        proto = onnx.load(str(path))
        del proto.metadata_props[:]
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        proto.producer_name = "edgetl"
        proto.producer_version = __version__
        onnx.save(proto, str(tmp))


def _save_openvino(onnx_path: Path, target_xml: Path, meta: dict[str, str], compress_to_fp16: bool) -> None:
    """Convert with openvino.convert_model and save the IR with the metadata."""
    import openvino as ov

    save_openvino_model(ov.convert_model(str(onnx_path)), target_xml, meta, compress_to_fp16)


def save_openvino_model(model: Any, target_xml: Path, meta: dict[str, str], compress_to_fp16: bool = False) -> None:
    """Save an OpenVINO model with `meta` in its rt_info, atomically: the IR pair (.xml + .bin) is
    written to a temporary folder beside the target folder, which then replaces it."""
    import openvino as ov

    for k, v in meta.items():
        model.set_rt_info(v, [metadata.RT_INFO_SECTION, k])
    final_dir = target_xml.parent
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", dir=final_dir.parent))
    try:
        ov.save_model(model, str(tmp_dir / target_xml.name), compress_to_fp16=compress_to_fp16)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def read_openvino_metadata(xml: str | os.PathLike[str]) -> dict[str, str]:
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    out = {}
    for key in (*metadata.KEYS, *metadata.QUANTIZATION_KEYS):
        path = [metadata.RT_INFO_SECTION, key]
        if model.has_rt_info(path):
            out[key] = model.get_rt_info(path).astype(str)
    return out


def _mark_failed(path: Path) -> Path:
    """Move a model that failed its parity check aside, so nothing picks it up as good."""
    if path.suffix == ".xml":
        failed = path.parent.with_name(path.parent.name + ".failed")
        if failed.exists():
            shutil.rmtree(failed)
        os.replace(path.parent, failed)
        return failed
    failed = path.with_name(path.stem + ".failed" + path.suffix)
    os.replace(path, failed)
    return failed


def export_run(run: str | os.PathLike[str], opts: ExportOptions, reporter: Reporter | None = None) -> dict[str, Any]:
    """Export the best checkpoint of `run`; check every file against PyTorch; write export.json."""
    import torch

    from edgetl.malloc_tuning import tune_malloc

    tune_malloc()
    reporter = reporter or Reporter()
    check_opset(opts.opset)
    ckpt = checkpoint.read(run)
    run_dir = Path(ckpt["path"]).parent
    out_dir = Path(opts.out) if opts.out else run_dir
    paths = output_paths(out_dir, opts)
    existing = [p for k, p in paths.items() if k != "labels" and p.exists() and (k != "onnx" or opts.format != "openvino")]
    if existing and not opts.force:
        raise EdgetlError(f"{existing[0]} exists: pass --force to overwrite it")
    model = checkpoint.build_model(ckpt)
    spec = checkpoint.spec_of(ckpt)
    labels = list(ckpt["config"]["labels"])
    ckpt_hash = checkpoint.file_hash(ckpt["path"])
    val_metrics = _validation_metrics(run_dir)
    common = dict(spec=spec, labels=labels, backbone=ckpt["config"]["backbone"], checkpoint_sha256=ckpt_hash,
                  validation_metrics=val_metrics, edgetl_version=__version__)  # fmt: skip
    report: dict[str, Any] = {"run": str(run_dir), "checkpoint_sha256": ckpt_hash, "opset": opts.opset, "batch": opts.batch,
                              "exporter": "torch.onnx.export(dynamo=True)", "files": {}, "parity": {}}  # fmt: skip

    # The parity images come first: a run whose data has moved fails before any file is written.
    parity = load_parity_data(ckpt, opts.data, opts.parity_samples, opts.seed, reporter)
    out_dir.mkdir(parents=True, exist_ok=True)
    c = spec.input_size
    example = torch.zeros(opts.fixed_batch or 2, 3, c, c)

    t0 = time.perf_counter()
    onnx_path = paths["onnx"]
    # An OpenVINO-only export still converts from ONNX (one graph for both), into a temporary file.
    tmp_onnx = None
    if opts.format == "openvino":
        tmp_onnx = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir)) / "model.onnx"
        onnx_path = tmp_onnx
    reporter.log(f"exporting {ckpt['config']['backbone']} to ONNX (opset {opts.opset}, batch {opts.batch})")
    _export_onnx(model, example, onnx_path, opts.opset, opts.fixed_batch)
    set_onnx_metadata(onnx_path, metadata.build(**common, embedded_preprocess=False))
    report["files"]["onnx"] = _file_record(onnx_path, time.perf_counter() - t0) if tmp_onnx is None else None
    if opts.embed_preprocess:
        t1 = time.perf_counter()
        wrapper = _PixelsToLogits.build(model, spec)
        _export_onnx(wrapper, torch.zeros(opts.fixed_batch or 2, c, c, 3, dtype=torch.uint8), paths["onnx_uint8"], opts.opset,
                     opts.fixed_batch, input_name="pixels")  # fmt: skip
        set_onnx_metadata(paths["onnx_uint8"], metadata.build(**common, embedded_preprocess=True, input_name="pixels"))
        report["files"]["onnx_uint8"] = _file_record(paths["onnx_uint8"], time.perf_counter() - t1)
    if "openvino" in paths:
        for key, fp16 in (("openvino", False), ("openvino_fp16", True)):
            if key in paths:
                t1 = time.perf_counter()
                _save_openvino(onnx_path, paths[key], metadata.build(**common, embedded_preprocess=False), compress_to_fp16=fp16)
                report["files"][key] = _file_record(paths[key], time.perf_counter() - t1, paths[key].with_suffix(".bin"))
    if tmp_onnx is not None:
        shutil.rmtree(tmp_onnx.parent, ignore_errors=True)
    else:
        write_text(paths["labels"], "\n".join(labels) + "\n")
    report["files"] = {k: v for k, v in report["files"].items() if v is not None}

    # Parity gate: every file against the PyTorch model on real images.
    with torch.no_grad():
        ref = np.concatenate([model(torch.from_numpy(b)).numpy() for b in np.array_split(parity.floats, max(1, len(parity.floats) // 32))])
    report["parity"]["pytorch"] = {"top1": float((ref.argmax(1) == parity.labels).mean()), "n": len(parity.labels), "precision": "fp32"}
    failures = []
    for key, path in paths.items():
        if key == "labels" or key not in report["files"]:
            continue
        runner = OrtModel(path) if path.suffix == ".onnx" else OpenVinoModel(path, precision="f32")
        inputs = parity.pixels if key == "onnx_uint8" else parity.floats
        logits = runner.predict(inputs)
        result = compare(ref, logits, parity.labels)
        result["precision"] = "fp16 weights" if key == "openvino_fp16" else runner.precision
        gated = key != "openvino_fp16"  # fp16 weights legitimately move logits by more than 1e-3
        result["gate"] = "pass" if (not gated or _passes(result)) else "fail"
        if not gated:
            result["gate"] = "report only (fp16)"
        report["parity"][key] = result
        if result["gate"] == "fail":
            failures.append((key, path, result))
    report["parity_images"] = parity.describe()
    report["thresholds"] = {"min_top1_agreement": PARITY_MIN_AGREEMENT, "max_abs_logit_diff": PARITY_MAX_ABS_DIFF}
    report["ok"] = not failures
    report["host"] = __import__("edgetl.hostinfo", fromlist=["host_record"]).host_record()
    for key, path, _ in failures:
        report["files"][key]["moved_to"] = str(_mark_failed(path))
    write_json(run_dir / "export.json", report)
    if failures:
        key, path, result = failures[0]
        raise EdgetlError(
            f"parity check failed for {key}: top-1 agreement {result['top1_agreement']:.2%}, max |logit diff| "
            f"{result['max_abs_diff']:.2e} (limits {PARITY_MIN_AGREEMENT:.1%}, {PARITY_MAX_ABS_DIFF:.0e}); "
            f"the file was moved to {report['files'][key]['moved_to']}; see {run_dir / 'export.json'}",
            exit_code=1,
        )
    return report


def _passes(result: dict[str, Any]) -> bool:
    return result["top1_agreement"] >= PARITY_MIN_AGREEMENT and result["max_abs_diff"] <= PARITY_MAX_ABS_DIFF


def _file_record(path: Path, seconds: float, *extra: Path) -> dict[str, Any]:
    size = path.stat().st_size + sum(p.stat().st_size for p in extra)
    return {"path": str(path), "bytes": size, "export_seconds": round(seconds, 2)}


def _validation_metrics(run_dir: Path) -> dict[str, Any]:
    try:
        best = json.loads((run_dir / "metrics.json").read_text())["best"]
    except (OSError, KeyError, ValueError):
        return {}
    return {k: best[k] for k in ("top1", "top5", "macro_f1", "n") if k in best}


__all__ = ["ExportOptions", "ParityData", "export_run", "read_openvino_metadata", "set_onnx_metadata"]
