"""int8 after adapting, over seeds: the mean drop per corruption and runtime from the
`adapt_corruptions.py --int8` result files (issue 16: adapted then int8-quantized models keep their
adapted accuracy within 0.5 point).

    python benchmarks/adapt_int8_seeds.py            # every results/adapt_corruptions_int8-judged-vnni*.json

Each file is one seed (its split of the corrupted test images into adapt / score halves and its
corruption noise) for one runtime; files run with a --int8-max-drop other than the default 1 point are
left out. Seed, runtime and budget come from the file's recorded arguments, or, for files written before
those were recorded, from the command line at the end of its Markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import RESULTS, recorded_args, save

TARGET_POINTS = 0.5


def run_settings(path: Path) -> dict[str, object]:
    a = recorded_args(path)
    return {"seed": int(a.get("seed", 0)), "format": str(a.get("int8_format", "onnx")), "max_drop": float(a.get("int8_max_drop", 1.0))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pattern", default="adapt_corruptions_int8-judged-vnni*.json")
    args = ap.parse_args()
    drops: dict[tuple[str, str], dict[int, float]] = {}
    used = []
    for path in sorted(RESULTS.glob(args.pattern)):
        a = run_settings(path)
        if a["max_drop"] != 1.0:
            continue
        used.append({"file": path.name, **a})
        for corruption, r in json.loads(path.read_text()).get("int8", {}).items():
            if "drop_points" in r:
                # The same seed twice (clean is scored in every file): the same split and noise, keep the first.
                drops.setdefault((str(a["format"]), corruption), {}).setdefault(int(a["seed"]), r["drop_points"])  # type: ignore[arg-type]
    runtimes = sorted({k[0] for k in drops})
    corruptions = list(dict.fromkeys(k[1] for k in drops))
    lines = ["# int8 after adapting (SHOT, the default), over seeds", "",
             f"Drop in top-1 points from the adapted fp32 model to its int8 model (`edgetl quantize`, VNNI target, default 1-point "
             f"budget), scored on the half of the corrupted test split not adapted on (186 images: one image is 0.54 points). "
             f"Target: within {TARGET_POINTS} point.", "",
             "| corruption | " + " | ".join(f"{r}: per seed | {r}: mean" for r in runtimes) + " |",
             "|---|" + "---|---|" * len(runtimes)]  # fmt: skip
    summary = {}
    for c in corruptions:
        cells = []
        for r in runtimes:
            per_seed = drops.get((r, c), {})
            mean = statistics.fmean(per_seed.values()) if per_seed else None
            summary[f"{r}/{c}"] = {"per_seed": per_seed, "mean": mean}
            cells.append(", ".join(f"s{s}: {v:+.1f}" for s, v in sorted(per_seed.items())) or "-")
            cells.append("-" if mean is None else f"{mean:+.2f}" + ("" if mean <= TARGET_POINTS else " **over**"))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    within = sum(1 for v in summary.values() if v["mean"] is not None and v["mean"] <= TARGET_POINTS)
    lines += ["", f"Means within {TARGET_POINTS} point: {within} of {len(summary)}.", "", "Files: " +
              ", ".join(f"`{u['file']}` ({u['format']}, seed {u['seed']})" for u in used)]  # fmt: skip
    save("adapt_int8_seeds", {"files": used, "drops": summary, "target_points": TARGET_POINTS}, "\n".join(lines))


if __name__ == "__main__":
    main()
