"""Static int8 quantization of exported models, held to an accuracy budget and timed. Imports torch only
for ExecuTorch (its int8 is made from the PyTorch model with PT2E).

ONNX Runtime: quant_pre_process, then quantize_static in QDQ format with per-channel int8 weights.
OpenVINO: NNCF post-training quantization of the IR; when that misses the budget,
nncf.quantize_with_accuracy_control reverts the most harmful layers to float.

int8 is made for the deployment target, not for the machine that quantizes (`--int8-target`):
- `portable` (default): correct on every x86 and ARM CPU. U8S8 kernels without VNNI (AVX2) add pairs
  of u8*s8 products in int16 (vpmaddubsw) and can saturate, so weights use a 7-bit range: ONNX
  Runtime's reduce_range, NNCF's overflow fix on every layer. ARM and VNNI lose one bit of weight
  precision and nothing else.
- `vnni`: full 8-bit weights, exact only on CPUs with VNNI (AVX512-VNNI, AVX-VNNI, AMX) or ARM dot
  products; on an AVX2-only CPU this model can saturate. The target is recorded in the model.

LiteRT: the ONNX model is converted again in a child process, and TensorFlow's TFLiteConverter makes a
full-integer int8 file from the same calibration images (float input and output kept). ExecuTorch:
PT2E with the XNNPACKQuantizer on the checkpoint, lowered to XNNPACK. Neither has a per-layer float
fallback here: over budget, the command fails and writes no int8 file of that format.

Budget: the judged drop is top-1 points lost on the validation images, and for an adapted run also
the share of its target images whose top-1 class int8 changes (edgetl.int8_judge says why).
ONNX Runtime: if int8 is over --max-drop,
every quantized activation is ranked by its signal-to-quantization-noise ratio (onnxruntime's
qdq_loss_debug), and nodes are kept in float, 1, 2, 4, ... at a time, until the model is within budget:
at each count first those producing the worst activations, then the earliest convolutions
(`fallback_plan` says why both). Nothing within budget: the command fails and no int8 file is left.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetl import __version__, metadata
from edgetl import run as runfolder
from edgetl.backends.onnxruntime import OrtModel
from edgetl.backends.openvino import OpenVinoModel, save_model
from edgetl.bench.timing import interleaved_latency, latency_stats
from edgetl.data import relabel, stratified_sample
from edgetl.errors import EdgetlError
from edgetl.executed_ops import describe, openvino_executed_layers, ort_executed_ops
from edgetl.fileio import atomic_path, sha256_file, write_json
from edgetl.hostinfo import has_vnni, host_record, physical_cores
from edgetl.int8_judge import TARGET_JUDGE_MIN, JudgeSet, target_check_images
from edgetl.metadata import set_onnx_metadata
from edgetl.parity import ParityData, prepare
from edgetl.preprocess import PreprocessSpec
from edgetl.progress import Reporter

if TYPE_CHECKING:
    from edgetl.litert_convert import Conversion

CALIB_METHODS = ("minmax", "percentile", "entropy")
# auto: an adapted run (`edgetl adapt`) calibrates on the target images it was adapted on, any other run on its training split.
CALIB_SOURCES = ("auto", "train", "target")
INT8_TARGETS = ("portable", "vnni")


@dataclass(frozen=True)
class QuantizeOptions:
    format: str = "all"  # onnx | openvino | litert | executorch | all (= onnx, openvino), comma-separated
    calib_size: int = 300
    calib_method: str = "minmax"
    max_drop: float = 1.0  # top-1 points on the validation split
    seed: int = 0
    latency_runs: int = 300
    max_val_images: int = 1000
    int8_target: str = "portable"  # portable | vnni (see the module docstring)
    allow_data_change: bool = False  # calibrate on the recorded lists although the data folder changed
    calib_source: str = "auto"  # see CALIB_SOURCES

    def __post_init__(self) -> None:
        if self.calib_method not in CALIB_METHODS:
            raise EdgetlError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, got {self.calib_method!r}")
        from edgetl.formats import parse_formats

        parse_formats(self.format)
        if not (math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise EdgetlError(f"--max-drop is a number of top-1 points, 0 or more; got {self.max_drop}")
        if self.calib_size < 1:
            raise EdgetlError("--calib-size must be at least 1")
        if self.calib_source not in CALIB_SOURCES:
            raise EdgetlError(f"--calib-source must be one of {', '.join(CALIB_SOURCES)}, got {self.calib_source!r}")
        if self.int8_target not in INT8_TARGETS:
            raise EdgetlError(f"--int8-target must be one of {', '.join(INT8_TARGETS)}, got {self.int8_target!r}")


# ----------------------------------------------------------------------------- data


def _check_model_input(path: Path) -> dict[str, str]:
    """The model's metadata, validated against its graph: edgetl can only feed the float NCHW input
    its metadata describes."""
    model = OrtModel(path)
    metadata.validate(model.metadata, str(path), model.input_name, model.input_shape, model.input_type, model.output_shape)
    if model.metadata.get("preprocessing_in_graph") == "true" or "float" not in model.input_type:
        raise EdgetlError(f"{path} takes {model.input_name} {model.input_type} {model.input_shape}, not the float NCHW input "
                          "edgetl quantizes (quantize model.onnx, not the uint8-input model)")  # fmt: skip
    return model.metadata


def load_images(run: runfolder.RunFolder, meta: dict[str, str], opts: QuantizeOptions,
                reporter: Reporter) -> tuple[ParityData, ParityData, dict]:  # fmt: skip
    """Calibration images and the recorded validation images, both preprocessed exactly as at export
    (the spec in the model's metadata). Calibration is a seeded sample of the run's recorded training
    list (stratified), or for an adapted run of the target images it was adapted on (`target.json`):
    int8 ranges then fit the images the model will see. It never sees a validation or test image."""
    ds = run.dataset(allow_changed=opts.allow_data_change, reporter=reporter)
    labels = metadata.labels_from(meta)
    if sorted(ds.classes) != sorted(labels):
        raise EdgetlError(f"the run's recorded classes differ from the model's labels: is {run.path} the run this model came from?")
    spec: PreprocessSpec = metadata.spec_from(meta)
    rng = np.random.default_rng(opts.seed)
    n = opts.calib_size
    train, val_set = relabel(ds.train, ds.classes, labels, "train"), relabel(ds.val, ds.classes, labels, "val")
    target_record = run.target_record()
    source = opts.calib_source if opts.calib_source != "auto" else ("target" if target_record is not None else "train")
    if source == "target":
        if target_record is None:
            raise EdgetlError(f"--calib-source target: {run.path} is not an adapted run (no {runfolder.TARGET})")
        from edgetl.target import recorded_target

        pool, where = recorded_target(target_record, opts.allow_data_change), f"{target_record['root']} (target images of the adaptation)"
    else:
        pool, where = train, f"{ds.root} (recorded training split)"
    calib_set, note = pool, None
    if source == "target" and len(pool) >= 2 * TARGET_JUDGE_MIN and n > len(pool) // 2:
        # At most half of the target images calibrate, so that int8 is judged on target images it was not
        # calibrated on (edgetl.int8_judge): ranges fitted to the very images they are judged on flatter them.
        n = len(pool) // 2
        note = f"calibrating on {n} of the {len(pool)} target images (half): int8 is judged on the others"
        reporter.log(note)
    if len(pool) < n:
        note = f"the {source} images number only {len(pool)}, fewer than --calib-size {n}: calibrating on all of them"
        reporter.warn(note)
    elif source == "target":  # unlabelled: a plain seeded sample
        calib_set = pool.subset(np.sort(rng.choice(len(pool), n, replace=False)))
    else:
        calib_set = pool.subset(stratified_sample(pool.labels, n, rng))
    if len(val_set) > opts.max_val_images:
        val_set = val_set.subset(stratified_sample(val_set.labels, opts.max_val_images, rng))
    calib = prepare(calib_set, spec, where, reporter)
    val = prepare(val_set, spec, f"{ds.root} (recorded validation split)", reporter)
    record = {**calib.describe(), "images_from": source, "warning": note, "files": calib.keys}
    return calib, val, record


# ----------------------------------------------------------------------------- ONNX Runtime


class _Reader:
    """onnxruntime CalibrationDataReader over preprocessed images, one image per call."""

    def __init__(self, x: np.ndarray, input_name: str) -> None:
        self.x, self.name, self.i = x, input_name, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.x):
            return None
        self.i += 1
        return {self.name: self.x[self.i - 1 : self.i]}

    def rewind(self) -> None:
        self.i = 0

    def __iter__(self):
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item


def ort_types(target: str = "portable") -> dict[str, Any]:
    """The activation/weight types and range for a deployment target, with the reason (recorded)."""
    if target == "vnni":
        return {"activation": "QUInt8", "weight": "QInt8", "reduce_range": False, "target": "vnni",
                "why": "VNNI target: full-range U8S8 is exact and fastest there (it can saturate on AVX2-only CPUs)"}  # fmt: skip
    return {
        "activation": "QUInt8", "weight": "QInt8", "reduce_range": True, "target": "portable",
        "why": "portable: 7-bit weights (reduce_range) so U8S8 cannot saturate on AVX2-only CPUs; exact on VNNI and ARM too",
    }  # fmt: skip


def _quantize_ort(src: Path, dst: Path, calib: np.ndarray, input_name: str, method: str, exclude: list[str], target: str) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    types = ort_types(target)
    quantize_static(
        str(src), str(dst), _Reader(calib, input_name),
        quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=getattr(QuantType, types["activation"]), weight_type=getattr(QuantType, types["weight"]),
        reduce_range=types["reduce_range"],
        calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                          "entropy": CalibrationMethod.Entropy}[method],
        nodes_to_exclude=exclude,
        extra_options={"CalibMovingAverage": False},
    )  # fmt: skip


def rank_nodes_by_error(float_path: Path, qdq_path: Path, x: np.ndarray, input_name: str, work: Path,
                        chunk: int = 2) -> list[dict[str, Any]]:  # fmt: skip
    """Quantized activations ranked worst first by SQNR (dB) of each activation before vs after its
    QuantizeLinear/DequantizeLinear pair, with the float-model node producing each.

    Every intermediate tensor of the model becomes an output, which is about 100 MB per image for
    EfficientNet-Lite0: the activations are collected `chunk` images at a time and only their sums of
    squares kept, so memory does not grow with the number of images (it reached 3 GB for 16 at once)."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    aug_q = work / "qdq.aug.onnx"
    modify_model_output_intermediate_tensors(str(qdq_path), str(aug_q))
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    for start in range(0, len(x), chunk):
        matching = create_activation_matching(collect_activations(str(aug_q), _Reader(x[start : start + chunk], input_name)))
        for name, match in matching.items():
            pre = np.concatenate([a.ravel() for a in match["pre_qdq"]]).astype(np.float64)
            post = np.concatenate([a.ravel() for a in match["post_qdq"]]).astype(np.float64)
            signal[name] = signal.get(name, 0.0) + float(np.dot(pre, pre))
            noise[name] = noise.get(name, 0.0) + float(np.dot(pre - post, pre - post))
        del matching
    aug_q.unlink(missing_ok=True)
    producer = {out: n.name for n in onnx.load(str(float_path)).graph.node for out in n.output}
    # The SQNR of onnxruntime's compute_signal_to_quantization_noice_ratio, 20 log10(|x| / |x - q|), over all images.
    ranked = [
        {"tensor": t, "node": producer[t], "sqnr_db": 10 * math.log10(signal[t] / noise[t])}
        for t in signal
        if t in producer and noise[t] > 0 and signal[t] > 0
    ]
    ranked.sort(key=lambda r: r["sqnr_db"])
    return ranked


# Convolutions and matrix products: what ONNX Runtime runs as int8 kernels (activations such as Clip are fused
# into them; keeping one of those in float alone splits the fusion and made Lite0 worse, not better).
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
MAX_FLOAT_NODES = 64


def compute_nodes_in_order(model_path: Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(model_path)).graph.node if n.op_type in COMPUTE_OPS]


