"""`edgetl bench`: every model x precision x target, on real images, in one comparable table."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl import metadata
from edgetl.bench.base import TARGETS, Variant
from edgetl.bench.reference import AGREEMENT_MARGIN
from edgetl.bench.timing import flatten_rounds, latency_stats, ratio_by_round
from edgetl.errors import EdgetlError
from edgetl.hostinfo import physical_cores
from edgetl.metrics import classification_metrics
from edgetl.preprocess import PreprocessSpec
from edgetl.progress import Reporter

# Rounds of interleaved batch-1 turns (bench.timing.rounds_of_turns): each variant gets min_time / 5 per round.
TIMING_ROUNDS = 5


@dataclass(frozen=True)
class BenchOptions:
    data: str | None = None
    targets: tuple[str, ...] | None = None  # None: every available target
    batches: tuple[int, ...] = (1, 8, 32)
    threads: int | None = None
    warmup: int = 10
    min_time: float = 10.0
    out: str | None = None
    max_images: int = 1000
    input_size: int | None = None  # for models without edgetl metadata
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    isolation: str = "process"  # process: each variant in its own worker process; in-process: all in this one
    check_reference: bool = False  # also time ort-cpu / openvino-cpu rows with the runtimes' own tools
    allow_data_change: bool = False  # accuracy on the recorded validation list although the data folder changed

    def __post_init__(self) -> None:
        if self.isolation not in ("process", "in-process"):
            raise EdgetlError(f"--isolation must be process or in-process, got {self.isolation!r}")
        if self.threads is not None and self.threads < 1:
            raise EdgetlError(f"--threads must be at least 1 (leave it out for one per physical core), got {self.threads}")
        if self.warmup < 0:
            raise EdgetlError(f"--warmup is a number of untimed runs and cannot be negative, got {self.warmup}")
        if not (math.isfinite(self.min_time) and self.min_time > 0):
            raise EdgetlError(f"--min-time must be a positive number of seconds, got {self.min_time}")
        if self.max_images < 1:
            raise EdgetlError(f"--max-images must be at least 1, got {self.max_images}")


@dataclass
class ModelFile:
    path: Path
    kind: str  # checkpoint | onnx | openvino | litert | executorch
    precision: str
    input_dtype: str
    spec: PreprocessSpec
    labels: list[str] | None
    run_dir: Path | None

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size + (self.path.with_suffix(".bin").stat().st_size if self.kind == "openvino" else 0)


# ----------------------------------------------------------------------------- finding models


def describe_model(path: Path, opts: BenchOptions, run_dir: Path | None = None) -> ModelFile:
    if not path.is_file():
        raise EdgetlError(f"not a file: {path}")
    if path.suffix == ".pt":
        from edgetl import checkpoint

        ckpt = checkpoint.read(path)
        return ModelFile(path, "checkpoint", "fp32", "float32", checkpoint.spec_of(ckpt), list(ckpt["config"]["labels"]), run_dir)
    if path.suffix == ".onnx":
        from edgetl.backends.onnxruntime import OrtModel

        model = OrtModel(path)
        meta, kind = model.metadata, "onnx"
        graph = dict(input_name=model.input_name, input_shape=model.input_shape, input_type=model.input_type,
                     output_shape=model.output_shape)  # fmt: skip
    elif path.suffix == ".xml":
        from edgetl.backends.openvino import read_metadata

        meta, kind, graph = read_metadata(path), "openvino", {}
    elif path.suffix == ".tflite":
        from edgetl.backends.litert import read_metadata as read_tflite_metadata

        meta, kind, graph = read_tflite_metadata(path), "litert", {}
    elif path.suffix == ".pte":
        from edgetl.backends.executorch import read_metadata as read_pte_metadata

        meta, kind, graph = read_pte_metadata(path), "executorch", {}
    else:
        raise EdgetlError(f"{path} is not a model edgetl can benchmark (.pt checkpoint, .onnx, OpenVINO .xml, LiteRT .tflite "
                          "or ExecuTorch .pte)")  # fmt: skip
    if "labels" in meta:
        spec, labels = metadata.validate(meta, str(path), **graph), metadata.labels_from(meta)
    elif opts.input_size and opts.mean and opts.std:
        size = opts.input_size
        spec, labels = PreprocessSpec(size, int(size / 0.875), "bilinear", opts.mean, opts.std), None
    else:
        raise EdgetlError(f"{path} has no edgetl metadata: pass --input-size, --mean and --std to benchmark it")
    quant = json.loads(meta["quantization"]) if "quantization" in meta else None
    precision = "int8" if quant else ("fp16" if "fp16" in path.parent.name else "fp32")
    return ModelFile(path, kind, precision, meta.get("dtype", "float32"), spec, labels, run_dir)


def discover(paths: list[Path], opts: BenchOptions) -> tuple[list[ModelFile], list[dict[str, str]]]:
    """The models to benchmark, and the ones left out with the reason: in a run (or export) folder,
    only models of the run's current checkpoint count; an older one is listed as skipped."""
    from edgetl import run as runfolder

    files: list[ModelFile] = []
    skipped: list[dict[str, str]] = []
    for p in paths:
        if p.is_dir():
            folder, out_dir = runfolder.export_folder_run(p)
            found = []
            if out_dir == folder.path and folder.checkpoint_path.is_file():
                found.append(describe_model(folder.checkpoint_path, opts, folder.path))
            for m in folder.models(out_dir):
                stale = folder.stale_reason(m)
                if stale:
                    skipped.append({"target": str(m.path), "reason": f"stale: {stale}"})
                else:
                    found.append(describe_model(m.path, opts, folder.path))
            if not found:
                raise EdgetlError(f"{p} holds no checkpoint or current exported model" +
                                  (f" ({skipped[-1]['reason']})" if skipped else ""))  # fmt: skip
            files += found
        elif p.exists():
            files.append(describe_model(p, opts))
        else:
            raise EdgetlError(f"path does not exist: {p}")
    # Models with different preprocessing (another input size, say) are fine side by side: each is scored
    # on the same images prepared its own way, and timed on its own input (load_data, bench).
    return files, skipped


