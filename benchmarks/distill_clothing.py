"""Knowledge distillation on clothing-small (issue 15): a Lite0 student trained with and without a bigger
teacher's soft labels, the same recipe and seeds otherwise, scored on the test split.

    python benchmarks/distill_clothing.py --teacher RUN [--seeds 0 1] [--recipe finetune --epochs-finetune 2]

The student is the same network either way (same backbone and input size), so its latency is the same:
the comparison is accuracy at equal student latency. Each pair of runs (plain, taught) shares a seed, so
its splits, head initialisation and batch order agree. The teacher is scored on the same test split.
Runs are kept under --work and reused when finished.

Writes benchmarks/results/distill_clothing{_TAG}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import save

from edgetl.config import TrainConfig
from edgetl.evaluate import evaluate
from edgetl.progress import Reporter
from edgetl.train import train

ROOT = Path(__file__).resolve().parents[1]


def best_val(run: Path) -> float:
    metrics = json.loads((run / "metrics.json").read_text())
    return float(metrics["best"]["top1"])


def train_seconds(run: Path) -> float:
    metrics = json.loads((run / "metrics.json").read_text())
    return float(sum(s.get("seconds", 0.0) for s in metrics["stages"].values()))


def run_once(data: Path, cfg: TrainConfig, run: Path) -> dict:
    manifest = run / "manifest.json"
    if not (manifest.is_file() and json.loads(manifest.read_text()).get("status") == "finished"):
        train(data, cfg, out=str(run), reporter=Reporter(quiet=True))
    test = evaluate(run, data, split="test", reporter=Reporter(quiet=True))
    return {"run": str(run), "val_top1": best_val(run), "test_top1": test["top1"], "train_seconds": train_seconds(run)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="a finished run folder of the bigger backbone, same data and split")
    ap.add_argument("--data", default=str(ROOT.parent / "shared/datasets/clothing-small"))
    ap.add_argument("--work", default="/tmp/edgetl-bench-runs/distill")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--recipe", default="finetune")
    ap.add_argument("--epochs-finetune", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    data, work = Path(args.data), Path(args.work)
    started = time.time()
    teacher_manifest = json.loads((Path(args.teacher) / "manifest.json").read_text())
    teacher = {"run": args.teacher, "backbone": teacher_manifest["config"]["backbone"],
               "input_size": teacher_manifest["config"]["input_size"], "val_top1": best_val(Path(args.teacher)),
               "test_top1": evaluate(args.teacher, data, split="test", reporter=Reporter(quiet=True))["top1"]}  # fmt: skip
    print("teacher", teacher, flush=True)
    rows = []
    for seed in args.seeds:
        base = TrainConfig(backbone=args.backbone, recipe=args.recipe, epochs_finetune=args.epochs_finetune, seed=seed)
        taught_cfg = TrainConfig(**{**base.to_dict(), "teacher": str(Path(args.teacher).resolve()), "distill_alpha": args.alpha,
                                    "distill_temperature": args.temperature})  # fmt: skip
        plain = run_once(data, base, work / f"plain-s{seed}")
        print("plain", seed, plain, flush=True)
        taught = run_once(data, taught_cfg, work / f"taught-s{seed}")
        print("taught", seed, taught, flush=True)
        rows.append({"seed": seed, "plain": plain, "taught": taught})
    mean = {k: {m: statistics.fmean(r[k][m] for r in rows) for m in ("val_top1", "test_top1")} for k in ("plain", "taught")}
    payload = {"teacher": teacher, "student": args.backbone, "recipe": args.recipe, "epochs_finetune": args.epochs_finetune,
               "alpha": args.alpha, "temperature": args.temperature, "rows": rows, "mean": mean,
               "seconds": time.time() - started}  # fmt: skip
    lines = [
        f"# Distillation on clothing-small: {args.backbone} student, {teacher['backbone']} teacher",
        "",
        f"Student recipe `--recipe {args.recipe} --epochs-finetune {args.epochs_finetune}`; distillation `--distill-alpha "
        f"{args.alpha:g} --distill-temperature {args.temperature:g}`. The student is the same network with and without "
        "the teacher, so the comparison is at equal student latency. Selection on validation; test scored once at the end.",
        "",
        f"Teacher ({teacher['backbone']}, `{args.teacher}`): validation {teacher['val_top1']:.2%}, test {teacher['test_top1']:.2%}.",
        "",
        "| seed | plain val | plain test | with teacher val | with teacher test | test gain (points) | train min plain / taught |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, t = r["plain"], r["taught"]
        minutes = f"{p['train_seconds'] / 60:.1f} / {t['train_seconds'] / 60:.1f}"
        lines.append(f"| {r['seed']} | {p['val_top1']:.2%} | {p['test_top1']:.2%} | {t['val_top1']:.2%} | {t['test_top1']:.2%} | "
                     f"{100 * (t['test_top1'] - p['test_top1']):+.2f} | {minutes} |")  # fmt: skip
    mp, mt = mean["plain"], mean["taught"]
    lines.append(f"| mean | {mp['val_top1']:.2%} | {mp['test_top1']:.2%} | {mt['val_top1']:.2%} | {mt['test_top1']:.2%} | "
                 f"{100 * (mt['test_top1'] - mp['test_top1']):+.2f} | |")  # fmt: skip
    save("distill_clothing" + (f"_{args.tag}" if args.tag else ""), payload, "\n".join(lines))


if __name__ == "__main__":
    main()