def fallback_plan(by_sqnr: list[str], in_order: list[str]) -> Iterator[tuple[str, list[str]]]:
    """Which nodes to keep in float next, 1, 2, 4, ... at a time, from two orders: the worst activations by
    SQNR (what int8 cannot represent), and the earliest compute nodes (an error there is amplified by
    every layer after it). Measured: a Lite0 adapted to defocus-blurred images (its early BatchNorms
    rescaled) lost 6 points in int8; its 16 worst-SQNR nodes in float won nothing back, its stem
    convolution alone in float won back 4 points, its first 4 convolutions all of them."""
    k, tried = 1, set()
    while k <= MAX_FLOAT_NODES and (k <= len(by_sqnr) or k <= len(in_order)):
        for name, order in (("worst SQNR", by_sqnr), ("earliest", in_order)):
            nodes = order[:k]
            if len(nodes) == k and frozenset(nodes) not in tried:
                tried.add(frozenset(nodes))
                yield name, nodes
        k *= 2


def quantize_onnx(src: Path, dst: Path, calib: ParityData, judge: JudgeSet, meta: dict[str, str], opts: QuantizeOptions,
                  reporter: Reporter) -> dict[str, Any]:  # fmt: skip
    """Quantize, judge (validation images; target images of an adapted run), keep the worst nodes in
    float until within budget."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = meta.get("input_name", "input")
    work = Path(tempfile.mkdtemp(prefix=".quantize-", dir=dst.parent))
    try:
        pre = work / "pre.onnx"
        quant_pre_process(str(src), str(pre))
        fp32_out = judge.outputs(OrtModel(src).predict)
        attempts: list[dict[str, Any]] = []
        ranked: list[dict[str, Any]] = []
        plan: Iterator[tuple[str, list[str]]] | None = None
        exclude: list[str] = []
        chosen_by = "-"
        while True:
            cand = work / f"int8-{len(attempts)}.onnx"
            _quantize_ort(pre, cand, calib.floats, input_name, opts.calib_method, exclude, opts.int8_target)
            judged = judge.score(fp32_out, judge.outputs(OrtModel(cand).predict))
            attempts.append({"kept_in_float": list(exclude), "chosen_by": chosen_by,
                             **{key: v for key, v in judged.items() if key != "fp32_top1"}})  # fmt: skip
            kept = f"{len(exclude)} node(s) kept in float ({chosen_by} first)" if exclude else "every node in int8"
            reporter.log(f"onnxruntime int8, {kept}: {judge.log_line(judged)}")
            if judged["drop_points"] <= opts.max_drop:
                break
            if plan is None:
                ranked = rank_nodes_by_error(pre, cand, calib.floats[: min(16, len(calib.floats))], input_name, work)
                plan = fallback_plan(list(dict.fromkeys(r["node"] for r in ranked)), compute_nodes_in_order(pre))
            step = next(plan, None)
            if step is None:
                best = min(attempts, key=lambda a: a["drop_points"])
                raise EdgetlError(
                    f"onnxruntime int8 cannot meet --max-drop {opts.max_drop} points: best drop {best['drop_points']:.2f} points "
                    f"with {len(best['kept_in_float'])} node(s) in float; no int8 ONNX model was written",
                    exit_code=1,
                )
            chosen_by, exclude = step
        final = attempts[-1]
        return {"fp32_top1": judged["fp32_top1"], "candidate": str(cand), "attempts": attempts, "kept_in_float": final["kept_in_float"],
                "worst_tensors": ranked[:10], "work": str(work), "types": ort_types(opts.int8_target)}  # fmt: skip
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- OpenVINO / NNCF


def quantize_openvino(src_xml: Path, calib: ParityData, judge: JudgeSet, opts: QuantizeOptions, reporter: Reporter) -> dict[str, Any]:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(src_xml))
    fp32 = OpenVinoModel(src_xml)
    fp32_out = judge.outputs(fp32.predict)
    step = fp32.fixed_batch or 1  # an IR exported with --batch N takes exactly N rows
    calib_ds = nncf.Dataset(_padded_chunks(calib.floats, step))
    # The deployment target decides the weight range (see the module docstring).
    overflow = nncf.OverflowFix.DISABLE if opts.int8_target == "vnni" else nncf.OverflowFix.ENABLE
    advanced = nncf.AdvancedQuantizationParameters(overflow_fix=overflow)
    quantized = nncf.quantize(model, calib_ds, subset_size=len(calib.floats), preset=nncf.QuantizationPreset.PERFORMANCE,
                              advanced_parameters=advanced)  # fmt: skip
    judged = judge.score(fp32_out, judge.outputs(OpenVinoModel(quantized, "f32").predict))
    mode = "nncf.quantize"
    if judged["drop_points"] > opts.max_drop:
        reporter.log(f"openvino int8: {judge.log_line(judged)} is over budget: nncf.quantize_with_accuracy_control")
        val_ds = nncf.Dataset(accuracy_control_items(judge, fp32_out, step))
        validate = accuracy_control_metric(judge)

        quantized = nncf.quantize_with_accuracy_control(
            model, calibration_dataset=calib_ds, validation_dataset=val_ds, validation_fn=validate,
            max_drop=opts.max_drop / 100, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib.floats),
            preset=nncf.QuantizationPreset.PERFORMANCE, advanced_quantization_parameters=advanced,
        )  # fmt: skip
        judged = judge.score(fp32_out, judge.outputs(OpenVinoModel(quantized, "f32").predict))
        mode = "nncf.quantize_with_accuracy_control"
    if judged["drop_points"] > opts.max_drop:
        raise EdgetlError(f"openvino int8 cannot meet --max-drop {opts.max_drop} points: best drop {judged['drop_points']:.2f}; "
                          "no int8 OpenVINO model was written", exit_code=1)  # fmt: skip
    return {**judged, "mode": mode, "model": quantized,
            "kept_in_float": _ov_float_ops(quantized), "overflow_fix": overflow.value}  # fmt: skip


def accuracy_control_items(judge: JudgeSet, fp32_out: np.ndarray, step: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]]:
    """nncf.quantize_with_accuracy_control's validation items: (input chunk, labels, the fp32 model's outputs,
    is target), for the validation images and an adapted run's target images (whose labels are unused)."""
    n_val = len(judge.val.labels)
    sets = [(judge.val.floats, judge.val.labels, fp32_out[:n_val], False)]
    if judge.target is not None:
        sets.append((judge.target.floats, np.full(len(judge.target.floats), -1), fp32_out[n_val:], True))
    return [(x, y[k * step : (k + 1) * step], ref[k * step : (k + 1) * step], tgt)
            for xs, y, ref, tgt in sets for k, x in enumerate(_padded_chunks(xs, step))]  # fmt: skip