def plan(files: list[ModelFile], opts: BenchOptions, skipped: list[dict[str, str]] | None = None
         ) -> tuple[list[tuple[Variant, ModelFile]], list[dict[str, str]]]:  # fmt: skip
    from edgetl.bench import targets as _  # noqa: F401 - registers the built-in targets

    if opts.targets:
        unknown = [t for t in opts.targets if t not in TARGETS]
        if unknown:
            raise EdgetlError(f"unknown target {unknown[0]!r}; targets: {', '.join(TARGETS)}")
    names = opts.targets or tuple(t for t in TARGETS if t != "torch-cpu-compile")
    variants: list[tuple[Variant, ModelFile]] = []
    skipped = list(skipped or [])
    for name in names:
        target = TARGETS[name]
        ok, why = target.available()
        if not ok:
            skipped.append({"target": name, "reason": why})
            continue
        for f in files:
            if f.kind in target.kinds:
                for precision in target.precisions(f.precision):
                    note = "uint8 input" if f.input_dtype == "uint8" else ("fp16 weights" if f.precision == "fp16" else "")
                    variants.append((Variant(name, f.path, f.kind, precision, f.input_dtype, note), f))
    if not variants:
        raise EdgetlError("nothing to benchmark: no available target runs these models" +
                          (f" (skipped: {'; '.join(s['target'] + ': ' + s['reason'] for s in skipped)})" if skipped else ""))  # fmt: skip
    return variants, skipped


# ----------------------------------------------------------------------------- data


def specs_of(files: list[ModelFile]) -> list[PreprocessSpec]:
    """The distinct preprocessings of the models, in the order the models were given."""
    return list(dict.fromkeys(f.spec for f in files))


