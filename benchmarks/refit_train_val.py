"""Issue 15's last untried lever: refit on train + validation. A run chooses its recipe and its epochs on
validation; the refit trains again with exactly those choices on the training images and the validation
images together (11% more images on clothing-small) and is scored on test beside its source run.

    python benchmarks/refit_train_val.py RUN [RUN ...] [--work /tmp/edgetl-refit] [--out NAME]

Each RUN is a finished run of the dataset (its recorded root must hold train/, validation/ and test/). The
refit of RUN is RUN's recorded config with the fine-tune recipe that RUN chose as the only candidate
(`--recipe auto --recipe-candidates UNFREEZE@LR[/DECAY]`), stage 1 for RUN's best head epoch and stage 2 for
RUN's best fine-tune epoch (a shorter cosine schedule, the usual refit rule), and no early stopping. Its data
is a folder of links: train/ holds the training and the validation images, validation/ the validation images
again (the run needs one; with them trained on, its "best" epoch is no choice any more, and its validation
scores are not estimates), test/ the untouched test images. Nothing here reads test before scoring.
A refit already finished in --work with the same config is reused. Writes benchmarks/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from common import save, score_run, spread, train_and_score

UNLIMITED = 1000  # epochs of patience: early stopping off


def linked_train_val(root: Path, out: Path) -> Path:
    """`out` with train/ = root's train/ + validation/ images (links; a validation file is prefixed `v_`),
    validation/ and test/ links to root's own."""
    for split in ("train", "validation", "test"):
        if not (root / split).is_dir():
            raise SystemExit(f"{root} has no {split}/ folder: the refit needs given train/validation/test splits")
    if (out / "train").is_dir():
        return out
    tmp = out.with_name(out.name + ".tmp")
    for source, prefix in (("train", ""), ("validation", "v_")):
        for cls in sorted(p for p in (root / source).iterdir() if p.is_dir()):
            (tmp / "train" / cls.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir()):
                os.symlink(f.resolve(), tmp / "train" / cls.name / f"{prefix}{f.name}")
    for split in ("validation", "test"):
        os.symlink((root / split).resolve(), tmp / split)
    tmp.rename(out)
    return out


def refit_config(run: Path) -> tuple[Any, dict[str, Any]]:
    """The refit's TrainConfig and what it took from `run`."""
    from edgetl.config import TrainConfig

    manifest = json.loads((run / "manifest.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    if manifest.get("status") != "finished":
        raise SystemExit(f"{run}: not a finished run")
    recipe, stages = metrics["recipe"]["chosen"], metrics["stages"]
    if recipe is None or "finetune" not in stages:
        raise SystemExit(f"{run}: kept its stage-1 head; this benchmark refits fine-tuned runs")
    mantissa, exponent = f"{recipe['lr']:e}".split("e")  # 0.0001 -> 1e-4, as one would type it
    candidate = (f"{recipe['unfreeze']}@{float(mantissa):g}e{int(exponent)}"
                 + (f"/{recipe['llrd']:g}" if recipe.get("llrd", 1.0) != 1.0 else ""))  # fmt: skip
    taken = {"recipe": recipe["name"], "epochs_head": int(stages["head"]["best_epoch"]),
             "epochs_finetune": int(stages["finetune"]["best_epoch"])}  # fmt: skip
    cfg = dataclasses.replace(
        TrainConfig(**manifest["config"]), recipe="auto", recipe_candidates=candidate, epochs_head=taken["epochs_head"],
        patience_head=UNLIMITED, epochs_finetune=taken["epochs_finetune"], patience=UNLIMITED,
    )  # fmt: skip
    return cfg, {**taken, "dataset_root": manifest["dataset"]["root"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgetl-refit"), help="the linked data and the refit runs")
    parser.add_argument("--out", default="refit_train_val_clothing")
    args = parser.parse_args()

    rows = []
    for run in args.runs:
        cfg, taken = refit_config(run)
        data = linked_train_val(Path(taken["dataset_root"]), args.work / "train+val")
        refit = args.work / f"refit-{run.name}"
        manifest = refit / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text())["config"] != dataclasses.asdict(cfg):
            raise SystemExit(f"{refit} holds a run of another config: remove it or choose another --work")
        source = score_run(Path(taken["dataset_root"]), run)
        after = train_and_score(data, cfg, refit)
        best = json.loads((refit / "metrics.json").read_text())["best"]
        kept = f"{best['stage']} {best['epoch']}"  # chosen on validation images it trained on: no real choice
        rows.append({"source": source, "refit": {**after, "kept": kept}, **taken, "seed": cfg.seed})
        print(f"{run.name}: test {source['test_top1']:.2%} -> refit {after['test_top1']:.2%}", flush=True)

    before = spread([r["source"]["test_top1"] for r in rows])
    after = spread([r["refit"]["test_top1"] for r in rows])
    lines = [
        "# Refit on train + validation with the choices made on validation (issue 15)", "",
        "Source runs choose recipe and epochs on validation; each refit trains again with exactly those on the "
        "training and validation images together, with no early stopping, and is scored on test beside its source.", "",
        "| source run | seed | recipe | head / fine-tune epochs | source val / test | refit test | refit kept | refit minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        source, refit = r["source"], r["refit"]
        lines.append(f"| {Path(source['run']).name} | {r['seed']} | {r['recipe']} | {r['epochs_head']} / {r['epochs_finetune']} "
                     f"| {source['val_top1']:.2%} / {source['test_top1']:.2%} | {refit['test_top1']:.2%} | {refit['kept']} "
                     f"| {refit['train_seconds'] / 60:.1f} |")  # fmt: skip
    lines += ["", f"Test top-1, mean ± std over {len(rows)}: source **{before['mean']:.2%} ± {before['std']:.2%}**, "
              f"refit **{after['mean']:.2%} ± {after['std']:.2%}**."]  # fmt: skip
    save(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "source_test": before, "refit_test": after},
         "\n".join(lines))  # fmt: skip


if __name__ == "__main__":
    main()
