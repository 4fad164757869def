"""Domain adaptation on corrupted images, ImageNet-C style (issue 16).

    python benchmarks/adapt_corruptions.py --run RUN [--int8] [--labelled]

RUN is a run trained on clothing-small, e.g. `python benchmarks/train_accuracy.py clothing --out RUN`.
From the run's recorded **test** split: every image at the model's stored geometry (shorter side
`resize_size`, centre square), corrupted with each corruption of edgetl.corruptions at severities 1, 3
and 5 (seeded). The test images are split in two halves, stratified and seeded: the methods adapt on the
unlabelled corrupted images of one half and are scored on the other half. Reported per corruption and
severity: the source model, each method, and the share of the accuracy lost to the corruption that the
method wins back ((method - source) / (clean - source)). Clean images are adapted on too (a method
must not hurt there). Each method runs as `edgetl adapt` does, behind the shift gate (edgetl.shift.shift_gate,
same-size subsets of the run's validation split): where the gate keeps the model as trained, the
method's ungated result is also measured and reported beside it (`--set gate=0`: no gate at all).

--int8: for clean images and some corruptions at severity 3, the default method's adapted run is written with
`edgetl adapt` (target folder on disk), exported to ONNX and quantized as `edgetl quantize` does it
(calibrated on the target images, judged on them and the clean validation split under --int8-max-drop,
nodes kept in float as needed), and the int8 model is scored on the scored half.
--labelled: the labelled fine-tune curve at severity 3 (k labelled target images per class).
--validation: the paper's held-out corruptions instead (to choose hyperparameters on).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from common import read_settings, result_name, save, share_won_back
from PIL import Image

from edgetl import checkpoint
from edgetl.adapt import DEFAULT_METHOD, METHODS, AdaptOptions, adapt_model, finetune_labelled, gated_adapt, measure_source
from edgetl.corruptions import CORRUPTIONS, VALIDATION, corrupt
from edgetl.data import ImageRef, LabelledSet, relabel, stratified_sample, stratified_split
from edgetl.decoded import DecodedImages, decode_split
from edgetl.preprocess import resize_shorter
from edgetl.progress import Reporter
from edgetl.run import RunFolder
from edgetl.shift import run_model
from edgetl.target import MIN_TARGET_IMAGES


@dataclass
class LoadedRun:
    """A trained run's model and recorded splits, relabelled to the model's label order."""

    folder: RunFolder
    model: Any
    spec: Any
    labels: list[str]
    train: LabelledSet
    val: LabelledSet
    test: LabelledSet


def load_run(path: str) -> LoadedRun:
    folder = RunFolder.open(path)
    ckpt = folder.checkpoint()
    labels = list(ckpt["config"]["labels"])
    ds = folder.dataset()
    splits = [relabel(split, ds.classes, labels, name) for split, name in ((ds.train, "train"), (ds.val, "val"), (ds.test, "test"))]
    return LoadedRun(folder, checkpoint.build_model(ckpt).eval(), checkpoint.spec_of(ckpt), labels, *splits)


def source_sample(train: LabelledSet, seed: int) -> LabelledSet:
    """The training images the source statistics are measured on (up to 512, stratified), as `edgetl adapt` draws them."""
    return train.subset(stratified_sample(train.labels, min(512, len(train)), np.random.default_rng(seed)))


def adapt_score_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the test images adapted on and of those scored: stratified halves."""
    return stratified_split(labels, 0.5, np.random.default_rng(seed))


def check_target_sizes(flag: str, sizes: list[int], half: int) -> None:
    """A target size the benchmark can draw and `edgetl adapt` would take, or the script ends in one line."""
    if any(not MIN_TARGET_IMAGES <= n <= half for n in sizes):
        raise SystemExit(f"{flag} must be from {MIN_TARGET_IMAGES} (the fewest `edgetl adapt` takes) to {half} "
                         f"(the adapt half), got {' '.join(map(str, sizes))}")  # fmt: skip


def corrupted(clean: np.ndarray, name: str, severity: int, seed: int, indices: Any = None) -> np.ndarray:
    """Corrupted copies of the images `clean` (or of those at `indices`): image i's noise depends only on
    (seed, i), so a subset gets the same pixels as the whole set."""
    idx = range(len(clean)) if indices is None else indices
    return np.stack([corrupt(clean[i], name, severity, seed=seed * 100003 + int(i)) for i in idx])