def load_data(files: list[ModelFile], opts: BenchOptions, reporter: Reporter) -> Any:
    """Labelled images for accuracy: every image of --data (a plain folder; test, else val, of a
    dataset), or the run's recorded validation list; the same images prepared once per preprocessing
    the models use, as (data by spec, labels). None when neither is available."""
    from edgetl.parity import run_split_data, scoring_data
    from edgetl.run import RunFolder

    labels = next((f.labels for f in files if f.labels), None)
    orders = {tuple(f.labels) for f in files if f.labels}
    if len(orders) > 1:
        # One set of labelled images is scored against every model: the class indices must mean the same.
        raise EdgetlError("the models given have different labels (or label orders): benchmark them separately")
    if opts.data:
        if labels is None:
            from edgetl.data import scoring_set

            labels = scoring_set(opts.data)[1]
        data = {spec: scoring_data(opts.data, labels, spec, reporter, opts.max_images) for spec in specs_of(files)}
    else:
        run_dir = next((f.run_dir for f in files if f.run_dir), None)
        if run_dir is None or labels is None:
            return None
        folder = RunFolder(run_dir)
        if not folder.data_root.exists():
            return None
        _check_same_validation(folder, [f.run_dir for f in files if f.run_dir])
        data = {spec: run_split_data(folder, "val", labels, spec, reporter, opts.max_images, allow_changed=opts.allow_data_change)
                for spec in specs_of(files)}  # fmt: skip
    first = next(iter(data.values()))
    if any(d.keys != first.keys or not np.array_equal(d.labels, first.labels) for d in data.values()):
        # Sampling is seeded and decoding keeps the order, so this would be a bug: never score two models on different images.
        raise EdgetlError("internal error: the images prepared for the models' preprocessings differ; please report it")
    reporter.log(f"accuracy on {first.source}: {len(first.labels)} images" +
                 (f", prepared {len(data)} ways (input sizes {', '.join(str(s.input_size) for s in data)})" if len(data) > 1 else ""))
    return data, labels


def _check_same_validation(first: Any, run_dirs: list[Path]) -> None:
    """Models of several runs are scored on the first run's recorded validation images; that is fair only
    when every run recorded the same ones (another run may have trained on them)."""
    from edgetl.run import RunFolder

    def val_images(folder: Any) -> tuple[Any, ...]:
        rec = folder.split_record()
        return rec["root"], rec.get("fingerprint"), tuple(tuple(item[:2]) for item in rec["splits"].get("val", []))

    mine = val_images(first)
    for d in dict.fromkeys(run_dirs):
        if d != first.path and val_images(RunFolder(d)) != mine:
            raise EdgetlError(f"{first.path} and {d} recorded different validation images (or data): scoring both on one "
                              "run's would score the other on images it may have trained on; benchmark them separately "
                              "or give --data a folder neither trained on")  # fmt: skip


def variant_names(variants: list[tuple[Variant, ModelFile]]) -> list[str]:
    """A row name per variant, unique: the target/precision, plus the model's run folder (or file) when
    several models give the same one (two runs benchmarked side by side)."""
    plain = [v.name for v, _ in variants]
    counts = {n: plain.count(n) for n in plain}

    def source(v: Variant, f: ModelFile) -> str:
        return f.run_dir.name if f.run_dir is not None else v.model.name

    named = [f"{n} [{source(v, f)}]" if counts[n] > 1 else n for n, (v, f) in zip(plain, variants, strict=True)]
    # Two run folders of the same name in different places: fall back to the model's full path.
    return [f"{plain[i]} [{v.model}]" if named.count(n) > 1 else n for i, (n, (v, _)) in enumerate(zip(named, variants, strict=True))]


