"""How much a better teacher could give: validation and test top-1 of trained runs alone and of their
averaged probabilities (an ensemble is the usual way to make a teacher better than any one model).

    python benchmarks/ensemble_ceiling.py NAME=RUN [NAME=RUN ...] [--data DIR] [--out NAME]

Every run is scored on the dataset's own val and test folders with its recorded preprocessing; the
ensembles are every combination of two or more runs. Issue 15 reads validation only: if no ensemble
beats the best single run there, a distillation teacher built from these runs cannot be chosen as better.
Writes benchmarks/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
from common import save

DATA = "/work/shared/datasets/clothing-small"


def probabilities(run: Path, data: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Softmax outputs of `run`'s kept checkpoint on `split` of `data` (edgetl.evaluate.score: the run's
    recorded preprocessing), and the labels in the run's label order."""
    import torch

    from edgetl.evaluate import score
    from edgetl.progress import Reporter

    s = score(run, data, split, device="cpu", reporter=Reporter(quiet=True))
    if s.skipped_files:
        raise SystemExit(f"{len(s.skipped_files)} image(s) of {s.source} could not be read: the runs would be scored on different sets")
    return torch.softmax(torch.from_numpy(s.logits).float(), dim=1).numpy(), s.labels


def run_argument(item: str) -> tuple[str, str]:
    name, sep, run = item.partition("=")
    if not (sep and name and run):
        raise argparse.ArgumentTypeError(f"expected NAME=RUN, got {item!r}")
    return name, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="NAME=RUN", type=run_argument)
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--out", default="ensemble_ceiling_clothing")
    args = ap.parse_args()
    runs = dict(args.runs)
    probs: dict[str, dict[str, np.ndarray]] = {"val": {}, "test": {}}
    labels: dict[str, np.ndarray] = {}
    for split in probs:
        for name, run in runs.items():
            probs[split][name], y = probabilities(Path(run), args.data, split)
            if split in labels and not np.array_equal(labels[split], y):
                raise SystemExit(f"{name} scored another {split} set than the runs before it")
            labels[split] = y
    rows = []
    for k in range(1, len(runs) + 1):
        for combo in itertools.combinations(runs, k):
            row = {"members": list(combo)}
            for split in probs:
                mean = sum(probs[split][m] for m in combo) / len(combo)
                row[f"{split}_top1"] = float((mean.argmax(1) == labels[split]).mean())
            rows.append(row)
    rows.sort(key=lambda r: (-r["val_top1"], len(r["members"])))
    best_single = max(r["val_top1"] for r in rows if len(r["members"]) == 1)
    best_ensemble = max((r for r in rows if len(r["members"]) > 1), key=lambda r: r["val_top1"], default=None)
    # Validation images that every run gets wrong: a ceiling no teacher built from these runs can lift.
    wrong_everywhere = int(np.all([p.argmax(1) != labels["val"] for p in probs["val"].values()], axis=0).sum())
    lines = [
        "# Ensembles of trained runs: could a better teacher be built from them? (issue 15)", "",
        f"Data: {args.data} (val {len(labels['val'])}, test {len(labels['test'])} images). Averaged softmax "
        "probabilities of each combination; sorted by validation top-1 (the only split a choice may use).", "",
        "| members | val top-1 | test top-1 |", "|---|---|---|",
        *[f"| {' + '.join(r['members'])} | {r['val_top1']:.2%} | {r['test_top1']:.2%} |" for r in rows], "",
        "Runs: " + ", ".join(f"{n} = `{p}`" for n, p in runs.items()), "",
        f"Best single run on validation: {best_single:.2%}; best ensemble: "
        + (f"{best_ensemble['val_top1']:.2%} ({' + '.join(best_ensemble['members'])})" if best_ensemble else "none")
        + f". Validation images every run gets wrong: {wrong_everywhere} of {len(labels['val'])}.",
    ]  # fmt: skip
    save(args.out, {"data": args.data, "runs": runs, "rows": rows, "best_single_val_top1": best_single,
                    "best_ensemble": best_ensemble, "val_wrong_in_every_run": wrong_everywhere}, "\n".join(lines))  # fmt: skip


if __name__ == "__main__":
    main()
