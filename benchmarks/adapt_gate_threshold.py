"""The shift gate's threshold chosen on the validation corruptions only (issue 16), by a rule fixed before the runs.

Input: `adapt_corruptions.py --validation` results of one model (adapt_corruptions_validation_<tag>.json), which
record per condition (clean, and each held-out corruption and severity) the gate's excess score and the method's
top-1 without the gate (`--set gate=0` runs, or `<method>_ungated` where a gated run shut). The rule:

- a condition's gain is the ungated method's top-1 minus the source model's, in points, on the scored half;
- G(t) is the summed gain of the conditions whose excess is at least t (the ones a gate at t adapts);
- the candidates are the midpoints between consecutive excess values, 0 (always adapt) and the current threshold;
- the pick maximises G (ties: the candidate nearest the current threshold), and replaces the current threshold
  only when it gains at least `--noise-floor` points over it (default two scored images' worth, 1.08).

    python benchmarks/adapt_gate_threshold.py val-c0-base val-c0-sev12-ungated-seed0 val-c0-ungated-seed1 \\
        val-c0-ungated-seed2 --name adapt_gate_threshold_c0
"""

from __future__ import annotations

import argparse
import itertools
import json

from common import adapt_result_path, recorded_args, save, ungated_top1

from edgetl.shift import GATE_THRESHOLD, gate_opens


def conditions(tags: list[str], method: str) -> list[dict[str, float | int | str]]:
    """(seed, condition, excess, gain in points) from the validation result files; within one seed (one split and
    corruption noise) the first file's result of a condition counts."""
    seen: dict[tuple[int, str], dict[str, float | int | str]] = {}
    for tag in tags:
        path = adapt_result_path(f"validation_{tag}")
        payload = json.loads(path.read_text())
        if not payload.get("validation_corruptions"):
            raise SystemExit(f"{path.name} is not a --validation run: the threshold is never chosen on the test corruptions")
        seed = int(recorded_args(path).get("seed", 0))
        for key, r in payload["results"].items():
            if f"{method}_gate_excess" not in r:
                raise SystemExit(f"{path.name}: {key} has no gate score for {method}")
            ungated = ungated_top1(r, method)
            seen.setdefault((seed, key), {"seed": seed, "condition": key, "excess": r[f"{method}_gate_excess"],
                                          "gain": 100 * (ungated - r["source"]), "file": path.name})  # fmt: skip
    return sorted(seen.values(), key=lambda c: float(c["excess"]))


def gated_gain(rows: list[dict[str, float | int | str]], threshold: float) -> float:
    """G(threshold): the summed gain of the conditions a gate at `threshold` adapts (0 adapts all)."""
    return sum(float(c["gain"]) for c in rows if gate_opens(float(c["excess"]), threshold))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tags", nargs="+", help="results/adapt_corruptions_validation_<tag>.json")
    ap.add_argument("--method", default="shot")
    ap.add_argument("--current", type=float, default=GATE_THRESHOLD)
    ap.add_argument("--noise-floor", type=float, default=1.08, help="points G must gain to replace the current threshold")
    ap.add_argument("--name", default="adapt_gate_threshold")
    args = ap.parse_args()
    rows = conditions(args.tags, args.method)
    excess = sorted({float(c["excess"]) for c in rows})
    candidates = sorted({0.0, args.current, *((a + b) / 2 for a, b in itertools.pairwise(excess))})
    table = [(t, gated_gain(rows, t)) for t in candidates]
    best = max(g for _, g in table)
    pick = min((t for t, g in table if g == best), key=lambda t: abs(t - args.current))
    margin = best - gated_gain(rows, args.current)
    chosen = pick if margin >= args.noise_floor else args.current
    lines = [f"# The shift gate's threshold on the validation corruptions ({args.method})", "",
             "Gain: the ungated method's top-1 minus the source model's on the scored half, points (one image = 0.54). "
             "G(t): summed gain of the conditions with excess >= t. Rule fixed before the runs (module docstring).", "",
             "| seed | condition | excess | gain (points) | file |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {c['seed']} | {c['condition']} | {float(c['excess']):.2f} | {float(c['gain']):+.2f} | {c['file']} |" for c in rows]
    lines += ["", "| threshold t | G(t) |", "|---|---|"] + [f"| {t:.2f} | {g:+.2f} |" for t, g in table]
    lines += ["", f"Best G {best:+.2f} at t = {pick:.2f}; the current {args.current:.2f} gives {gated_gain(rows, args.current):+.2f} "
              f"(margin {margin:+.2f} points, noise floor {args.noise_floor:.2f}) -> the rule's threshold: **{chosen:.2f}**"
              + (" (replaces the current one)" if chosen != args.current else " (the current one stays)") + "."]  # fmt: skip
    save(args.name, {"method": args.method, "conditions": rows, "candidates": [{"threshold": t, "gain": g} for t, g in table],
                     "best_threshold": pick, "best_gain": best, "current": args.current, "margin": margin,
                     "noise_floor": args.noise_floor, "chosen": chosen}, "\n".join(lines))  # fmt: skip


if __name__ == "__main__":
    main()