def _fixed_batch(v: Variant) -> int | None:
    if v.kind == "executorch":  # edgetl lowers ExecuTorch programs for batch 1
        return 1
    if v.kind != "onnx":
        return None
    import onnx

    dim = onnx.load(str(v.model), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value or None


# ----------------------------------------------------------------------------- the benchmark


def bench(paths: list[str | os.PathLike[str]], opts: BenchOptions, reporter: Reporter | None = None) -> dict[str, Any]:
    import tempfile

    from edgetl.bench.isolation import ArrayFiles, InProcessWorker, ProcessWorker, close_all, interleaved_rounds_by_round
    from edgetl.hostinfo import host_record
    from edgetl.malloc_tuning import tune_malloc

    tune_malloc()
    reporter = reporter or Reporter()
    files, stale = discover([Path(p) for p in paths], opts)
    variants, skipped = plan(files, opts, stale)
    threads = opts.threads or physical_cores()
    loaded = load_data(files, opts, reporter)
    if loaded is None:
        reporter.warn("no labelled images (the run's data is not here and no --data): accuracy is left out", label="note")
    # The batch-1 input of each preprocessing: the first scored image prepared that way (zeros without data).
    x1: dict[PreprocessSpec, dict[str, np.ndarray]] = {}
    for spec in specs_of(files):
        c = spec.input_size
        x1[spec] = {"float32": np.zeros((1, 3, c, c), np.float32), "uint8": np.zeros((1, c, c, 3), np.uint8)}
        if loaded is not None:
            data = loaded[0][spec]
            x1[spec] = {"float32": np.ascontiguousarray(data.floats[:1]), "uint8": np.ascontiguousarray(data.pixels[:1])}
    make = ProcessWorker if opts.isolation == "process" else InProcessWorker
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgetl-bench-") as tmp:
        arrays = ArrayFiles(Path(tmp))
        workers: dict[str, tuple[Any, Variant, ModelFile]] = {}
        try:
            # One at a time, so no load (and no cold start) competes with another for the cores.
            for name, (v, f) in zip(variant_names(variants), variants, strict=True):
                reporter.log(f"loading {name}: {v.model}" + (" (own process)" if opts.isolation == "process" else ""))
                w = make(v, x1[f.spec][v.input_dtype].shape, threads, arrays)
                if w.error:
                    skipped.append({"target": name, "reason": w.error})
                    w.close()
                    continue
                workers[name] = (w, v, f)
            if not workers:
                raise EdgetlError("every variant failed to load: " + "; ".join(s["reason"] for s in skipped))
            results = _measure(workers, loaded, x1, threads, opts, reporter, interleaved_rounds_by_round)
        finally:
            close_all([w for w, _, _ in workers.values()])
    report = {
        "models": [str(f.path) for f in files], "data": next(iter(loaded[0].values())).describe() if loaded is not None else None,
        "options": {**asdict(opts), "threads": threads}, "skipped": skipped, "results": results, "host": host_record(),
        "method": ("each variant in a worker process of its own, turns interleaved in rounds (one worker at a time)"
                   if opts.isolation == "process" else "every variant in one process, interleaved in rounds"),
    }  # fmt: skip
    out_dir = Path(opts.out) if opts.out else next((f.run_dir for f in files if f.run_dir), Path("."))
    from edgetl.report import write_bench_files

    report["files"] = write_bench_files(report, out_dir)
    return report


def _source(f: ModelFile) -> str:
    """Which run a model belongs to ("" for model files given by path: compared with each other, as before)."""
    return str(f.run_dir) if f.run_dir is not None else ""


def _same_model(a: ModelFile, b: ModelFile) -> bool:
    """Files of one model: the same run (or both given by path) and the same preprocessing."""
    return _source(a) == _source(b) and a.spec == b.spec


def _reference_turns(workers: dict[str, Any], timed: dict[str, Any], x1: dict[PreprocessSpec, dict[str, np.ndarray]],
                     threads: int, opts: BenchOptions) -> dict[str, Any]:  # fmt: skip
    """--check-reference: a turn of the runtime's own tool for each batch-1 variant that has one."""
    if not opts.check_reference:
        return {}
    from edgetl.bench.reference import ReferenceTurns, has_reference

    seconds = max(2.0, opts.min_time / 2)
    return {n: ReferenceTurns(v.target, Path(v.model), threads, v.precision, v.input_dtype, x1[f.spec][v.input_dtype].shape,
                              seconds, TIMING_ROUNDS)
            for n, (_, v, f) in workers.items() if n in timed and has_reference(v.target)}  # fmt: skip


def _measure(workers: dict[str, Any], loaded: Any, x1: dict[PreprocessSpec, dict[str, np.ndarray]], threads: int,
             opts: BenchOptions, reporter: Reporter, interleaved_rounds_by_round: Any) -> list[dict[str, Any]]:  # fmt: skip
    # Accuracy on real images (each model on them prepared its own way), and agreement with the fp32 PyTorch
    # model (or the fp32 ONNX model).
    preds: dict[str, np.ndarray] = {}
    ref_name = None
    if loaded is not None:
        by_spec, labels = loaded
        for name, (w, v, f) in workers.items():
            data = by_spec[f.spec]
            preds[name] = w.predict(data.pixels if v.input_dtype == "uint8" else data.floats, _fixed_batch(v))

    def agreement_reference(f: ModelFile) -> str | None:
        """The fp32 PyTorch model (or fp32 ONNX model) of the same run: agreement across runs means nothing."""
        mine = [(n, v) for n, (_, v, g) in workers.items() if n in preds and _same_model(g, f) and v.precision == "fp32"]
        return next((n for n, v in mine if v.target == "torch-cpu"),
                    next((n for n, v in mine if v.target == "ort-cpu" and v.input_dtype == "float32"), None))  # fmt: skip

    # Latency at batch 1: each variant on its own input type (float or uint8 pixels) of the same image.
    timed = {n: w for n, (w, v, _) in workers.items() if _fixed_batch(v) in (None, 1)}
    references = _reference_turns(workers, timed, x1, threads, opts)
    reporter.log(f"timing batch 1: {len(timed)} variants, interleaved rounds, >= {opts.min_time:g} s each, {threads} threads"
                 + (f", with {len(references)} runtimes' own tools in the same rounds" if references else ""))  # fmt: skip
    by_round = interleaved_rounds_by_round(timed, {n: x1[workers[n][2].spec][workers[n][1].input_dtype] for n in timed}, opts.min_time,
                                           opts.warmup, rounds=TIMING_ROUNDS,
                                           extra_turns={f"reference: {n}": t for n, t in references.items()})  # fmt: skip
    samples = flatten_rounds(by_round)

    results = []
    for name, (w, v, f) in workers.items():
        row: dict[str, Any] = {"variant": name, "source": _source(f), "target": v.target, "runtime": v.runtime,
                               "precision": v.precision, "input_size": f.spec.input_size,
                               "executed_precision": w.info.get("executed_precision", v.precision), "model": str(v.model),
                               "input": v.input_dtype, "bytes": f.bytes, "threads": threads,
                               "runtime_settings": w.info.get("settings")}  # fmt: skip
        if name in samples:
            row["latency"] = latency_stats(samples[name])
        if name in references:
            ref = row["reference"] = references[name].result(row["latency"]["p50_ms"])
            measured = f"p50 {ref['p50_ms']:.2f} ms over {ref['turns']} turns" if "p50_ms" in ref else f"not measured ({ref['error']})"
            reporter.log(f"reference for {name}: {ref.get('tool')} {measured}")
            if ref.get("verdict", "agrees") != "agrees":
                side = "slower" if ref["verdict"] == "edgetl-slower" else "faster"
                reporter.log(f"warning: edgetl's p50 for {name} ({row['latency']['p50_ms']:.2f} ms) is {side} than every turn of "
                             f"{ref['tool']} allows ({min(ref['turn_p50_ms']):.2f}-{max(ref['turn_p50_ms']):.2f} ms, "
                             f"± {AGREEMENT_MARGIN:.0%}): " + ("edgetl adds time the runtime does not need" if side == "slower"
                             else "the two do not time the same work") + "; see bench.json 'reference'")  # fmt: skip
        fixed = _fixed_batch(v)
        c = f.spec.input_size
        row["throughput"] = {}
        for b in opts.batches:
            if b > 1 and fixed in (None, b):
                rng = np.random.default_rng(0)
                xb = (rng.integers(0, 255, (b, c, c, 3), dtype=np.uint8) if v.input_dtype == "uint8"
                      else rng.normal(size=(b, 3, c, c)).astype(np.float32))  # fmt: skip
                row["throughput"][str(b)] = w.throughput(xb, max(0.5, opts.min_time / 5))
        if loaded is not None:
            m = classification_metrics(preds[name], by_spec[f.spec].labels, labels)
            row["accuracy"] = {"n": m["n"], "top1": m["top1"], "top5": m["top5"], "macro_f1": m["macro_f1"]}
            ref_name = agreement_reference(f)
            if ref_name:
                row["accuracy"]["agreement_with"] = ref_name
                row["accuracy"]["top1_agreement"] = float((preds[name].argmax(1) == preds[ref_name].argmax(1)).mean())
        if "cold_ms" in w.info:
            row["process"] = {k: w.info[k] for k in ("pid", "load_seconds", "cold_ms", "peak_rss_mb")}
        else:
            row["process"] = {"pid": w.info["pid"], "load_seconds": w.info["load_seconds"]}
        results.append(row)

    # Speed relative to the fp32 model of the same runtime (eager for torch.compile), the same run and the same
    # input size, from the same interleaved rounds.
    for row in results:
        ref = next((r for r in results if r["target"] == row["runtime"] and r["precision"] == "fp32" and r["input"] == "float32"
                    and r["source"] == row["source"] and r["input_size"] == row["input_size"] and "latency" in r), None)  # fmt: skip
        if ref and "latency" in row:
            row["ratio_to_fp32_same_target"] = row["latency"]["p50_ms"] / ref["latency"]["p50_ms"]
            # The same ratio in each round: how far it moved within this run (a shared machine's drift).
            row["ratio_to_fp32_by_round"] = ratio_by_round(by_round[row["variant"]], by_round[ref["variant"]])
    return results