def md_row(cells: list[str]) -> str:
    """One Markdown table row; with no method columns it has no empty trailing cells."""
    return "| " + " | ".join(cells) + " |"


def square(img: Image.Image, size: int, interpolation: str) -> np.ndarray:
    img = resize_shorter(img, size, interpolation)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def as_images(pixels: np.ndarray, labels: np.ndarray, spec: Any, crop_scale: float | None = None) -> DecodedImages:
    refs = [ImageRef(key=f"img{i}", array=pixels, index=i) for i in range(len(pixels))]
    images, failed = decode_split(LabelledSet(refs, labels), spec, crop_scale=crop_scale, name="corrupted", workers=1)
    assert not failed
    return images


def top1(model: Any, images: DecodedImages, spec: Any, device: Any) -> float:
    return float((run_model(model, images, spec, device).logits.argmax(1) == images.labels).mean())


def write_folder(pixels: np.ndarray, labels: np.ndarray, classes: list[str], folder: Path) -> None:
    for i, (x, y) in enumerate(zip(pixels, labels, strict=True)):
        d = folder / classes[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x).save(d / f"{i:04d}.png")


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--corruptions", nargs="*", default=None)
    ap.add_argument("--severities", nargs="*", type=int, default=[1, 3, 5])
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--costly-severities", nargs="*", type=int, default=[3], help="severities at which tent, im, shot and bn-replace run")
    ap.add_argument("--validation", action="store_true")
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--labelled", action="store_true")
    ap.add_argument("--int8-target", default="portable", help="quantize's --int8-target for the --int8 check")
    ap.add_argument("--int8-max-drop", type=float, default=1.0, help="quantize's --max-drop for the --int8 check (100: no budget)")
    ap.add_argument("--int8-format", default="onnx", choices=["onnx", "openvino"], help="the format (and runtime) of the --int8 check")
    ap.add_argument("--int8-corruptions", nargs="*", default=["gaussian_noise", "defocus_blur", "fog", "contrast", "jpeg_compression"])
    ap.add_argument("--labelled-k", nargs="*", type=int, default=[1, 3, 10])
    ap.add_argument("--labelled-corruptions", nargs="*", default=["gaussian_noise", "defocus_blur", "contrast"])
    ap.add_argument("--set", nargs="*", default=[], help="AdaptOptions fields, e.g. lr=3e-4 epochs=1")
    ap.add_argument("--adapt-images", type=int, default=None, help="adapt on this many of the adapt half's images (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    overrides = read_settings(AdaptOptions(), args.set)
    table = VALIDATION if args.validation else CORRUPTIONS
    names = args.corruptions or list(table)
    device = torch.device("cpu")
    loaded = load_run(args.run)
    folder, model, spec, labels, train, test = loaded.folder, loaded.model, loaded.spec, loaded.labels, loaded.train, loaded.test
    started = time.time()
    adapt_idx, score_idx = adapt_score_halves(test.labels, args.seed)
    if args.adapt_images is not None:  # a user with fewer target images: adapt on a random part of the half, score on the same half
        check_target_sizes("--adapt-images", [args.adapt_images], len(adapt_idx))
        adapt_idx = np.sort(np.random.default_rng(args.seed).choice(adapt_idx, args.adapt_images, replace=False))

    # Source statistics from the recorded training images, as `edgetl adapt` measures them.
    src_images, _ = decode_split(source_sample(train, args.seed), spec, name="source")
    prior = np.bincount(train.labels, minlength=len(labels)) / len(train)
    source = measure_source(model, src_images, spec, device, prior)
    clean = np.stack([square(r.load(), spec.resize_size, spec.interpolation) for r in test.refs])
    y_adapt, y_score = test.labels[adapt_idx], test.labels[score_idx]
    val_images, _ = decode_split(loaded.val, spec, name="val")  # the shift gate's in-domain images, as `edgetl adapt` measures it
    val_features = run_model(model, val_images, spec, device).features
    val_images.close()
    print(f"{len(adapt_idx)} images to adapt on, {len(score_idx)} to score; source stats in {time.time() - started:.0f}s")

    def evaluate_methods(pixels: np.ndarray, methods: list[str]) -> dict[str, Any]:
        target = as_images(pixels[adapt_idx], y_adapt, spec)
        scored = as_images(pixels[score_idx], y_score, spec)
        out: dict[str, Any] = {"source": top1(model, scored, spec, device)}
        target_features = run_model(model, target, spec, device).features
        for method in methods:
            t0 = time.perf_counter()
            opts = AdaptOptions(method=method, seed=args.seed, **overrides)
            adapted, rec = gated_adapt(model, source, target, target_features, val_features, spec, device, opts)
            out[method] = top1(adapted, scored, spec, device)
            out[f"{method}_seconds"] = time.perf_counter() - t0
            out[f"{method}_gate_excess"] = rec["gate"]["excess"]
            if not rec["adapted"]:  # what the method would have done without the gate
                ungated, _ = adapt_model(model, source, target, spec, device, opts)
                out[f"{method}_ungated"] = top1(ungated, scored, spec, device)
            if rec.get("training", {}).get("stopped"):
                out[f"{method}_stopped"] = rec["training"]["stopped"]
        target.close()
        scored.close()
        return out

    results: dict[str, Any] = {"clean": evaluate_methods(clean, args.methods)}
    print("clean", {k: round(v, 4) for k, v in results["clean"].items() if isinstance(v, float)})
    for name in names:
        for sev in args.severities:
            pixels = corrupted(clean, name, sev, args.seed)
            methods = [m for m in args.methods if m not in ("tent", "im", "shot", "bn-replace") or sev in args.costly_severities]
            r = evaluate_methods(pixels, methods)
            results[f"{name}/{sev}"] = r
            print(name, sev, {k: round(v, 4) for k, v in r.items() if isinstance(v, float) and not k.endswith("seconds")},
                  f"{time.time() - started:.0f}s", flush=True)  # fmt: skip

    extra: dict[str, Any] = {}
    if args.labelled:
        extra["labelled"] = labelled_curve(args, model, source, clean, adapt_idx, score_idx, test.labels, spec, device, overrides)
    if args.int8:
        extra["int8"] = int8_check(args, folder, clean, adapt_idx, score_idx, test.labels, labels, spec, args.int8_corruptions)
    payload = {"run": str(folder.path), "checkpoint_sha256": folder.checkpoint_sha256, "validation_corruptions": args.validation,
               "adapt_images": len(adapt_idx), "scored_images": len(score_idx), "options": overrides, "args": vars(args),
               "results": results, **extra, "seconds": time.time() - started}  # fmt: skip
    name = result_name("adapt_corruptions" + ("_validation" if args.validation else ""), args.tag)
    save(name, payload, markdown(payload, args))


def labelled_curve(args: Any, model: Any, source: Any, clean: np.ndarray, adapt_idx: np.ndarray, score_idx: np.ndarray,
                   labels_all: np.ndarray, spec: Any, device: Any, overrides: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Top-1 on the scored half after adapting (default method) and fine-tuning on k labelled images per
    class drawn from the adaptation half."""
    out: dict[str, Any] = {}
    for name in args.labelled_corruptions:
        pixels = corrupted(clean, name, 3, args.seed)
        target = as_images(pixels[adapt_idx], labels_all[adapt_idx], spec)
        scored = as_images(pixels[score_idx], labels_all[score_idx], spec)
        opts = AdaptOptions(method=DEFAULT_METHOD, seed=args.seed, **overrides)
        adapted, _ = adapt_model(model, source, target, spec, device, opts)
        row = {"0": top1(adapted, scored, spec, device)}
        for k in args.labelled_k:
            rng = np.random.default_rng(args.seed)
            pick = np.concatenate([rng.permutation(np.flatnonzero(labels_all[adapt_idx] == c))[:k] for c in range(len(source.prior))])
            lab = as_images(pixels[adapt_idx][pick], labels_all[adapt_idx][pick], spec, crop_scale=0.5)
            tuned = copy.deepcopy(adapted)
            finetune_labelled(tuned, lab, spec, device, opts)
            row[str(k)] = top1(tuned, scored, spec, device)
            lab.close()
        out[name] = row
        print("labelled", name, {k: round(v, 4) for k, v in row.items()}, flush=True)
        target.close()
        scored.close()
    return out


def int8_check(args: Any, folder: RunFolder, clean: np.ndarray, adapt_idx: np.ndarray, score_idx: np.ndarray,
               labels_all: np.ndarray, classes: list[str], spec: Any, names: list[str]) -> dict[str, Any]:  # fmt: skip
    """The real commands end to end: adapt (default method) -> export ONNX -> quantize (calibrated on the
    target images) -> score fp32 and int8 on the scored half in the format's runtime (--int8-format)."""
    from edgetl.adapt import adapt_run
    from edgetl.backends.onnxruntime import OrtModel
    from edgetl.backends.openvino import OpenVinoModel
    from edgetl.errors import EdgetlError
    from edgetl.export import ExportOptions, export_run
    from edgetl.preprocess import normalize
    from edgetl.quantize import QuantizeOptions, quantize_run

    out: dict[str, Any] = {}
    quiet = Reporter(quiet=True)
    for name in ["clean", *names]:
        work = Path(tempfile.mkdtemp(prefix="edgetl-adapt-int8-"))
        try:
            pixels = clean if name == "clean" else corrupted(clean, name, 3, args.seed)
            write_folder(pixels[adapt_idx], labels_all[adapt_idx], classes, work / "target")
            res = adapt_run(folder.path, work / "target", AdaptOptions(method=DEFAULT_METHOD, out=str(work / "run"), seed=args.seed), quiet)
            fmt = args.int8_format
            export_run(work / "run", ExportOptions(format=fmt, parity_samples=64), quiet)
            opts = QuantizeOptions(format=fmt, latency_runs=20, max_drop=args.int8_max_drop, int8_target=args.int8_target)
            try:
                q = quantize_run(work / "run", opts, quiet)
            except EdgetlError as exc:  # over budget whatever is kept in float: quantize refuses, as it should
                out[name] = {"refused": str(exc), "adapt_seconds": res["seconds"]}
                print("int8", name, out[name], flush=True)
                continue
            off = (spec.resize_size - spec.input_size) // 2
            x = normalize(pixels[score_idx][:, off : off + spec.input_size, off : off + spec.input_size], spec)
            y = labels_all[score_idx]
            # The format's backend, its fp32 and int8 files, and the key of quantize's result for that runtime.
            backend, files, runtime = {
                "onnx": (OrtModel, {"fp32": "model.onnx", "int8": "model.int8.onnx"}, "onnxruntime"),
                "openvino": (OpenVinoModel, {"fp32": "openvino/model.xml", "int8": "openvino-int8/model.xml"}, "openvino"),
            }[fmt]  # fmt: skip
            acc = {key: float((backend(work / "run" / file).predict(x).argmax(1) == y).mean()) for key, file in files.items()}
            judged = q["results"][runtime]
            out[name] = {**acc, "drop_points": 100 * (acc["fp32"] - acc["int8"]), "calibration": q["calibration"]["images_from"],
                         "source_val_drop_points": judged["val_drop_points"], "target_changed_points": judged["target_changed_points"],
                         "target_expected_drop_points": judged["target_expected_drop_points"],
                         "judged_drop_points": judged["drop_points"], "kept_in_float": judged["kept_in_float"],
                         "chosen_by": judged["attempts"][-1]["chosen_by"] if "attempts" in judged else judged["mode"],
                         "adapt_seconds": res["seconds"], "shift": res["shift"], "source_val": res["source_val"]}  # fmt: skip
            print("int8", name, {k: v for k, v in out[name].items() if k not in ("calibration", "shift")}, flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


def method_cell(r: dict[str, Any], method: str) -> str:
    """A method's top-1 on one condition; where the shift gate kept the model as trained, also its ungated top-1."""
    if method not in r:
        return ""
    ungated = r.get(f"{method}_ungated")
    return f"{100 * r[method]:.1f}" + ("" if ungated is None else f" (gate shut; ungated {100 * ungated:.1f})")


def gate_cell(r: dict[str, Any], methods: list[str]) -> str:
    scores = {r[f"{m}_gate_excess"] for m in methods if r.get(f"{m}_gate_excess") is not None}
    return "/".join(f"{x:.2f}" for x in sorted(scores))


def markdown(p: dict[str, Any], args: Any) -> str:
    res = p["results"]
    methods = [m for m in args.methods]
    where = "half the test split" if p["adapt_images"] >= p["scored_images"] else "drawn from one half of the test split"
    lines = [f"# Adaptation on corrupted clothing-small test images{' (validation corruptions)' if p['validation_corruptions'] else ''}",
             "", f"Adapt on {p['adapt_images']} unlabelled corrupted images ({where}), score top-1 on the other "
             f"{p['scored_images']}. Recovered = share of the accuracy lost to the corruption that the method wins back. "
             f"Options: {p['options'] or 'defaults'}; shift gate at {AdaptOptions(**p['options']).gate:g} (0: none; the gate "
             "column is the target's excess feature shift over same-size validation images, in units of the in-domain "
             "shift; edgetl.shift.shift_gate).", "",
             md_row(["corruption", "sev", "source", "shift gate", *methods, *(f"{m} recovered" for m in methods)]),
             md_row(["---"] * (4 + 2 * len(methods)))]  # fmt: skip
    clean = res["clean"]["source"]
    rec: dict[tuple[str, int], list[float]] = {}
    for key, r in res.items():
        name, sev = (key, 0) if key == "clean" else (key.split("/")[0], int(key.split("/")[1]))
        cells = [method_cell(r, m) for m in methods]
        recs = []
        for m in methods:
            share = share_won_back(clean, r["source"], r[m]) if m in r and key != "clean" else None
            if share is not None:
                rec.setdefault((m, sev), []).append(share)
            recs.append("" if share is None else f"{100 * share:.0f}%")
        lines.append(md_row([name, str(sev or "-"), f"{100 * r['source']:.1f}", gate_cell(r, methods), *cells, *recs]))
    if methods:
        lines += ["", "Mean share of the lost accuracy won back (corruptions that lost more than 1 point):", "",
                  md_row(["method", *(f"severity {s}" for s in args.severities)]), md_row(["---"] * (1 + len(args.severities)))]
    for m in methods:
        cells = [f"{100 * np.mean(rec[(m, s)]):.0f}% (n={len(rec[(m, s)])})" if rec.get((m, s)) else "" for s in args.severities]
        lines.append(md_row([m, *cells]))
    lines += ["", "Mean top-1 by severity:", "", md_row(["severity", "source", *methods]), md_row(["---"] * (2 + len(methods)))]
    for s in args.severities:
        rows = [r for k, r in res.items() if k.endswith(f"/{s}")]
        if rows:
            cells = [f"{100 * np.mean([r[m] for r in rows if m in r]):.1f}" if any(m in r for r in rows) else "" for m in methods]
            lines.append(md_row([str(s), f"{100 * np.mean([r['source'] for r in rows]):.1f}", *cells]))
    if "labelled" in p:
        ks = args.labelled_k
        lines += ["", f"Labelled fine-tune at severity 3 ({DEFAULT_METHOD}, then k labelled target images per class; top-1):", "",
                  "| corruption | unlabelled only | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---|---|" + "---|" * len(ks)]  # fmt: skip
        for name, row in p["labelled"].items():
            lines.append(f"| {name} | {100 * row['0']:.1f} | " + " | ".join(f"{100 * row[str(k)]:.1f}" for k in ks) + " |")
    if "int8" in p:
        fmt = args.int8_format
        lines += ["", f"int8 after adapting ({DEFAULT_METHOD}, severity 3; `edgetl adapt` -> `export --format {fmt}` -> `quantize "
                  f"--int8-target {args.int8_target} --max-drop {args.int8_max_drop:g}`, calibrated on half of the target images and "
                  "judged on the other half (expected top-1 drop with fp32's probabilities as labels; share of classes changed) and on "
                  f"the clean validation split; {fmt} in its own runtime on the scored half):", "",
                  "| corruption | fp32 | int8 | drop on the scored half (points) | judged: validation drop | judged: target drop "
                  "| target classes changed | nodes kept in float |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, r in p["int8"].items():
            if "refused" in r:
                lines.append(f"| {name} | | | refused: {r['refused']} | | | | |")
                continue
            kept = f"{len(r['kept_in_float'])} ({r['chosen_by']})" if r.get("kept_in_float") else "0"
            judged = f"{r['source_val_drop_points']:+.1f} | {r['target_expected_drop_points']:+.2f} | {r['target_changed_points']:.1f}%"
            lines.append(f"| {name} | {100 * r['fp32']:.1f} | {100 * r['int8']:.1f} | {r['drop_points']:+.1f} | {judged} | {kept} |")
    lines += ["", f"Wall time {p['seconds'] / 60:.0f} min."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