def accuracy_control_metric(judge: JudgeSet) -> Any:
    """The metric NNCF holds to the budget: 1 minus the judged drop (as a fraction) on the items it is given,
    i.e. the larger of the validation top-1 lost against the fp32 outputs on the same items and the
    expected drop on target images, as the judge measures it. A sum would let a validation gain hide a
    target loss (measured: an adapted Lite0 1.5 points better on validation and 2.3 worse on target
    images passed as within a 1-point budget). The fp32 model scores 1 (NNCF divides by its score)."""

    def validate(compiled: Any, items: Any) -> float:
        out: dict[bool, list[np.ndarray]] = {False: [], True: []}
        ref: dict[bool, list[np.ndarray]] = {False: [], True: []}
        labels: list[np.ndarray] = []
        for x, y, fp32, tgt in items:
            out[tgt].append(compiled(x)[0][: len(y)])
            ref[tgt].append(fp32)
            if not tgt:
                labels.append(y)
        drops: list[float] = []
        # NNCF also scores subsets of the items (to rank layers), which may hold one kind only.
        if out[False]:
            y = np.concatenate(labels)
            drops.append(float((np.concatenate(ref[False]).argmax(1) == y).mean() - (np.concatenate(out[False]).argmax(1) == y).mean()))
        if out[True]:
            drops.append(judge.expected_target_drop(np.concatenate(ref[True]), np.concatenate(out[True])) / 100)
        return 1.0 - max(drops)

    return validate


