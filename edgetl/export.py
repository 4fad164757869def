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
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl import __version__, checkpoint, metadata
from edgetl import run as runfolder
from edgetl.backends.onnxruntime import OrtModel
from edgetl.backends.openvino import OpenVinoModel, save_model
from edgetl.errors import EdgetlError
from edgetl.fileio import atomic_path, make_temp_dir, write_json, write_text
from edgetl.formats import parse_formats
from edgetl.metadata import set_onnx_metadata
from edgetl.parity import ParityData, compare, run_split_data, scoring_data
from edgetl.progress import Reporter

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
    allow_data_change: bool = False  # parity on the recorded validation list although the data folder changed

    def __post_init__(self) -> None:
        formats = parse_formats(self.format)
        if self.embed_preprocess and "onnx" not in formats:
            # The uint8-input graph is an ONNX file (model.uint8.onnx); the other formats take float input.
            raise EdgetlError(f"--embed-preprocess writes the uint8-input ONNX model (model.uint8.onnx), and --format "
                              f"{self.format} has no onnx: add it (e.g. --format onnx,{self.format})")
        if self.batch != "dynamic" and not (self.batch.isdigit() and int(self.batch) > 0):
            raise EdgetlError(f"--batch must be 'dynamic' or a positive number, got {self.batch!r}")
        if self.parity_samples < 1:  # 0 read as "no readable images", a negative one as "all but the last N"
            raise EdgetlError(f"--parity-samples must be at least 1, got {self.parity_samples}")

    @property
    def fixed_batch(self) -> int | None:
        return None if self.batch == "dynamic" else int(self.batch)

    @property
    def formats(self) -> tuple[str, ...]:
        return parse_formats(self.format)


def check_opset(opset: int) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise EdgetlError(f"opset {opset} is too old: edgetl exports opset {MIN_OPSET} to {newest}")
    if opset > newest:
        raise EdgetlError(f"opset {opset} is newer than this onnx package supports ({newest})")


def output_paths(out_dir: Path, opts: ExportOptions, reuse_onnx: bool = False) -> dict[str, Path]:
    """The files an export writes. model.onnx comes with onnx and with litert (the graph LiteRT is
    converted from, and what `quantize --format litert` converts again) unless a current one is
    reused; an OpenVINO-only export converts from a temporary ONNX file; ExecuTorch lowers the
    PyTorch model itself."""
    formats = opts.formats
    keys = []
    if "onnx" in formats or ("litert" in formats and not reuse_onnx):
        keys += ["onnx", *(["onnx_uint8"] if opts.embed_preprocess else [])]
    if "openvino" in formats:
        keys += ["openvino", *(["openvino_fp16"] if opts.fp16 else [])]
    keys += [k for k in ("litert", "executorch") if k in formats]
    return {**{k: out_dir / runfolder.MODEL_FILES[k] for k in keys}, "labels": out_dir / "labels.txt"}


