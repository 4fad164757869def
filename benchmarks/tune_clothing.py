"""`edgetl tune` on clothing-small, checked: the picks within 2 ms and 5 ms, their test top-1 against
Lite0 at 224 px, and how well the probe's ranking matched trained accuracy (issue 18, part 2).

    edgetl tune DATA --max-latency-ms 5 --no-final --out TUNE_DIR          # the tune itself (its wall time)
    python benchmarks/tune_clothing.py TUNE_DIR DATA --work DIR \\
        --train efficientnet_lite0@160,efficientnet_lite0@224,efficientnet_lite1@192,efficientnet_lite2@224,efficientnet_lite2@260 \\
        --epochs-finetune 2

For every `--train` candidate (backbone@size), one training through the whole pipeline: stage 1 as in
the probe, then `--recipe finetune` (top 3 blocks) for `--epochs-finetune` epochs, seed 0. On 2 CPU
cores a default training (`--recipe auto`, up to 8 epochs) of one Lite0 takes about an hour, so the
check trains every candidate the same shorter way: the ranking compared is the one between candidates
trained alike. Each trained run is scored on the test split (`edgetl eval`), and the picks are
exported in their runtime's format (+ int8 when picked) and benchmarked on the test images (`edgetl
bench --data DATA/test`): the picked variant's own test top-1 and p50. Rank correlation: Spearman's
rho between the probe's validation top-1 (fp32, ONNX Runtime) and the trained test top-1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import save, train_and_score

from edgetl.progress import Reporter
from edgetl.tune import TARGET_FORMATS, label, pick


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def train_candidate(data: Path, backbone: str, size: int, epochs: int, work: Path) -> dict:
    from edgetl.config import TrainConfig

    cfg = TrainConfig(backbone=backbone, input_size=size, recipe="finetune", epochs_finetune=epochs, seed=0)
    return train_and_score(data, cfg, work / f"{backbone}-{size}")


def bench_pick(run: Path, data: Path, chosen: dict) -> dict:
    from edgetl.bench.runner import BenchOptions, bench
    from edgetl.export import ExportOptions, export_run
    from edgetl.quantize import QuantizeOptions, quantize_run

    fmt = TARGET_FORMATS[chosen["target"]]
    quiet = Reporter(quiet=True)
    export_run(run, ExportOptions(format=fmt, force=True), quiet)
    if chosen["precision"] == "int8":
        quantize_run(run, QuantizeOptions(format=fmt), quiet)
    rep = bench([run], BenchOptions(data=str(data / "test"), targets=(chosen["target"],), batches=(1,), min_time=8.0,
                                    out=str(run / "bench-test")), quiet)  # fmt: skip
    row = next(r for r in rep["results"] if r["precision"] == chosen["precision"] and "latency" in r)
    return {"variant": row["variant"], "test_top1": row["accuracy"]["top1"], "p50_ms": row["latency"]["p50_ms"], "mb": row["bytes"] / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tune_dir", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--train", required=True, help="backbone@size,... (at least 5 for the rank correlation)")
    ap.add_argument("--epochs-finetune", type=int, default=2)
    ap.add_argument("--budgets", default="2,5")
    args = ap.parse_args()
    report = json.loads((args.tune_dir / "tune.json").read_text())
    rows = report["candidates"]
    probes = {(p["backbone"], p["size"]): p for p in report["probes"]}
    picks = {float(b): pick(rows, float(b)) for b in args.budgets.split(",")}
    wanted = [(t.split("@")[0], int(t.split("@")[1])) for t in args.train.split(",")]
    for chosen in picks.values():
        if chosen and (chosen["backbone"], chosen["size"]) not in wanted:
            wanted.append((chosen["backbone"], chosen["size"]))
    if ("efficientnet_lite0", 224) not in wanted:
        wanted.append(("efficientnet_lite0", 224))
    trained = {}
    for backbone, size in wanted:
        print(f"training {backbone}@{size}", flush=True)
        trained[(backbone, size)] = train_candidate(args.data, backbone, size, args.epochs_finetune, args.work)
    keys = [k for k in wanted if k in probes]
    proxy = [probes[k]["probe_top1"] for k in keys]
    test = [trained[k]["test_top1"] for k in keys]
    val = [trained[k]["val_top1"] for k in keys]
    rho_test, rho_val = spearman(proxy, test), spearman(proxy, val)
    picked = {}
    for budget, chosen in picks.items():
        if chosen:
            run = Path(trained[(chosen["backbone"], chosen["size"])]["run"])
            picked[str(budget)] = {"pick": chosen, "label": label(chosen), **bench_pick(run, args.data, chosen)}
    ref = trained[("efficientnet_lite0", 224)]
    lines = [f"# edgetl tune on clothing-small: picks and the proxy's ranking (fine-tune {args.epochs_finetune} epochs, seed 0)", "",
             f"Tune wall time (probes, exports, int8, bench; no final training): **{report['tune_seconds'] / 60:.1f} min** "
             f"for {len(report['probes'])} probes, {len(rows)} candidates (goal: under 30 min).", "",
             "| budget | pick | tune p50 ms | pick's p50 ms (test bench) | pick's test top-1 | Lite0@224 fp32 test top-1 (same training) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for budget, p in picked.items():
        lines.append(f"| {float(budget):g} ms | {p['label']} | {p['pick']['p50_ms']:.2f} | {p['p50_ms']:.2f} | {p['test_top1']:.2%} | "
                     f"{ref['test_top1']:.2%} |")  # fmt: skip
    lines += ["", f"Proxy vs trained, {len(keys)} candidates: Spearman rho **{rho_test:.2f}** (test top-1), "
              f"{rho_val:.2f} (validation).", "",
              "| candidate | probe val top-1 (proxy) | trained val top-1 | trained test top-1 | training min |",
              "|---|---|---|---|---|"]  # fmt: skip
    for k in keys:
        t = trained[k]
        lines.append(f"| {k[0]}@{k[1]} | {probes[k]['probe_top1']:.2%} | {t['val_top1']:.2%} | {t['test_top1']:.2%} | "
                     f"{t['train_seconds'] / 60:.1f} |")  # fmt: skip
    save("tune_clothing", {"tune_dir": str(args.tune_dir), "epochs_finetune": args.epochs_finetune, "tune_seconds": report["tune_seconds"],
                           "picks": picked, "trained": {f"{k[0]}@{k[1]}": v for k, v in trained.items()},
                           "spearman_test": rho_test, "spearman_val": rho_val, "candidates": rows}, "\n".join(lines))  # fmt: skip


if __name__ == "__main__":
    main()