def _padded_chunks(x: np.ndarray, step: int) -> list[np.ndarray]:
    """Rows of `x` in chunks of exactly `step` (the last padded with zeros), as a fixed-batch IR takes them."""
    out = []
    for i in range(0, len(x), step):
        chunk = x[i : i + step]
        out.append(np.concatenate([chunk, np.zeros((step - len(chunk), *x.shape[1:]), x.dtype)]) if len(chunk) < step else chunk)
    return out


def _ov_float_ops(model: Any) -> list[str]:
    """Convolutions and matrix multiplications whose weights are not fake-quantized (kept in float)."""
    kept = []
    for op in model.get_ops():
        if op.get_type_name() not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        weight_src = op.input_value(1).get_node()
        seen, node = 0, weight_src
        while node.get_type_name() not in ("FakeQuantize", "Constant", "Parameter") and seen < 4:
            node, seen = node.input_value(0).get_node(), seen + 1
        if node.get_type_name() != "FakeQuantize" and not _has_int8_constant(weight_src):
            kept.append(op.get_friendly_name())
    return kept


def _has_int8_constant(node: Any) -> bool:
    for _ in range(4):
        if node.get_type_name() == "Constant":
            return str(node.get_element_type()) in ("<Type: 'int8_t'>", "<Type: 'uint8_t'>", "i8", "u8")
        if node.get_input_size() == 0:
            return False
        node = node.input_value(0).get_node()
    return False


