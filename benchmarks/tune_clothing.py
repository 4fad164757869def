"""`edgetl tune` on clothing-small, checked: the picks within 2 ms and 5 ms, their test top-1 against
Lite0 at 224 px, and how well the probe's ranking matched trained accuracy (issue 18, part 2).

    edgetl tune DATA --max-latency-ms 5 --no-final --out TUNE_DIR          # the tune itself (its wall time)
    python benchmarks/tune_clothing.py TUNE_DIR DATA --work DIR \\
        --train efficientnet_lite0@160,efficientnet_lite0@224,efficientnet_lite1@192,efficientnet_lite2@224,efficientnet_lite2@260 \\
        --epochs-finetune 2

For every `--train` candidate (backbone@size), one training through the whole pipeline: stage 1 as in
the probe, then `--recipe finetune` (top 3 blocks) for `--epochs-finetune` epochs, seed 0; or, with
`--epochs-finetune 0`, edgetl's default training (`--recipe auto`, what the tune's final step runs), with
`--reuse backbone@size=RUN` for candidates already trained that way (checked against the run's recorded
config). Every candidate is trained the same way: the ranking compared is the one between candidates
trained alike. Each trained run is scored on the test split (`edgetl eval`), and the picks are
exported in their runtime's format (+ int8 when picked) and benchmarked on the test images (`edgetl
bench --data DATA/test`): the picked variant's own test top-1 and p50. Rank correlation: Spearman's
rho between the probe's validation top-1 (fp32, ONNX Runtime) and the trained test top-1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import result_name, save, score_run, train_and_score

from edgetl.config import TrainConfig
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


def proxy_rank(proxy: dict[tuple[str, int], float], trained: dict[tuple[str, int], dict]) -> tuple[float, float, list[str]]:
    """Spearman's rho of the proxy against trained test and validation top-1 over the candidates in `proxy`,
    and their table (markdown lines)."""
    keys = list(proxy)
    rho_test = spearman([proxy[k] for k in keys], [trained[k]["test_top1"] for k in keys])
    rho_val = spearman([proxy[k] for k in keys], [trained[k]["val_top1"] for k in keys])
    lines = [f"Proxy vs trained, {len(keys)} candidates: Spearman rho **{rho_test:.2f}** (test top-1), {rho_val:.2f} (validation).", "",
             "| candidate | probe val top-1 (proxy) | trained val top-1 | trained test top-1 | training min |",
             "|---|---|---|---|---|"]  # fmt: skip
    for k in keys:
        t = trained[k]
        seeds = t.get("seeds", [])
        seeds = f" (mean of seeds {', '.join(map(str, seeds))})" if len(seeds) > 1 else f" (seed {seeds[0]})" if seeds else ""
        minutes = t["train_seconds"] / 60
        lines.append(f"| {k[0]}@{k[1]}{seeds} | {proxy[k]:.2%} | {t['val_top1']:.2%} | {t['test_top1']:.2%} | {minutes:.1f} |")
    return rho_test, rho_val, lines


def candidate(text: str) -> tuple[str, int]:
    """"efficientnet_lite1@192" -> ("efficientnet_lite1", 192); anything else ends the script in one line."""
    backbone, sep, size = text.partition("@")
    if not sep or not backbone or not size.isdigit():
        raise SystemExit(f"a candidate is BACKBONE@SIZE (e.g. efficientnet_lite1@192), got {text!r}")
    return backbone, int(size)


def candidate_config(backbone: str, size: int, epochs: int):
    """The training of a candidate: the short fine-tune (`epochs` > 0), or edgetl's default training (0)."""
    if epochs == 0:
        return TrainConfig(backbone=backbone, input_size=size, seed=0)
    return TrainConfig(backbone=backbone, input_size=size, recipe="finetune", epochs_finetune=epochs, seed=0)


# What a reused run must share with the candidate's training for its accuracy to stand in for it.
REUSE_FIELDS = ("backbone", "recipe", "seed", "epochs_head", "epochs_finetune", "lr_finetune", "mixup", "cutmix", "teacher")


def training_differences(recorded: dict, input_size: int, backbone: str, size: int, epochs: int) -> list[str]:
    """How a recorded training (its config and the input size it ran at) differs from `candidate_config`'s."""
    wanted = vars(candidate_config(backbone, size, epochs))
    # A field a run does not record came later than the run, which trained as that field's default does.
    differ = [f"{k}: {recorded[k]!r} != {wanted[k]!r}" for k in REUSE_FIELDS if k in recorded and recorded[k] != wanted[k]]
    if input_size != size:
        differ.append(f"input size {input_size} != {size}")
    return differ


def reused_run(run: Path, backbone: str, size: int, epochs: int) -> Path:
    """`run`, after checking that it was trained as `candidate_config` would train the candidate."""
    from edgetl import checkpoint
    from edgetl.errors import EdgetlError
    from edgetl.run import RunFolder

    try:
        folder = RunFolder.open(run)
    except EdgetlError as exc:
        raise SystemExit(f"--reuse: {exc}") from None
    got_size = checkpoint.spec_of(folder.checkpoint()).input_size
    differ = training_differences(folder.manifest["config"], got_size, backbone, size, epochs)
    if differ:
        raise SystemExit(f"--reuse {run}: not trained as this candidate would be ({'; '.join(differ)})")
    return run


