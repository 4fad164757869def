"""Seed-to-seed spread of train_accuracy results: one row per config, over every seed run of it.

    python benchmarks/train_accuracy.py clothing --set seed=1 --tag seed1     # one file per seed and variant
    python benchmarks/seed_summary.py clothing                                # reads them all, trains nothing

One run of a 372-image test split moves by a point between seeds (one image is 0.27 pt), so a target
near the edge is judged on the mean over seeds, not on whichever seed ran first. Variants are compared
on validation top-1 only: picking a variant by its test score would make the test score a biased
estimate. Writes results/train_accuracy_<preset>_seeds.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from common import RESULTS, save, spread
from train_accuracy import PRESETS

from edgetl.config import TrainConfig
from edgetl.data import own_validation_folder


def load_runs(preset: str) -> list[dict]:
    """Every train_accuracy_<preset>[_tag].json result (not this script's own summary)."""
    runs = []
    for path in sorted(RESULTS.glob(f"train_accuracy_{preset}*.json")):
        data = json.loads(path.read_text())
        if data.get("preset") == preset and "test" in data and "config" in data:
            # Options added after a run was made are missing from its config; their defaults keep the
            # earlier behaviour, so the run counts as having used them.
            # (TrainConfig.from_dict fills them in as the run behaved, e.g. a fixed recipe before --recipe auto).
            data["config"] = TrainConfig.from_dict(data["config"]).to_dict()
            runs.append({**data, "file": path.name})
    return runs


# What does not make two runs different experiments: the seed, and where and how parallel they ran.
NOT_THE_EXPERIMENT = {"seed", "device", "workers"}


def config_key(config: dict) -> str:
    """What makes two runs the same experiment: the config without NOT_THE_EXPERIMENT."""
    return json.dumps({k: v for k, v in sorted(config.items()) if k not in NOT_THE_EXPERIMENT})


# What decides which images the validation split holds (besides the seed): a variant that changes one of these
# is scored on other validation images, so its validation top-1 cannot be ranked against the preset's.
VALIDATION_SPLIT = ("val_fraction", "limit_val")


def recorded_validation_splits(runs: list[dict]) -> dict[int, set[str]]:
    """seed -> the validation-split hashes that results of that seed recorded (from each run's splits.json)."""
    out: dict[int, set[str]] = {}
    for r in runs:
        if r.get("val_split_sha256"):
            out.setdefault(r["config"]["seed"], set()).add(r["val_split_sha256"])
    return out


def same_validation_split(
    config: dict, baseline: dict, data: str, group: list[dict] | None = None, baseline_runs: list[dict] | None = None
) -> bool:
    """Whether a variant was validated on the preset's images. When both recorded their split at a common seed,
    the recorded hashes decide (what the runs did, not what the data folder holds today); otherwise the config does."""
    mine, theirs = recorded_validation_splits(group or []), recorded_validation_splits(baseline_runs or [])
    common = set(mine) & set(theirs)
    if common:
        return all(mine[s] == theirs[s] for s in common)
    # With its own validation folder, --val-fraction holds nothing out: only --limit-val changes the images.
    keys = [k for k in VALIDATION_SPLIT if not (k == "val_fraction" and own_validation_folder(Path(data)) is not None)]
    return all(config.get(k) == baseline.get(k) for k in keys)


def cpu_label(host: dict) -> str:
    """A result's CPU in a few words: the model and the widest int8 path it had (AMX, AVX-512 VNNI or AVX2)."""
    flags = set(host.get("cpu_flags", []))
    widest = "AMX" if "amx_int8" in flags else "AVX-512 VNNI" if host.get("vnni") else "AVX2"
    return f"{host.get('cpu_model', 'unknown CPU')} ({widest}{', bf16' if host.get('bf16') else ''})"


def describe_difference(config: dict, baseline: dict) -> str:
    changed = {k: v for k, v in config.items() if k not in NOT_THE_EXPERIMENT and baseline.get(k) != v}
    return ", ".join(f"{k}={v}" for k, v in changed.items()) or "preset (today's defaults)"


def seed_means(group: list[dict], score: Callable[[dict], float]) -> list[float]:
    """One value per seed: a rerun of a seed (another host, or a reproducibility check) is not another sample,
    so each seed's results are averaged first and the mean and spread are over distinct seeds."""
    by_seed: dict[int, list[float]] = {}
    for r in group:
        by_seed.setdefault(r["config"]["seed"], []).append(score(r))
    return [sum(v) / len(v) for v in by_seed.values()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("preset", choices=PRESETS)
    ap.add_argument("--target", type=float, default=None, help="test top-1 goal judged on the mean (default: the preset's)")
    args = ap.parse_args()
    runs = load_runs(args.preset)
    if not runs:
        raise SystemExit(f"no results/train_accuracy_{args.preset}*.json to summarise")
    target = runs[0]["target_test_top1"]
    groups: dict[str, list[dict]] = {}
    for run in runs:
        # An extended run (epochs added by `edgetl train --resume`) ran another schedule than a run trained at once.
        groups.setdefault(config_key(run["config"]) + ("|extended" if run.get("resumed") else ""), []).append(run)
    # The baseline is the preset as train_accuracy.py runs it today (older results may hold other defaults).
    baseline = PRESETS[args.preset][1].to_dict()
    baseline_key = config_key(baseline)
    if args.target is not None:
        target = args.target

    rows = []
    for key, group in groups.items():
        group.sort(key=lambda r: r["config"]["seed"])
        rows.append({
            "variant": describe_difference(group[0]["config"], baseline) + (" (extended by --resume)" if group[0].get("resumed") else ""),
            "is_preset": key == baseline_key,
            "same_backbone": group[0]["config"]["backbone"] == baseline["backbone"],
            "same_validation_split": same_validation_split(group[0]["config"], baseline, group[0]["data"], group,
                                                           groups.get(baseline_key, [])),
            "seeds": sorted({r["config"]["seed"] for r in group}), "runs": len(group),
            "files": [r["file"] for r in group],
            "val_top1": spread(seed_means(group, lambda r: r["val_best"]["top1"])),
            "test_top1": spread(seed_means(group, lambda r: r["test"]["top1"])),
            "per_seed": [{"seed": r["config"]["seed"], "val_top1": r["val_best"]["top1"], "test_top1": r["test"]["top1"],
                          "test_correct": round(r["test"]["top1"] * r["test"]["n"]), "test_n": r["test"]["n"]}
                         for r in group],
        })  # fmt: skip
    rows.sort(key=lambda r: (not r["is_preset"], not r["same_validation_split"], -r["val_top1"]["mean"]))
    preset_row = rows[0]
    if not preset_row["is_preset"]:
        raise SystemExit(f"no result with the {args.preset} preset's current config: run train_accuracy.py {args.preset}")
    # The target is the preset's backbone's: another backbone (a teacher trained with this script) is another
    # model, not a recipe for this one, so it is listed but not a candidate.
    best_by_val = max((r for r in rows if r["same_validation_split"] and r["same_backbone"]),
                      key=lambda r: (r["val_top1"]["n"] > 1, r["val_top1"]["mean"]))  # fmt: skip
    meets = preset_row["test_top1"]["mean"] >= target

    def pct(x: float) -> str:
        return f"{100 * x:.2f}%"

    md = [f"# Seed spread: {args.preset}\n", "Variants are chosen on mean **validation** top-1; test is reported, never used to choose. "
          "A seed run more than once (runs in brackets) counts once, at the mean of its runs.\n",
          "| variant | seeds (runs) | val top-1 mean (min-max) | test top-1 mean ± std (min-max) | test per seed |",
          "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        v, t = r["val_top1"], r["test_top1"]
        per_seed = ", ".join(f"s{p['seed']}: {pct(p['test_top1'])} ({p['test_correct']}/{p['test_n']})" for p in r["per_seed"])
        other = "" if r["same_validation_split"] else " (other validation images: not ranked)"
        reruns = f" ({r['runs']})" if r["runs"] > len(r["seeds"]) else ""
        md.append(f"| {r['variant']} | {len(r['seeds'])}{reruns} | {pct(v['mean'])} ({pct(v['min'])}-{pct(v['max'])}){other} | "
                  f"{pct(t['mean'])} ± {100 * t['std']:.2f} ({pct(t['min'])}-{pct(t['max'])}) | {per_seed} |")  # fmt: skip
    md.append(f"\nPreset config: mean test top-1 {pct(preset_row['test_top1']['mean'])} over {preset_row['test_top1']['n']} seeds "
              f"-> target >= {pct(target)} {'met' if meets else 'NOT met'} on the mean; "
              f"{sum(p['test_top1'] >= target for p in preset_row['per_seed'])} of {len(preset_row['per_seed'])} "
              "runs reach it alone.")  # fmt: skip
    md.append(f"Best variant by validation: {best_by_val['variant']} (among the variants of the preset's backbone, "
              f"{baseline['backbone']}, scored on the preset's validation images; a variant run at several seeds "
              "ranks before one run at a single seed).")
    # The summary's own Host line (save) is where it was computed; the runs it reads trained elsewhere too.
    trained_on = dict(Counter(cpu_label(run.get("host", {})) for run in runs))
    md.append("Runs trained on: " + "; ".join(f"{cpu} ({n} results)" for cpu, n in sorted(trained_on.items())) +
              " (each result file records its own host; the Host line below is where this summary was computed).")
    save(f"train_accuracy_{args.preset}_seeds",
         {"preset": args.preset, "target_test_top1": target, "rows": rows, "preset_meets_target_on_mean": meets,
          "best_by_validation": best_by_val["variant"], "trained_on": trained_on},
         "\n".join(md))  # fmt: skip


if __name__ == "__main__":
    main()