# ----------------------------------------------------------------------------- latency


def time_pair(make_fp32: Any, make_int8: Any, x: np.ndarray, runs: int, rounds: int = 6) -> dict[str, Any]:
    """Batch-1 latency of two models, interleaved in rounds so machine drift hits both alike."""
    # A model exported with a fixed batch N is timed on one image padded to N rows (what an app pays).
    runners = {name: (m.predict if getattr(m, "fixed_batch", None) not in (None, len(x)) else m)
               for name, m in (("fp32", make_fp32()), ("int8", make_int8()))}  # fmt: skip
    samples = interleaved_latency(
        runners, x, min_time=0.0, warmup=10, rounds=rounds,
        runs_per_round=max(1, runs // rounds),
    )  # fmt: skip
    out: dict[str, Any] = {}
    for name, ms in samples.items():
        stats = latency_stats(ms)
        stats["median_ms"] = stats.pop("p50_ms")  # quantize.json's name for it since its first version
        out[name] = stats
    out["int8_over_fp32"] = out["int8"]["median_ms"] / out["fp32"]["median_ms"]
    return out


# ----------------------------------------------------------------------------- the command


def _record(parent_meta: dict[str, str], backend: str, parent_path: Path, calib_record: dict, opts: QuantizeOptions,
            kept: list[str], extra: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    return {
        "backend": backend, "precision": "int8", "parent": parent_path.name, "parent_sha256": sha256_file(parent_path),
        "parent_checkpoint_sha256": parent_meta.get("checkpoint_sha256"), "method": opts.calib_method,
        "calibration": {k: v for k, v in calib_record.items() if k != "files"}, "kept_in_float": kept,
        "int8_target": opts.int8_target, "edgetl_version": __version__, **extra,
    }  # fmt: skip


def quantize_run(run: str | os.PathLike[str], opts: QuantizeOptions, reporter: Reporter | None = None) -> dict[str, Any]:
    """int8 versions of the exported models (model.onnx, openvino/model.xml) in a run folder or an
    `export --out` folder, within an accuracy budget. Only models of the run's current checkpoint."""
    folder, out_dir = runfolder.export_folder_run(run)
    with runfolder.locked(out_dir, "quantize"):
        return _quantize_locked(folder, out_dir, opts, reporter or Reporter())


def _quantize_locked(folder: runfolder.RunFolder, run_dir: Path, opts: QuantizeOptions, reporter: Reporter) -> dict[str, Any]:
    from edgetl.formats import parse_formats
    from edgetl.malloc_tuning import tune_malloc

    tune_malloc()
    formats = parse_formats(opts.format)
    onnx_path = run_dir / runfolder.MODEL_FILES["onnx"]
    if not any((run_dir / runfolder.MODEL_FILES[f]).exists() for f in ("onnx", "openvino", "litert", "executorch")):
        raise EdgetlError(f"no exported model in {run_dir}: run `edgetl export {folder.path}` first")
    if onnx_path.exists():
        _is_onnx(onnx_path)
    for fmt in formats:  # every asked format has its fp32 model (LiteRT is converted again from model.onnx)
        needed = [runfolder.MODEL_FILES[fmt], *([runfolder.MODEL_FILES["onnx"]] if fmt == "litert" else [])]
        for rel in needed:
            if not (run_dir / rel).exists():
                raise EdgetlError(f"no {rel} in {run_dir}: run `edgetl export {folder.path} --format {fmt}` first")
    if onnx_path.exists():
        meta = _check_model_input(onnx_path)
    else:  # an OpenVINO- or ExecuTorch-only export: the IR's rt_info or the program's sidecar holds the same metadata
        from edgetl.backends.executorch import read_metadata as read_pte_metadata
        from edgetl.backends.openvino import read_metadata as read_ir_metadata

        xml = run_dir / runfolder.MODEL_FILES["openvino"]
        source = xml if xml.exists() else run_dir / runfolder.MODEL_FILES["executorch"]
        meta = read_ir_metadata(source) if source == xml else read_pte_metadata(source)
        metadata.validate(meta, str(source))
    wanted = {*formats, *(["onnx"] if "litert" in formats else [])}
    parents = [m for m in folder.models(run_dir) if m.key in wanted]
    for m in parents:
        stale = folder.stale_reason(m)
        if stale:
            raise EdgetlError(f"refusing to quantize a stale model: {stale}")
    calib, val, calib_record = load_images(folder, meta, opts, reporter)
    target_images, target_note = target_check_images(folder, metadata.spec_from(meta), calib.keys, opts.max_val_images,
                                                     opts.seed, opts.allow_data_change, reporter)  # fmt: skip
    judge = JudgeSet(val, target_images, target_note)
    x1 = val.floats[:1]
    report: dict[str, Any] = {"run": str(folder.path.resolve()), "folder": str(run_dir), "int8_target": opts.int8_target,
                              "checkpoint_sha256": folder.checkpoint_sha256,
                              "max_drop_points": opts.max_drop, "validation_images": val.describe(), "judged_on": judge.describe(),
                              "calibration": calib_record, "results": {}, "host": host_record()}  # fmt: skip
    warnings_out: list[str] = []

    timings: dict[str, Callable[[], dict[str, Any]]] = {}
    # LiteRT's int8 converts in a child process (TensorFlow) from the start, while the other formats are
    # quantized and judged here; timings wait until it has finished, so it never shares the cores with one.
    litert = start_litert(run_dir, calib, reporter) if "litert" in formats else None
    try:
        if "onnx" in formats:
            reporter.log(f"onnxruntime static int8 ({opts.calib_method}, {len(calib.floats)} calibration images)")
            target = run_dir / runfolder.MODEL_FILES["onnx_int8"]
            res = quantize_onnx(onnx_path, target, calib, judge, meta, opts, reporter)
            try:
                qmeta = {**meta, "quantization": json.dumps(_record(meta, "onnxruntime", onnx_path, calib_record, opts,
                                                                    res["kept_in_float"], {"types": res["types"]}))}  # fmt: skip
                with atomic_path(target) as tmp:
                    shutil.copy(res["candidate"], tmp)
                    set_onnx_metadata(tmp, qmeta)
                timings["onnxruntime"] = partial(time_pair, partial(OrtModel, onnx_path), partial(OrtModel, target), x1, opts.latency_runs)
                final = res["attempts"][-1]
                report["results"]["onnxruntime"] = {
                    "fp32_top1": res["fp32_top1"], "int8_top1": final["top1"],
                    **{k: v for k, v in final.items() if k.endswith("_points")},
                    "kept_in_float": res["kept_in_float"], "attempts": res["attempts"], "worst_tensors": res["worst_tensors"],
                    "types": res["types"], "fp32_bytes": onnx_path.stat().st_size, "int8_bytes": target.stat().st_size,
                    "file": str(target), "executed": ort_executed_ops(target),
                }  # fmt: skip
            finally:
                shutil.rmtree(res["work"], ignore_errors=True)

        xml = run_dir / runfolder.MODEL_FILES["openvino"]
        if "openvino" in formats:
            reporter.log("openvino int8 with NNCF post-training quantization")
            res = quantize_openvino(xml, calib, judge, opts, reporter)
            qmodel = res.pop("model")
            rec = _record(meta, "openvino-nncf", xml.with_suffix(".bin"), calib_record, opts, res["kept_in_float"],
                          {"mode": res["mode"], "overflow_fix": res["overflow_fix"]})  # fmt: skip
            target = run_dir / runfolder.MODEL_FILES["openvino_int8"]
            save_model(qmodel, target, {**meta, "quantization": json.dumps(rec)})
            timings["openvino"] = partial(time_pair, partial(OpenVinoModel, xml), partial(OpenVinoModel, target), x1, opts.latency_runs)
            report["results"]["openvino"] = {
                **res, "file": str(target), "executed": openvino_executed_layers(target),
                "fp32_bytes": xml.stat().st_size + xml.with_suffix(".bin").stat().st_size,
                "int8_bytes": target.stat().st_size + target.with_suffix(".bin").stat().st_size,
            }  # fmt: skip

        if "executorch" in formats:
            reporter.log(f"ExecuTorch int8 (PT2E, XNNPACKQuantizer, {len(calib.floats)} calibration images)")
            report["results"]["executorch"], timings["executorch"] = quantize_executorch(folder, run_dir, calib, judge, calib_record,
                                                                                         opts, reporter)  # fmt: skip
        if litert is not None:
            report["results"]["litert"], timings["litert"] = finish_litert(litert, run_dir, judge, calib_record, opts, reporter)
    finally:
        if litert is not None:
            litert.close()
    # Every latency is timed now, with no conversion running beside it.
    for name, timer in timings.items():
        report["results"][name]["latency"] = timer()

    for name, r in report["results"].items():
        r["size_ratio"] = r["int8_bytes"] / r["fp32_bytes"]
        reporter.log(f"{name} int8 executes {describe(r['executed'])}")
        if r["latency"]["int8_over_fp32"] >= 1.0:
            warnings_out.append(f"{name}: int8 is not faster than fp32 at batch 1 ({r['latency']['int8_over_fp32']:.2f}x): "
                                f"likely {slow_int8_reason(r['executed'])}")  # fmt: skip
    report["warnings"] = warnings_out
    for w in warnings_out:
        reporter.warn(w)
    report["earlier_results"] = _earlier_results(run_dir, folder.checkpoint_sha256, set(report["results"]))
    write_json(run_dir / runfolder.QUANTIZE_REPORT, report)
    return report


def _earlier_results(run_dir: Path, checkpoint_sha256: str, redone: set[str]) -> dict[str, Any]:
    """What an earlier quantize of the same checkpoint recorded for the formats not redone now (their
    int8 files are still there): `quantize --format litert` after `export --quantize int8` keeps the
    ONNX Runtime and OpenVINO records instead of replacing quantize.json with its own alone."""
    try:
        old = json.loads((run_dir / runfolder.QUANTIZE_REPORT).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(old, dict) or old.get("checkpoint_sha256") != checkpoint_sha256:
        return {}
    kept = {**old.get("earlier_results", {}), **old.get("results", {})}
    out = {}
    for name, r in kept.items():
        if name not in redone and isinstance(r, dict) and Path(str(r.get("file", ""))).exists():
            out[name] = {**r, "calibration_files_sha256": r.get("calibration_files_sha256", old.get("calibration", {}).get("files_sha256"))}
    return out


def _judge(fmt: str, load: Any, fp32_path: Path, candidate: Path, judge: JudgeSet, opts: QuantizeOptions,
           reporter: Reporter) -> dict[str, Any]:  # fmt: skip
    """Score the fp32 file and the int8 candidate in the format's own runtime (`load(path, threads)`);
    over the budget the command fails (no per-layer float fallback for these formats)."""
    threads = physical_cores()
    judged = judge.score(judge.outputs(load(fp32_path, threads).predict), judge.outputs(load(candidate, threads).predict))
    reporter.log(f"{fmt} int8: {judge.log_line(judged)}")
    if judged["drop_points"] > opts.max_drop:
        raise EdgetlError(f"{fmt} int8 cannot meet --max-drop {opts.max_drop} points: drop {judged['drop_points']:.2f} points "
                          f"(no per-layer float fallback for this format); no int8 {fmt} model was written", exit_code=1)  # fmt: skip
    top1 = judged.pop("top1")
    return {**judged, "int8_top1": top1, "kept_in_float": [], "threads": threads}


def _timed(load: Any, fp32_path: Path, target: Path, judged: dict[str, Any], judge: JudgeSet, opts: QuantizeOptions,
           executed: dict[str, Any]) -> tuple[dict[str, Any], Callable[[], dict[str, Any]]]:  # fmt: skip
    """The written int8 file's result (sizes, what executes) and how to time it: fp32 and int8 side by side at
    batch 1, run by the caller once nothing else is converting."""
    threads = judged["threads"]
    result = {**judged, "fp32_bytes": fp32_path.stat().st_size, "int8_bytes": target.stat().st_size, "file": str(target),
              "executed": executed}  # fmt: skip
    return result, partial(time_pair, partial(load, fp32_path, threads), partial(load, target, threads), judge.val.floats[:1],
                           opts.latency_runs)  # fmt: skip


def start_litert(run_dir: Path, calib: ParityData, reporter: Reporter) -> Conversion:
    """The int8 .tflite of the run's model.onnx, converting in its child process from now on."""
    from edgetl.litert_convert import start_conversion

    reporter.log(f"LiteRT full-integer int8 (TFLiteConverter, {len(calib.floats)} calibration images), converting in a child process")
    return start_conversion(run_dir / runfolder.MODEL_FILES["onnx"], run_dir, calib.floats, prefix="litert-int8")


def finish_litert(job: Conversion, run_dir: Path, judge: JudgeSet, calib_record: dict, opts: QuantizeOptions,
                  reporter: Reporter) -> tuple[dict[str, Any], Callable[[], dict[str, Any]]]:  # fmt: skip
    """Full-integer int8 .tflite from the same calibration images, judged within the budget, written with its record."""
    from edgetl.backends.litert import LiteRtModel, with_metadata
    from edgetl.backends.litert import read_metadata as read_tflite_metadata
    from edgetl.executed_ops import litert_executed_ops
    from edgetl.fileio import write_bytes

    fp32_path, target = run_dir / runfolder.MODEL_FILES["litert"], run_dir / runfolder.MODEL_FILES["litert_int8"]
    meta = read_tflite_metadata(fp32_path)
    try:
        candidate = job.wait()["int8"]
        judged = _judge("LiteRT", LiteRtModel, fp32_path, candidate, judge, opts, reporter)
        rec = _record(meta, "litert-tfliteconverter", fp32_path, calib_record, opts, [],
                      {"method": "TFLiteConverter representative dataset (min/max)", "converted_from": job.onnx_path.name,
                       "types": {"activation": "int8", "weight": "int8 per-channel", "io": "float32"}})  # fmt: skip
        # The fp32 file's metadata, tensor names included: TFLiteConverter names them after the SavedModel
        # signature, and with_metadata gives them the fp32 file's names again.
        write_bytes(target, with_metadata(candidate.read_bytes(), {**meta, "quantization": json.dumps(rec)}))
    finally:
        job.close()
    return _timed(LiteRtModel, fp32_path, target, judged, judge, opts, litert_executed_ops(target))


def quantize_executorch(folder: runfolder.RunFolder, run_dir: Path, calib: ParityData, judge: JudgeSet, calib_record: dict,
                        opts: QuantizeOptions, reporter: Reporter) -> tuple[dict[str, Any], Callable[[], dict[str, Any]]]:  # fmt: skip
    """int8 .pte (PT2E, XNNPACKQuantizer) from the run's checkpoint, calibrated on the same images."""
    import torch

    from edgetl import checkpoint
    from edgetl.backends.executorch import ExecuTorchModel
    from edgetl.backends.executorch import read_metadata as read_pte_metadata
    from edgetl.executorch_export import lower_int8, write_program
    from edgetl.fileio import make_temp_dir

    fp32_path, target = run_dir / runfolder.MODEL_FILES["executorch"], run_dir / runfolder.MODEL_FILES["executorch_int8"]
    meta = read_pte_metadata(fp32_path)
    model = checkpoint.build_model(folder.checkpoint())
    batches = (torch.from_numpy(calib.floats[i : i + 1]) for i in range(len(calib.floats)))
    blob, delegation = lower_int8(model, int(meta["input_size"]), batches)
    work = make_temp_dir(run_dir, "executorch-int8")
    try:
        candidate = work / "int8.pte"
        candidate.write_bytes(blob)
        judged = _judge("ExecuTorch", ExecuTorchModel, fp32_path, candidate, judge, opts, reporter)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rec = _record(meta, "executorch-pt2e-xnnpack", fp32_path, calib_record, opts, [],
                  {"method": "PT2E observers (min/max)", "delegation": delegation,
                   "types": {"activation": "int8", "weight": "int8 per-channel symmetric", "io": "float32"}})  # fmt: skip
    write_program(target, blob, {**meta, "quantization": json.dumps(rec)})
    # XNNPACK takes each dequantize -> op -> quantize pattern as one int8 kernel; what it does not take runs in float.
    done, left = delegation.get("compute_ops_delegated", 0), delegation.get("compute_ops_not_delegated", 0)
    executed = {"compute_ops": done + left, "int8_compute_ops": done, "float_compute_ops": left, "delegation": delegation}
    return _timed(ExecuTorchModel, fp32_path, target, judged, judge, opts, executed)


def slow_int8_reason(executed: dict[str, Any]) -> str:
    """Why int8 may not beat fp32, from what the runtime executes and what this CPU can do."""
    if executed["float_compute_ops"]:
        return (f"{executed['float_compute_ops']} of {executed['compute_ops']} compute ops still run in float "
                "(unfused Quantize/DequantizeLinear pairs or layers kept in float)")  # fmt: skip
    if not has_vnni():
        return ("every compute op runs in int8, but this CPU has no VNNI: "
                "int8 dot products take three AVX2 instructions per 32 multiply-adds")  # fmt: skip
    return "every compute op runs in int8 with VNNI; at batch 1 the model may be bound by memory or by layers too small to gain"


def _is_onnx(path: Path) -> bool:
    import onnx

    try:
        onnx.load(str(path), load_external_data=False)
        return True
    except Exception:
        raise EdgetlError(f"{path} is not an ONNX model") from None