def _with_pixel_input(fp32_onnx: Path, target: Path, spec: Any) -> None:
    """model.uint8.onnx: the exported fp32 graph behind four nodes that take uint8 NHWC RGB pixels at the
    crop size: Transpose to NCHW, Cast, then (x/255 - mean)/std as x * 1/(255 std) - mean/std.

    Built on the fp32 graph instead of tracing the model a second time: the exporter takes 10-15 s for
    Lite0 on 2 cores, this takes milliseconds, and both files share every node after the preprocessing
    (the traced wrapper also carried Shape/Squeeze leftovers of the symbolic batch)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(fp32_onnx))
    graph = proto.graph
    (old,) = graph.input
    batch, _, height, width = old.type.tensor_type.shape.dim
    shape = [batch.dim_param or batch.dim_value, height.dim_value, width.dim_value, 3]
    pixels = helper.make_tensor_value_info("pixels", TensorProto.UINT8, shape)
    scale = numpy_helper.from_array((1.0 / (np.array(spec.std, np.float32) * 255.0)).reshape(1, 3, 1, 1), "edgetl_pixel_scale")
    shift = numpy_helper.from_array((np.array(spec.mean, np.float32) / np.array(spec.std, np.float32)).reshape(1, 3, 1, 1),
                                    "edgetl_pixel_shift")  # fmt: skip
    prefix = [
        helper.make_node("Transpose", ["pixels"], ["edgetl_pixels_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["edgetl_pixels_nchw"], ["edgetl_pixels_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["edgetl_pixels_float", scale.name], ["edgetl_pixels_scaled"]),
        helper.make_node("Sub", ["edgetl_pixels_scaled", shift.name], [old.name]),  # the old input, now computed
    ]
    nodes = [*prefix, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend([scale, shift])
    del graph.input[:]
    graph.input.append(pixels)
    with atomic_path(target) as tmp:
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(onnx.shape_inference.infer_shapes(proto, strict_mode=True), str(tmp))


def _export_onnx(module: Any, example: Any, target: Path, opset: int, fixed_batch: int | None) -> None:
    import onnx
    import torch

    dynamic_shapes = None if fixed_batch else ({0: torch.export.Dim("batch", min=1, max=4096)},)
    # The exporter prints its progress on stdout; keep it for errors only.
    with atomic_path(target) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, (example,), dynamo=True, opset_version=opset, input_names=["input"], output_names=["logits"],
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


def _save_openvino(onnx_path: Path, target_xml: Path, meta: dict[str, str], compress_to_fp16: bool) -> None:
    """Convert with openvino.convert_model and save the IR with the metadata."""
    import openvino as ov

    save_model(ov.convert_model(str(onnx_path)), target_xml, meta, compress_to_fp16)


def _mark_failed(path: Path) -> Path:
    """Move a model that failed its parity check aside, so nothing picks it up as good."""
    if path.suffix == ".pte":  # its metadata sidecar goes with it
        from edgetl.backends.executorch import sidecar

        if sidecar(path).exists():
            os.replace(sidecar(path), sidecar(path.with_name(path.stem + ".failed" + path.suffix)))
    if path.suffix == ".xml":
        failed = path.parent.with_name(path.parent.name + ".failed")
        if failed.exists():
            shutil.rmtree(failed)
        os.replace(path.parent, failed)
        return failed
    failed = path.with_name(path.stem + ".failed" + path.suffix)
    os.replace(path, failed)
    return failed


def remove_derived(out_dir: Path, run: runfolder.RunFolder, reexported: set[str], reporter: Reporter) -> list[str]:
    """Before a forced export: every model in `out_dir` made from another checkpoint goes, and so do
    the int8 models of the formats being exported again (their parent is about to change), with the
    reports that describe them. What is left all belongs to the new checkpoint."""
    removed = []
    current = run.checkpoint_sha256
    for m in runfolder.exported_models(out_dir):
        parent_replaced = any(runfolder.INT8_CHILDREN.get(k) == m.key for k in reexported)
        if m.checkpoint_sha256 != current or parent_replaced or m.key in reexported:
            target = m.path.parent if m.kind == "openvino" else m.path
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
                if m.kind == "executorch":
                    from edgetl.backends.executorch import sidecar

                    sidecar(target).unlink(missing_ok=True)
            if m.key not in reexported:
                removed.append(str(target))
    if removed:
        for name in (runfolder.QUANTIZE_REPORT, "bench.json", "bench.csv", "bench.md", "bench.png"):
            (out_dir / name).unlink(missing_ok=True)
        reporter.log(f"--force: removed {len(removed)} model(s) of the old checkpoint or parent: {', '.join(removed)}")
    return removed


def export_run(run: str | os.PathLike[str], opts: ExportOptions, reporter: Reporter | None = None) -> dict[str, Any]:
    """Export the best checkpoint of `run`; check every file against PyTorch; write export.json
    (into the output folder, naming the run, so `quantize` and `bench` can work on that folder)."""
    folder = runfolder.RunFolder.open(run)
    out_dir = Path(opts.out) if opts.out else folder.path
    if out_dir.exists() and not out_dir.is_dir():
        raise EdgetlError(f"--out {out_dir} is a file, not a folder")
    with runfolder.locked(out_dir, "export"):
        return _export_locked(folder, out_dir, opts, reporter or Reporter())


def _export_locked(folder: runfolder.RunFolder, out_dir: Path, opts: ExportOptions, reporter: Reporter) -> dict[str, Any]:
    import torch

    from edgetl.malloc_tuning import tune_malloc

    tune_malloc()
    check_opset(opts.opset)
    ckpt = folder.checkpoint()
    run_dir = folder.path
    _require_extras(opts.formats)
    # LiteRT alone converts the run's current model.onnx when there is one (exported from this
    # checkpoint): asking for LiteRT after a default export needs no --force and keeps the ONNX int8.
    current_onnx = out_dir / runfolder.MODEL_FILES["onnx"]
    reuse_onnx = ("litert" in opts.formats and "onnx" not in opts.formats and current_onnx.is_file()
                  and runfolder.model_checkpoint_hash(current_onnx) == folder.checkpoint_sha256)  # fmt: skip
    paths = output_paths(out_dir, opts, reuse_onnx)
    written = {k for k in paths if k != "labels"}
    existing = [paths[k] for k in written if paths[k].exists()]
    if existing and not opts.force:
        raise EdgetlError(f"{existing[0]} exists: pass --force to overwrite it (models of the old checkpoint are removed)")
    model = checkpoint.build_model(ckpt)
    spec = checkpoint.spec_of(ckpt)
    labels = list(ckpt["config"]["labels"])
    ckpt_hash = folder.checkpoint_sha256
    val_metrics = _validation_metrics(run_dir)
    common = dict(spec=spec, labels=labels, backbone=ckpt["config"]["backbone"], checkpoint_sha256=ckpt_hash,
                  validation_metrics=val_metrics, edgetl_version=__version__)  # fmt: skip
    report: dict[str, Any] = {"run": str(run_dir.resolve()), "checkpoint_sha256": ckpt_hash, "opset": opts.opset, "batch": opts.batch,
                              "exporter": "torch.onnx.export(dynamo=True)", "files": {}, "parity": {}}  # fmt: skip

    # The parity images come first: a run whose data has moved or changed fails before any file is written.
    if opts.data is None:
        parity = run_split_data(folder, "val", labels, spec, reporter, opts.parity_samples, opts.seed, opts.allow_data_change)
    else:
        parity = scoring_data(opts.data, labels, spec, reporter, opts.parity_samples, opts.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    if opts.force:
        report["removed"] = remove_derived(out_dir, folder, written, reporter)
    c = spec.input_size
    example = torch.zeros(opts.fixed_batch or 2, 3, c, c)

    litert: _LiteRtExport | None = None
    tmp_onnx: Path | None = None
    try:
        t0 = time.perf_counter()
        # An OpenVINO-only export still converts from ONNX (one graph for both), into a temporary file.
        onnx_path = paths.get("onnx")
        if reuse_onnx:
            onnx_path = current_onnx
            report["reused"] = {"onnx": str(current_onnx)}
            reporter.log(f"converting the current {current_onnx} (exported from this checkpoint)")
        elif onnx_path is None and "openvino" in paths:
            tmp_onnx = make_temp_dir(out_dir, "export") / "model.onnx"
            onnx_path = tmp_onnx
        if onnx_path is not None and not reuse_onnx:
            reporter.log(f"exporting {ckpt['config']['backbone']} to ONNX (opset {opts.opset}, batch {opts.batch})")
            _export_onnx(model, example, onnx_path, opts.opset, opts.fixed_batch)
            set_onnx_metadata(onnx_path, metadata.build(**common, embedded_preprocess=False))
            report["files"]["onnx"] = _file_record(onnx_path, time.perf_counter() - t0) if tmp_onnx is None else None
        if "litert" in paths:
            # TensorFlow converts in its own process while this one exports the other formats.
            assert onnx_path is not None
            reporter.log("converting model.onnx to LiteRT (onnx2tf + TensorFlow, in a child process, beside the other formats)")
            litert = _LiteRtExport(onnx_path, paths["litert"])
        if opts.embed_preprocess:
            t1 = time.perf_counter()
            _with_pixel_input(onnx_path, paths["onnx_uint8"], spec)
            set_onnx_metadata(paths["onnx_uint8"], metadata.build(**common, embedded_preprocess=True, input_name="pixels"))
            report["files"]["onnx_uint8"] = _file_record(paths["onnx_uint8"], time.perf_counter() - t1)
        if "openvino" in paths:
            for key, fp16 in (("openvino", False), ("openvino_fp16", True)):
                if key in paths:
                    t1 = time.perf_counter()
                    _save_openvino(onnx_path, paths[key], metadata.build(**common, embedded_preprocess=False), compress_to_fp16=fp16)
                    report["files"][key] = _file_record(paths[key], time.perf_counter() - t1, paths[key].with_suffix(".bin"))
        if "executorch" in paths:
            from edgetl import executorch_export

            t1 = time.perf_counter()
            reporter.log("lowering the PyTorch model to ExecuTorch (XNNPACK delegate, batch 1)")
            blob, delegation = executorch_export.lower_fp32(model, c)
            executorch_export.write_program(paths["executorch"], blob, metadata.build(**common, embedded_preprocess=False))
            report["files"]["executorch"] = {**_file_record(paths["executorch"], time.perf_counter() - t1), "delegation": delegation}
        if litert is not None:
            report["files"]["litert"] = litert.finish(metadata.build(**common, embedded_preprocess=False, layout="NHWC"))
    finally:
        if litert is not None:
            litert.close()
        if tmp_onnx is not None:  # removed on a failure or Ctrl-C too, not left for the next command's clean-up
            shutil.rmtree(tmp_onnx.parent, ignore_errors=True)
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
        runner = parity_runner(path)
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
    write_json(out_dir / runfolder.EXPORT_REPORT, report)
    if failures:
        key, path, result = failures[0]
        raise EdgetlError(
            f"parity check failed for {key}: top-1 agreement {result['top1_agreement']:.2%}, max |logit diff| "
            f"{result['max_abs_diff']:.2e} (limits {PARITY_MIN_AGREEMENT:.1%}, {PARITY_MAX_ABS_DIFF:.0e}); "
            f"the file was moved to {report['files'][key]['moved_to']}; see {out_dir / runfolder.EXPORT_REPORT}",
            exit_code=1,
        )
    return report


def _require_extras(formats: tuple[str, ...]) -> None:
    """Before anything is written: the extras the asked formats need are installed (exit 2 otherwise)."""
    if "litert" in formats:
        from edgetl.litert_convert import require_extra

        require_extra()
    if "executorch" in formats:
        from edgetl.executorch_export import require_extra as require_executorch

        require_executorch()


class _LiteRtExport:
    """model.onnx -> model.tflite, converting in a child process from the moment it is made until
    `finish` (the caller exports the other formats meanwhile); `close` stops it and removes its work
    folder whatever happened."""

    def __init__(self, onnx_path: Path, target: Path) -> None:
        from edgetl.litert_convert import start_conversion

        self.target, self.started = target, time.perf_counter()
        self.conversion = start_conversion(onnx_path, target.parent)

    def finish(self, meta: dict[str, str]) -> dict[str, Any]:
        from edgetl.backends.litert import with_metadata
        from edgetl.fileio import write_bytes

        try:
            # The ONNX model's metadata: its tensors' names become the .tflite's too (with_metadata).
            write_bytes(self.target, with_metadata(self.conversion.wait()["fp32"].read_bytes(), meta))
        finally:
            self.close()
        # Wall time from start to file: it overlaps the other formats' export.
        return {**_file_record(self.target, time.perf_counter() - self.started), "converter": "onnx2tf + TFLiteConverter",
                "converted_beside_other_formats": True}  # fmt: skip

    def close(self) -> None:
        self.conversion.close()


def parity_runner(path: Path, threads: int | None = None) -> Any:
    """The runtime each format is checked in: the format's own, on this machine."""
    if path.suffix == ".onnx":
        return OrtModel(path, threads=threads)
    if path.suffix == ".xml":
        return OpenVinoModel(path, precision="f32", threads=threads)
    if path.suffix == ".tflite":
        from edgetl.backends.litert import LiteRtModel

        return LiteRtModel(path, threads=threads)
    from edgetl.backends.executorch import ExecuTorchModel

    return ExecuTorchModel(path, threads=threads)


def _passes(result: dict[str, Any]) -> bool:
    return result["top1_agreement"] >= PARITY_MIN_AGREEMENT and result["max_abs_diff"] <= PARITY_MAX_ABS_DIFF


def _file_record(path: Path, seconds: float, *extra: Path) -> dict[str, Any]:
    size = path.stat().st_size + sum(p.stat().st_size for p in extra)
    return {"path": str(path), "bytes": size, "export_seconds": round(seconds, 2)}


def _validation_metrics(run_dir: Path) -> dict[str, Any]:
    try:
        best = json.loads((run_dir / runfolder.METRICS).read_text())["best"]
    except (OSError, KeyError, ValueError):
        return {}
    return {k: best[k] for k in ("top1", "top5", "macro_f1", "n") if k in best}


__all__ = ["ExportOptions", "ParityData", "export_run", "set_onnx_metadata"]