def train_candidate(data: Path, backbone: str, size: int, epochs: int, work: Path, reuse: dict[tuple[str, int], Path]) -> dict:
    if (backbone, size) in reuse:
        return score_run(data, reused_run(reuse[(backbone, size)], backbone, size, epochs))
    return train_and_score(data, candidate_config(backbone, size, epochs), work / f"{backbone}-{size}")


def bench_pick(run: Path, data: Path, chosen: dict, work: Path) -> dict:
    from edgetl.bench.runner import BenchOptions, bench
    from edgetl.export import ExportOptions, export_run
    from edgetl.quantize import QuantizeOptions, quantize_run
    from edgetl.run import INT8_CHILDREN, RunFolder, exported_models

    fmt = TARGET_FORMATS[chosen["target"]]
    quiet = Reporter(quiet=True)
    # A run reused from elsewhere (the tune's own final run) keeps the models it already has from its checkpoint.
    sha = RunFolder.open(run).checkpoint_sha256
    current = {m.key for m in exported_models(run) if m.checkpoint_sha256 == sha}
    if fmt not in current:
        export_run(run, ExportOptions(format=fmt, force=True), quiet)
        current.discard(INT8_CHILDREN[fmt])  # an int8 model of the replaced export is not the new one's
    if chosen["precision"] == "int8" and INT8_CHILDREN[fmt] not in current:
        quantize_run(run, QuantizeOptions(format=fmt), quiet)
    # The table goes under --work, not into the run: a reused run is someone else's folder.
    rep = bench([run], BenchOptions(data=str(data / "test"), targets=(chosen["target"],), batches=(1,), min_time=8.0,
                                    out=str(work / "bench-test" / run.name)), quiet)  # fmt: skip
    row = next(r for r in rep["results"] if r["precision"] == chosen["precision"] and "latency" in r)
    return {"variant": row["variant"], "test_top1": row["accuracy"]["top1"], "p50_ms": row["latency"]["p50_ms"], "mb": row["bytes"] / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tune_dir", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--train", required=True, help="backbone@size,... (at least 5 for the rank correlation)")
    ap.add_argument("--epochs-finetune", type=int, default=2, help="0: edgetl's default training (--recipe auto)")
    ap.add_argument("--reuse", nargs="*", default=[], metavar="BACKBONE@SIZE=RUN",
                    help="score these finished runs instead of training the candidate (checked to be trained the same way)")
    ap.add_argument("--budgets", default="2,5")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    args = ap.parse_args()
    reuse = {}
    for item in args.reuse:
        key, sep, run = item.partition("=")
        if not sep:
            raise SystemExit(f"--reuse takes BACKBONE@SIZE=RUN, got {item!r}")
        reuse[candidate(key)] = Path(run)
    training = f"fine-tune {args.epochs_finetune} epochs" if args.epochs_finetune else "default training"
    report = json.loads((args.tune_dir / "tune.json").read_text())
    rows = report["candidates"]
    probes = {(p["backbone"], p["size"]): p for p in report["probes"]}
    picks = {float(b): pick(rows, float(b)) for b in args.budgets.split(",")}
    wanted = [candidate(t) for t in args.train.split(",")]
    for chosen in picks.values():
        if chosen and (chosen["backbone"], chosen["size"]) not in wanted:
            wanted.append((chosen["backbone"], chosen["size"]))
    if ("efficientnet_lite0", 224) not in wanted:
        wanted.append(("efficientnet_lite0", 224))
    trained = {}
    for backbone, size in wanted:
        print(f"training {backbone}@{size}", flush=True)
        trained[(backbone, size)] = train_candidate(args.data, backbone, size, args.epochs_finetune, args.work, reuse)
    rho_test, rho_val, rank_lines = proxy_rank({k: probes[k]["probe_top1"] for k in wanted if k in probes}, trained)
    picked = {}
    for budget, chosen in picks.items():
        if chosen:
            run = Path(trained[(chosen["backbone"], chosen["size"])]["run"])
            picked[str(budget)] = {"pick": chosen, "label": label(chosen), **bench_pick(run, args.data, chosen, args.work)}
    ref = trained[("efficientnet_lite0", 224)]
    lines = [f"# edgetl tune on clothing-small: picks and the proxy's ranking ({training}, seed 0)", "",
             f"Tune wall time (probes, exports, int8, bench; no final training): **{report['tune_seconds'] / 60:.1f} min** "
             f"for {len(report['probes'])} probes, {len(rows)} candidates (goal: under 30 min).", "",
             "| budget | pick | tune p50 ms | pick's p50 ms (test bench) | pick's test top-1 | Lite0@224 fp32 test top-1 (same training) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for budget, p in picked.items():
        lines.append(f"| {float(budget):g} ms | {p['label']} | {p['pick']['p50_ms']:.2f} | {p['p50_ms']:.2f} | {p['test_top1']:.2%} | "
                     f"{ref['test_top1']:.2%} |")  # fmt: skip
    lines += ["", *rank_lines]
    save(result_name("tune_clothing", args.tag),
         {"tune_dir": str(args.tune_dir), "epochs_finetune": args.epochs_finetune, "tune_seconds": report["tune_seconds"],
          "picks": picked, "trained": {f"{k[0]}@{k[1]}": v for k, v in trained.items()},
          "reused": {f"{k[0]}@{k[1]}": str(v) for k, v in reuse.items()},
          "spearman_test": rho_test, "spearman_val": rho_val, "candidates": rows}, "\n".join(lines))  # fmt: skip


if __name__ == "__main__":
    main()
