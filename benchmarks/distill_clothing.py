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

from common import result_name, save, score_run, train_and_score

from edgetl.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


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
    scored = score_run(data, Path(args.teacher))  # the teacher is trained already: scored, never trained here
    teacher = {"run": args.teacher, "backbone": teacher_manifest["config"]["backbone"],
               "input_size": teacher_manifest["config"]["input_size"], "val_top1": scored["val_top1"],
               "test_top1": scored["test_top1"]}  # fmt: skip
    print("teacher", teacher, flush=True)
    rows = []
    for seed in args.seeds:
        base = TrainConfig(backbone=args.backbone, recipe=args.recipe, epochs_finetune=args.epochs_finetune, seed=seed)
        taught_cfg = TrainConfig(**{**base.to_dict(), "teacher": str(Path(args.teacher).resolve()), "distill_alpha": args.alpha,
                                    "distill_temperature": args.temperature})  # fmt: skip
        plain = train_and_score(data, base, work / f"plain-s{seed}")
        print("plain", seed, plain, flush=True)
        taught = train_and_score(data, taught_cfg, work / f"taught-s{seed}")
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
    save(result_name("distill_clothing", args.tag), payload, "\n".join(lines))


if __name__ == "__main__":
    main()
