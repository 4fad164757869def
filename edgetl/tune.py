"""`edgetl tune`: the most accurate model within a device's latency (and size) budget.

Candidates are backbones x input sizes x precisions x runtime targets. Each (backbone, size) gets a
*probe*: a normal `edgetl train --recipe head` run (frozen ImageNet base, new head trained on cached
features: seconds to minutes), exported to ONNX and OpenVINO, quantized to int8 from a small
calibration sample, and measured by `edgetl bench` on this machine. A probe is a complete run folder,
so its numbers come through the same contract as any run's: the probe's validation top-1 in each
runtime and precision is the accuracy proxy (an int8 candidate carries its own int8 drop), and its
batch-1 p50 is the latency (the head does not change latency). The pick is the candidate with the
best proxy within the budget; unless --no-final, it is then trained in full (recipe auto), exported
in its runtime's format (+ int8 when picked) and benchmarked: a normal run folder beside the probes.

Probes that finished are reused when tune runs again on the same data (their run folders are
complete), so an interrupted tune loses at most the probe it was in.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgetl.backbones import find_weights, get_entry, list_backbones
from edgetl.errors import EdgetlError, TrainingInterrupted
from edgetl.fileio import write_json, write_text
from edgetl.hostinfo import host_lines, host_record
from edgetl.progress import Reporter

# Input sizes tried by default: up to the backbone's pretrained size, in steps of 32 px (the networks'
# total stride), plus the pretrained size itself.
DEFAULT_SIZES = {"efficientnet_lite0": (160, 192, 224), "efficientnet_lite1": (192, 240), "efficientnet_lite2": (224, 260)}
OTHER_SIZES = (160, 192, 224)
TARGET_FORMATS = {"ort-cpu": "onnx", "openvino-cpu": "openvino", "litert-cpu": "litert", "executorch-cpu": "executorch"}
DEFAULT_TARGETS = ("ort-cpu", "openvino-cpu")
PRECISIONS = ("fp32", "bf16", "int8")
# Per probe, beyond feature extraction: decode, head training, export with parity, int8, bench. Fitted to
# the first clothing-small tune (7 probes, 45-55 s each beyond the extraction estimate).
PROBE_FIXED_SECONDS = 50.0


@dataclass(frozen=True)
class TuneOptions:
    max_latency_ms: float
    max_size_mb: float | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS
    backbones: tuple[str, ...] | None = None  # None: every registered backbone with ImageNet weights here
    sizes: tuple[int, ...] | None = None  # None: DEFAULT_SIZES per backbone
    precisions: tuple[str, ...] = ("fp32", "bf16", "int8")  # bf16 only where the CPU has it (OpenVINO)
    out: str | None = None
    seed: int = 0
    pretrained: bool = True  # False: train from scratch (no ImageNet weights needed; the tiny test backbone)
    min_time: float = 4.0  # bench seconds per variant
    final: bool = True
    dry_run: bool = False

    def __post_init__(self) -> None:
        # `not x > 0` also refuses nan, which no latency is below: every candidate would be out of budget.
        if not (self.max_latency_ms > 0 and math.isfinite(self.max_latency_ms)):
            raise EdgetlError(f"--max-latency-ms must be a number of milliseconds above 0, got {self.max_latency_ms}")
        if self.max_size_mb is not None and not (self.max_size_mb > 0 and math.isfinite(self.max_size_mb)):
            raise EdgetlError(f"--max-size-mb must be a number of megabytes above 0, got {self.max_size_mb}")
        unknown = [t for t in self.targets if t not in TARGET_FORMATS]
        if unknown:
            raise EdgetlError(f"tune measures CPU targets {', '.join(TARGET_FORMATS)}; unknown: {', '.join(unknown)}")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise EdgetlError(f"--precisions takes {', '.join(PRECISIONS)}; got {', '.join(bad)}")
        for b in self.backbones or ():
            get_entry(b)  # an unknown name fails now with the list of known ones
        if self.sizes and any(not 32 <= s <= 512 for s in self.sizes):
            raise EdgetlError("--sizes must be from 32 to 512 pixels")
        if not (self.min_time > 0 and math.isfinite(self.min_time)):
            raise EdgetlError(f"--min-time must be a number of seconds above 0, got {self.min_time}")


@dataclass
class Probe:
    backbone: str
    size: int
    macs: int = 0
    run_dir: str = ""
    probe_top1: float | None = None
    seconds: float = 0.0
    reused: bool = False
    error: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)


def plan_probes(opts: TuneOptions) -> tuple[list[Probe], list[dict[str, str]]]:
    """The (backbone, size) probes to run, and the backbones left out with the reason."""
    from edgetl.profile import count_macs_and_params

    names = list(opts.backbones) if opts.backbones else [e.name for e in list_backbones() if not e.is_test_entry]
    probes, skipped = [], []
    for name in names:
        if opts.pretrained and find_weights(name) is None:
            skipped.append({"backbone": name, "reason": "no ImageNet weights on this machine (weights package or timm cache)"})
            continue
        for size in opts.sizes or DEFAULT_SIZES.get(name, OTHER_SIZES):
            probes.append(Probe(name, size, macs=count_macs_and_params(name, size)[0]))
    if not probes:
        reasons = "; ".join(f"{s['backbone']}: {s['reason']}" for s in skipped)
        raise EdgetlError(f"no candidate backbone has ImageNet weights here: {reasons}")
    return probes, skipped


def estimate_seconds(probes: list[Probe], n_images: int) -> dict[str, float]:
    """Seconds per probe: feature extraction timed on this machine (one batch of 16 through a
    randomly initialised backbone at that size) times the images, plus a fixed share for the rest."""
    import timm
    import torch

    out = {}
    for p in probes:
        model = timm.create_model(get_entry(p.backbone).timm_id, pretrained=False, num_classes=0).eval()
        x = torch.zeros(16, 3, p.size, p.size)
        with torch.inference_mode():
            model(x)
            t = time.perf_counter()
            model(x)
            per_image = (time.perf_counter() - t) / 16
        out[f"{p.backbone}@{p.size}"] = n_images * per_image + PROBE_FIXED_SECONDS
    return out


def count_images(data: Path, seed: int) -> int:
    """The training + validation images the probes will use, listed by training's own loader (no
    decoding): a folder edgetl cannot train on fails here, before any probe."""
    from edgetl.data import load_dataset

    ds = load_dataset(data, seed=seed)
    return len(ds.train) + len(ds.val)


# ----------------------------------------------------------------------------- probes


def reuse_refusal(run_dir: Path, data: Path, p: Probe, opts: TuneOptions) -> str | None:
    """Why a probe folder from an earlier tune cannot be reused (None: it can): unfinished, another
    data folder, data that changed since (the run folder's recorded lists), or other settings."""
    from edgetl.run import RunFolder

    manifest = run_dir / "manifest.json"
    if not (manifest.is_file() and json.loads(manifest.read_text()).get("status") == "finished" and (run_dir / "bench.json").is_file()):
        return "unfinished"
    folder = RunFolder.open(run_dir)
    if folder.data_root.resolve() != data.resolve():
        return f"made from {folder.data_root}"
    changed = folder.check_data()
    if changed:
        return f"the data changed since: {changed.summary()}"
    cfg = folder.manifest.get("config", {})
    wanted = {"backbone": p.backbone, "input_size": p.size, "seed": opts.seed, "pretrained": opts.pretrained}
    differs = [k for k, v in wanted.items() if k in cfg and cfg[k] != v]
    results = json.loads((run_dir / "bench.json").read_text())["results"]
    bench_targets = {r["target"] for r in results}
    if differs or not set(opts.targets) <= bench_targets:
        return "made with other settings (" + ", ".join(differs or ["targets"]) + ")"
    # A probe made for fp32 alone has no int8 models; reusing it would silently drop the int8 candidates.
    if "int8" in opts.precisions and not {r["target"] for r in results if r["precision"] == "int8"} >= set(opts.targets):
        return "made without int8 models"
    return None


def run_probe(data: str, p: Probe, opts: TuneOptions, folder: Path, reporter: Reporter) -> None:
    from edgetl.bench.runner import BenchOptions, bench
    from edgetl.config import TrainConfig
    from edgetl.export import ExportOptions, export_run
    from edgetl.quantize import QuantizeOptions, quantize_run
    from edgetl.train import train

    run_dir = folder / "probes" / f"{p.backbone}-{p.size}"
    p.run_dir = str(run_dir)
    t0 = time.perf_counter()
    quiet = Reporter(quiet=True)
    refusal = reuse_refusal(run_dir, Path(data), p, opts) if run_dir.exists() else "new"
    if refusal is None:
        p.reused = True
    else:
        if run_dir.exists():
            import shutil

            reporter.log(f"probe {p.backbone}@{p.size} is made again: the earlier one is {refusal}")
            shutil.rmtree(run_dir)
        cfg = TrainConfig(backbone=p.backbone, input_size=p.size, recipe="head", seed=opts.seed, pretrained=opts.pretrained)
        train(data, cfg, out=str(run_dir), reporter=quiet)
        formats = sorted({TARGET_FORMATS[t] for t in opts.targets})
        export_run(run_dir, ExportOptions(format=",".join(formats), parity_samples=64), quiet)
        if "int8" in opts.precisions:
            # Every int8 model is kept whatever its drop: the drop is part of the candidate's accuracy.
            quantize_run(run_dir, QuantizeOptions(format=",".join(formats), calib_size=64, latency_runs=10, max_drop=100.0), quiet)
        bench([run_dir], BenchOptions(targets=opts.targets, batches=(1,), min_time=opts.min_time, warmup=10), quiet)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    p.probe_top1 = metrics["stages"]["head"]["best_val_top1"]
    report = json.loads((run_dir / "bench.json").read_text())
    for r in report["results"]:
        if r["precision"] not in opts.precisions or "latency" not in r:
            continue
        p.rows.append({
            "backbone": p.backbone, "size": p.size, "target": r["target"], "precision": r["precision"],
            "p50_ms": r["latency"]["p50_ms"], "p90_ms": r["latency"]["p90_ms"], "mb": r["bytes"] / 1e6,
            "top1": (r.get("accuracy") or {}).get("top1"), "macs": p.macs, "model": r["model"],
        })  # fmt: skip
    p.seconds = time.perf_counter() - t0 if not p.reused else p.seconds
    reporter.log(f"probe {p.backbone}@{p.size}: val top-1 {p.probe_top1:.2%}" + (" (reused)" if p.reused else f", {p.seconds:.0f} s"))


def within_budget(row: dict[str, Any], max_latency_ms: float, max_size_mb: float | None) -> bool:
    return row["p50_ms"] <= max_latency_ms and (max_size_mb is None or row["mb"] <= max_size_mb)


def pick(rows: list[dict[str, Any]], max_latency_ms: float, max_size_mb: float | None = None) -> dict[str, Any] | None:
    """The most accurate candidate within the budget; equal accuracy: the faster one."""
    ok = [r for r in rows if r["top1"] is not None and within_budget(r, max_latency_ms, max_size_mb)]
    return max(ok, key=lambda r: (round(r["top1"], 6), -r["p50_ms"])) if ok else None


def label(row: dict[str, Any]) -> str:
    name = row["backbone"].replace("efficientnet_", "").replace("mobilenet", "mnet")
    return f"{name}@{row['size']} {row['target'].replace('-cpu', '')} {row['precision']}"


# ----------------------------------------------------------------------------- outputs


def plot_tune(rows: list[dict[str, Any]], budget_ms: float, chosen: dict[str, Any] | None, target: Path) -> None:
    """Proxy accuracy against latency: colour = backbone@size, marker = runtime and precision, the
    Pareto front drawn and labelled (only its points: 30 labels would not be readable), the budget
    as a vertical line, the pick circled."""
    from edgetl.fileio import write_with
    from edgetl.plots import _pyplot
    from edgetl.report import pareto_front, place_labels

    rows = [r for r in rows if r["top1"] is not None]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 6))
    pts = [(r["p50_ms"], r["top1"]) for r in rows]
    front = sorted(pareto_front(pts), key=lambda i: pts[i][0])
    probes = sorted({(r["backbone"], r["size"]) for r in rows})
    colours = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(probes)}
    kinds = sorted({(r["target"], r["precision"]) for r in rows})
    markers = {k: "osD^vP*X"[i % 8] for i, k in enumerate(kinds)}
    for i, r in enumerate(rows):
        ax.scatter([pts[i][0]], [pts[i][1]], s=40, color=colours[(r["backbone"], r["size"])],
                   marker=markers[(r["target"], r["precision"])], zorder=3, edgecolors="black", linewidths=0.4)  # fmt: skip
    ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", ls="--", color="tab:orange", lw=1.5,
            label="Pareto front (nothing both faster and more accurate)")  # fmt: skip
    ax.axvline(budget_ms, color="tab:red", lw=1.5, label=f"latency budget {budget_ms:g} ms")
    if chosen:
        ax.scatter([chosen["p50_ms"]], [chosen["top1"]], s=280, facecolors="none", edgecolors="tab:red", lw=2, zorder=4,
                   label=f"pick: {label(chosen)}")  # fmt: skip
    for k in probes:  # legend-only handles
        ax.scatter([], [], color=colours[k], marker="o", label=f"{k[0].replace('efficientnet_', '')}@{k[1]}")
    for k in kinds:
        ax.scatter([], [], color="grey", marker=markers[k], label=f"{k[0].replace('-cpu', '')} {k[1]}")
    xs, ys = [p[0] for p in pts] + [budget_ms], [p[1] for p in pts]
    ax.set_xlim(0, max(xs) * 1.1)
    ax.set_ylim(min(ys) - 0.02, max(ys) + 0.02)
    ax.set(xlabel="batch-1 latency p50 on this machine (ms)", ylabel="proxy: probe validation top-1",
           title="edgetl tune: candidates (labels on the Pareto front)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    place_labels(ax, [pts[i] for i in front], [label(rows[i]) for i in front], fontsize=7)
    write_with(target, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def tune_markdown(report: dict[str, Any]) -> str:
    opts = report["options"]
    budget = f"p50 <= {opts['max_latency_ms']:g} ms" + (f", size <= {opts['max_size_mb']:g} MB" if opts["max_size_mb"] else "")
    lines = [f"# edgetl tune: {report['data']} ({budget})", "",
             "| candidate | MMACs | p50 ms | p90 ms | MB | proxy top-1 | in budget |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(report["candidates"], key=lambda r: r["p50_ms"]):
        star = " **pick**" if report["pick"] and label(r) == label(report["pick"]) else ""
        top1 = f"{r['top1']:.2%}" if r["top1"] is not None else "-"
        lines.append(f"| {label(r)}{star} | {r['macs'] / 1e6:.0f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['mb']:.1f} | {top1} | "
                     f"{'yes' if r['in_budget'] else 'no'} |")  # fmt: skip
    lines.append("")
    reused = sum(1 for p in report["probes"] if p.get("reused"))
    lines.append(f"Probes: {len(report['probes'])}" + (f" ({reused} reused from an earlier tune in this folder)" if reused else "")
                 + f", wall time {report['tune_seconds'] / 60:.1f} min (excluding the final training).")  # fmt: skip
    for s in report["skipped"]:
        lines.append(f"- left out {s['backbone']}: {s['reason']}")
    lines += ["", *host_lines(report["host"])]
    if report.get("final"):
        f = report["final"]
        probe = f.get("probe_p50_ms_same_rounds")
        lines.append(f"\nFinal run `{f['run_dir']}`: validation top-1 {f['top1']:.2%} (proxy {report['pick']['top1']:.2%}), "
                     f"p50 {f['p50_ms']:.2f} ms" + (f" (its probe in the same rounds: {probe:.2f} ms)" if probe else "")
                     + ("" if f.get("in_budget", True) else " **over the budget in this measurement**")
                     + f", {f['seconds'] / 60:.1f} min.")  # fmt: skip
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the command


def tune(data: str | os.PathLike[str], opts: TuneOptions, reporter: Reporter | None = None) -> dict[str, Any]:
    reporter = reporter or Reporter()
    data_path = Path(data)
    if not data_path.exists():
        raise EdgetlError(f"no data at {data_path}")
    # Beside training's run folders (models/); a second tune of the same data reuses its finished probes.
    folder = Path(opts.out) if opts.out else Path("models") / f"tune-{data_path.resolve().name}"
    probes, skipped = plan_probes(opts)
    if opts.dry_run:
        n = count_images(data_path, opts.seed)
        est = estimate_seconds(probes, n)
        return {"dry_run": True, "folder": str(folder), "images": n, "skipped": skipped,
                "probes": [{"backbone": p.backbone, "size": p.size, "macs": p.macs, "estimated_seconds": est[f"{p.backbone}@{p.size}"]}
                           for p in probes],
                "candidates_per_probe": len(opts.targets) * len(opts.precisions),
                "estimated_seconds": sum(est.values())}  # fmt: skip
    count_images(data_path, opts.seed)  # bad data is one clear error now, not the same error from every probe
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, p in enumerate(probes, 1):
        reporter.log(f"[{i}/{len(probes)}] probing {p.backbone} at {p.size} px")
        try:
            run_probe(str(data_path), p, opts, folder, reporter)
        except (KeyboardInterrupt, TrainingInterrupted):
            done = sum(1 for q in probes[: i - 1] if q.error is None)
            raise EdgetlError(f"interrupted: {done} finished probe(s) are kept in {folder / 'probes'}; run the same "
                              "`edgetl tune` again to go on from there", exit_code=130) from None  # fmt: skip
        except EdgetlError as exc:
            p.error = str(exc)
            reporter.warn(str(exc), label=f"probe {p.backbone}@{p.size} failed")
    tune_seconds = time.perf_counter() - t0
    rows = [r for p in probes for r in p.rows]
    if not rows:
        raise EdgetlError("no probe produced a measured candidate: " + "; ".join(f"{p.backbone}@{p.size}: {p.error}" for p in probes))
    for r in rows:
        r["in_budget"] = within_budget(r, opts.max_latency_ms, opts.max_size_mb)
    chosen = pick(rows, opts.max_latency_ms, opts.max_size_mb)
    report: dict[str, Any] = {
        # Latencies are this machine's: the record names it (CPU flags decide int8 and bf16 speed).
        "data": str(data_path), "options": asdict(opts), "skipped": skipped, "tune_seconds": tune_seconds, "host": host_record(),
        "probes": [{k: v for k, v in asdict(p).items() if k != "rows"} for p in probes], "candidates": rows, "pick": chosen,
        "method": "accuracy proxy: validation top-1 of a stage-1 probe (frozen base, head on cached features) in the "
                  "candidate's own runtime and precision; latency: edgetl bench batch-1 p50 of the probe's exported model",
    }  # fmt: skip
    _write(report, folder)
    if chosen is None:
        fastest = min(rows, key=lambda r: r["p50_ms"])
        raise EdgetlError(f"no candidate fits the budget; the fastest is {label(fastest)} at {fastest['p50_ms']:.2f} ms, "
                          f"{fastest['mb']:.1f} MB (table: {folder / 'tune.md'})", exit_code=1)  # fmt: skip
    reporter.log(f"pick: {label(chosen)}: proxy top-1 {chosen['top1']:.2%}, p50 {chosen['p50_ms']:.2f} ms")
    if opts.final:
        report["final"] = train_pick(str(data_path), chosen, opts, folder, reporter)
        _write(report, folder)
    return report


def _write(report: dict[str, Any], folder: Path) -> None:
    write_json(folder / "tune.json", report)
    write_text(folder / "tune.md", tune_markdown(report))
    plot_tune(report["candidates"], report["options"]["max_latency_ms"], report["pick"], folder / "tune.png")
    report["files"] = {"json": str(folder / "tune.json"), "markdown": str(folder / "tune.md"), "plot": str(folder / "tune.png")}


def train_pick(data: str, chosen: dict[str, Any], opts: TuneOptions, folder: Path, reporter: Reporter) -> dict[str, Any]:
    """Full training (recipe auto) of the pick, its export (+ int8 under the default 1-point budget)
    and a bench of its target: a normal run folder."""
    from edgetl.bench.runner import BenchOptions, bench
    from edgetl.config import TrainConfig
    from edgetl.export import ExportOptions, export_run
    from edgetl.quantize import QuantizeOptions, quantize_run
    from edgetl.train import train

    t0 = time.perf_counter()
    run_dir = folder / f"final-{chosen['backbone']}-{chosen['size']}"
    reporter.log(f"training the pick in full: {run_dir}")
    cfg = TrainConfig(backbone=chosen["backbone"], input_size=chosen["size"], seed=opts.seed, pretrained=opts.pretrained)
    train(data, cfg, out=str(run_dir), reporter=reporter)
    fmt = TARGET_FORMATS[chosen["target"]]
    export_run(run_dir, ExportOptions(format=fmt), reporter)
    if chosen["precision"] == "int8":
        quantize_run(run_dir, QuantizeOptions(format=fmt), reporter)
    # Timed in the same interleaved rounds as the probe it was picked from: this machine's speed drifts
    # between runs (shared, noisy), and only a side-by-side ratio says whether the final model itself is slower.
    probe_dir = folder / "probes" / f"{chosen['backbone']}-{chosen['size']}"
    side_by_side = [run_dir, probe_dir] if probe_dir.is_dir() else [run_dir]
    rep = bench(side_by_side, BenchOptions(targets=(chosen["target"],), batches=(1,), min_time=opts.min_time * 2, out=str(run_dir)),
                reporter)  # fmt: skip

    def measured(folder_: Path) -> dict[str, Any] | None:
        return next((r for r in rep["results"] if r["source"] == str(folder_) and r["precision"] == chosen["precision"]
                     and r["input"] == "float32" and "latency" in r), None)  # fmt: skip

    row, probe_row = measured(run_dir), measured(probe_dir)
    if row is None:
        raise EdgetlError(f"the final run's {chosen['target']} {chosen['precision']} model was not measured "
                          f"(bench skipped it: {rep['skipped']}); see {run_dir / 'bench.md'}")  # fmt: skip
    final = {"run_dir": str(run_dir), "top1": (row.get("accuracy") or {}).get("top1"), "p50_ms": row["latency"]["p50_ms"],
             "mb": row["bytes"] / 1e6, "seconds": time.perf_counter() - t0,
             "probe_p50_ms_same_rounds": probe_row["latency"]["p50_ms"] if probe_row else None}  # fmt: skip
    final["in_budget"] = within_budget(final, opts.max_latency_ms, opts.max_size_mb)
    if not final["in_budget"]:
        reporter.warn(f"the final model measured {final['p50_ms']:.2f} ms, over the {opts.max_latency_ms:g} ms budget"
                      + (f" (its probe, in the same rounds: {probe_row['latency']['p50_ms']:.2f} ms)" if probe_row else ""),
                      label="over budget")  # fmt: skip
    return final
