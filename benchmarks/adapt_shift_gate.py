"""Can a label-free shift measure tell "nothing to adapt to" from a real corruption? (issue 16)

    python benchmarks/adapt_shift_gate.py --run RUN --seeds 0 1 2 --results 0=shot 1=shot-seed1 2=shot-tent-seed2 \\
        --validation-results 0=validation_sweep-base

shot lost 1.1 points on clean images at seed 2 (adapt_methods_seeds.md): adapting on images that show no
shift only adds noise. A gate would adapt only when the target images are measurably shifted. This
measures, for the images `adapt_corruptions.py` adapts on (the same split, corruption noise and severity,
per seed), the feature shift of edgetl's shift report (edgetl.shift: Fréchet distance of diagonal
Gaussians of the pooled features, against the run's training images) against in-domain images: random
subsets of the validation split of the same size as the target (the distance is biased upwards at small
sizes, so both sides are measured at one size). Beside each score: what shot did on the scored half in the
given `adapt_corruptions.py` result files. A gate's threshold is to be chosen on the clean images and the
validation corruptions, and checked on the test corruptions: it must gate out clean images and keep every
corruption shot helps on.

The stored results/adapt_shift_gate.md is this analysis's first form, the ratio to the largest subset's shift,
which the first gate used. It is not size-free: on fewer target images it shrinks towards 1 for every
condition (results/adapt_shift_gate_sizes.md, made with that ratio), so the gate now scores the excess over the
subsets' median instead, in units of the in-domain shift at GATE_IMAGES (edgetl.shift.shift_gate), and this
script reports that (results/adapt_shift_gate_excess.md).

`--target-sizes 32 64 128` also gates random subsets of each condition's adapt half at those sizes (`--draws`
per size and seed; the full half is the 186 the threshold was chosen at): how often the gate still opens on a
corruption, and stays shut on clean images, when a user has fewer target images.

    python benchmarks/adapt_shift_gate.py --run RUN --seeds 0 1 2 --target-sizes 32 64 128 --tag excess
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch
from adapt_corruptions import adapt_score_halves, as_images, check_target_sizes, corrupted, load_run, source_sample, square
from common import adapt_result_path, result_name, save

from edgetl.corruptions import CORRUPTIONS, VALIDATION
from edgetl.decoded import decode_split
from edgetl.shift import GATE_IMAGES, GATE_THRESHOLD, FeatureReference, run_model, shift_gate


def tagged(pairs: list[str]) -> dict[int, dict[str, Any]]:
    """SEED=TAG pairs -> that adapt_corruptions result file's results, by seed."""
    out = {}
    for pair in pairs:
        seed, sep, tag = pair.partition("=")
        if not sep or not seed.isdigit():
            raise SystemExit(f"expected SEED=TAG (e.g. 1=shot-seed1), got {pair!r}")
        out[int(seed)] = json.loads(adapt_result_path(tag).read_text())["results"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--validation-severities", nargs="*", type=int, default=[3, 5])
    ap.add_argument("--subsets", type=int, default=20)
    ap.add_argument("--results", nargs="*", default=[], metavar="SEED=TAG", help="test-corruption result files of shot, by seed")
    ap.add_argument("--validation-results", nargs="*", default=[], metavar="SEED=TAG")
    ap.add_argument("--method", default="shot")
    ap.add_argument("--target-sizes", nargs="*", type=int, default=[], help="also gate random subsets of the adapt half of these sizes")
    ap.add_argument("--draws", type=int, default=10, help="random subsets per target size, condition and seed")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    args = ap.parse_args()
    test_results, val_results = tagged(args.results), tagged(args.validation_results)
    device = torch.device("cpu")
    loaded = load_run(args.run)
    folder, model, spec, train, val, test = loaded.folder, loaded.model, loaded.spec, loaded.train, loaded.val, loaded.test
    half = len(adapt_score_halves(test.labels, 0)[0])  # the adapt half's size, the same at every seed
    check_target_sizes("--target-sizes", args.target_sizes, half)
    if args.draws < 1:
        raise SystemExit(f"--draws is the number of random subsets per target size, at least 1; got {args.draws}")
    val_images, _ = decode_split(val, spec, name="val")
    val_features = run_model(model, val_images, spec, device).features
    clean = np.stack([square(r.load(), spec.resize_size, spec.interpolation) for r in test.refs])
    conditions = [("clean", None, test_results), *((n, args.severity, test_results) for n in CORRUPTIONS),
                  *((n, s, val_results) for n in VALIDATION for s in args.validation_severities)]  # fmt: skip
    rows, sized = [], []
    for seed in args.seeds:
        src_images, _ = decode_split(source_sample(train, seed), spec, name="source")
        reference = FeatureReference.of(run_model(model, src_images, spec, device).features)
        src_images.close()
        adapt_idx, _ = adapt_score_halves(test.labels, seed)
        for name, sev, results in conditions:
            pixels = clean[adapt_idx] if name == "clean" else corrupted(clean, name, sev, seed, adapt_idx)
            images = as_images(pixels, test.labels[adapt_idx], spec)
            features = run_model(model, images, spec, device).features
            gate = shift_gate(reference, features, val_features, seed=seed, subsets=args.subsets)
            images.close()
            key = "clean" if name == "clean" else f"{name}/{sev}"
            draw_rng = np.random.default_rng(2000 + seed)
            for size in args.target_sizes:
                for draw in range(args.draws):
                    subset = features[draw_rng.choice(len(features), size, replace=False)]
                    small = shift_gate(reference, subset, val_features, seed=seed * args.draws + draw, subsets=args.subsets)
                    sized.append({"seed": seed, "condition": key, "images": size, "excess": small["excess"], "open": small["open"]})
            r = results.get(seed, {}).get(key, {})
            clean_r = results.get(seed, {}).get("clean", {})
            row = {"seed": seed, "condition": key, "validation_corruption": name in VALIDATION, "feature_shift": gate["target_shift"],
                   "band_median": gate["band_median"], "band_max": gate["band_max"], "excess": gate["excess"],
                   "open": gate["open"]}  # fmt: skip
            if args.method in r:
                row["method_points"] = 100 * (r[args.method] - r["source"])
                if name != "clean" and clean_r:
                    lost = clean_r["source"] - r["source"]
                    row["lost_points"] = 100 * lost
            rows.append(row)
            print(seed, key, f"shift {gate['target_shift']:.4f} band median {gate['band_median']:.4f} excess {gate['excess']:.2f}",
                  row.get("method_points"), flush=True)  # fmt: skip
    lines = ["# The shift gate of `edgetl adapt`: the target images' excess feature shift over validation images", "",
             f"Excess = (the adapt half's feature shift - the median of {args.subsets} same-size validation subsets') / the "
             f"in-domain shift at {GATE_IMAGES} images (edgetl.shift.shift_gate; opens at {GATE_THRESHOLD:g}). "
             f"{args.method}: top-1 change on the scored half (points), from the result files; lost: "
             "points the corruption cost the source model.", "",
             "| condition | " + " | ".join(f"seed {s}: excess / {args.method} / lost" for s in args.seeds) + " |",
             "|---|" + "---|" * len(args.seeds)]  # fmt: skip
    for key in dict.fromkeys(r["condition"] for r in rows):
        cells = []
        for s in args.seeds:
            r = next((x for x in rows if x["seed"] == s and x["condition"] == key), None)
            pts = f"{r['method_points']:+.1f}" if r and "method_points" in r else "-"
            lost = f"{r['lost_points']:.1f}" if r and "lost_points" in r else "-"
            cells.append(f"{r['excess']:.2f} / {pts} / {lost}" if r else "-")
        tag = " (validation)" if any(x["validation_corruption"] for x in rows if x["condition"] == key) else ""
        lines.append(f"| {key}{tag} | " + " | ".join(cells) + " |")
    if sized:
        lines += size_table(rows, sized, args, half)
    name = result_name("adapt_shift_gate", args.tag)
    save(name, {"run": str(folder.path), "args": vars(args), "rows": rows, "sized": sized}, "\n".join(lines))


def size_table(rows: list[dict[str, Any]], sized: list[dict[str, Any]], args: argparse.Namespace, half: int) -> list[str]:
    """Per condition and target size: the median excess over seeds and draws, and how often the gate opened."""
    sizes = [*args.target_sizes, "all"]
    lines = ["", f"## The gate on fewer target images: median excess (min-max) and share of gates open, {args.draws} random "
             f"subsets of the adapt half per size and seed, seeds {' '.join(map(str, args.seeds))}; all: the whole half", "",
             "| condition | " + " | ".join(f"{s} images" if s != "all" else f"all ({half})" for s in sizes) + " |",
             "|---|" + "---|" * len(sizes)]  # fmt: skip
    for key in dict.fromkeys(r["condition"] for r in rows):
        cells = []
        for size in sizes:
            got = [x for x in (rows if size == "all" else sized) if x["condition"] == key and (size == "all" or x["images"] == size)]
            scores = [x["excess"] for x in got]
            opened = sum(x["open"] for x in got)
            cells.append(f"{np.median(scores):.2f} ({min(scores):.2f}-{max(scores):.2f}), open {opened}/{len(got)}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
