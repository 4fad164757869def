"""Adaptation methods over seeds: the share of the accuracy lost to corruption (severity 3) that each
method wins back, per seed and on average, from `adapt_corruptions.py` result files (issue 16: the
default method wins back at least half, averaged over corruption types, and never loses more than 0.5
point on clean images).

    python benchmarks/adapt_methods_seeds.py shot shot-seed1 methods tent-rest - adabn-tent-seed1   # result tags

Two summaries per method and seed: the mean of the per-corruption shares (the issue's measure; only
corruptions that cost more than 1 point count, as in adapt_corruptions.md), and the pooled share (points
won back over points lost, summed over those corruptions), which a corruption that lost 1-2 points (a few
images) cannot swing by tens of percent.
"""

from __future__ import annotations

import argparse
import json
import statistics

from common import adapt_result_path, load_result, recorded_args, save, share_won_back, ungated_top1

from edgetl.shift import gate_opens

# Keys of an adapt_corruptions result that are not a method's top-1 (_gate_ratio: the shift gate's first form).
NOT_METHODS = ("_seconds", "_stopped", "_gate_ratio", "_gate_excess", "_ungated")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tags", nargs="+", help="result tags: results/adapt_corruptions_<tag>.json (- for the untagged file)")
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--name", default="adapt_methods_seeds", help="result file name (e.g. for a summary of --validation runs)")
    ap.add_argument(
        "--gate",
        type=float,
        default=None,
        help="re-decide the shift gate at this threshold from each condition's recorded excess score: shut "
        "scores the model as trained (the source top-1), open the method's ungated top-1 (0: always open)",
    )
    ap.add_argument(
        "--excess-from",
        default=None,
        help="an adapt_shift_gate.py result (results/<name>.json) with the excess scores of the same run and "
        "seeds, for --gate on files whose gate recorded only its first form (a ratio)",
    )
    args = ap.parse_args()
    excess_from = _excess_scores(args.excess_from) if args.excess_from else None
    # (method, seed) -> corruption -> (clean top-1, source top-1, method top-1); files of one seed (the same split
    # and corruption noise) add corruptions to each other, the first file's result of a corruption counts.
    scores: dict[tuple[str, int], dict[str, tuple[float, float, float]]] = {}
    files: dict[tuple[str, int], set[str]] = {}
    for tag in args.tags:
        path = adapt_result_path(tag)
        payload = json.loads(path.read_text())
        seed, res = int(recorded_args(path).get("seed", 0)), payload["results"]
        # A method run with non-default options (--set) is another entry: "shot (epochs=3)" is not "shot".
        options = ", ".join(f"{k}={v}" for k, v in sorted(payload.get("options", {}).items()))
        clean = res["clean"]["source"]
        for key, r in res.items():
            if not (key == "clean" or key.endswith(f"/{args.severity}")):
                continue
            for method in (k for k in r if k != "source" and not k.endswith(NOT_METHODS)):
                entries = {method: r[method]}
                if f"{method}_gate_excess" in r or f"{method}_gate_ratio" in r:  # behind the shift gate (_ratio: its first form)
                    entries[f"{method}, no gate"] = ungated_top1(r, method)
                    if args.gate is not None:
                        excess = _excess_of(r, method, payload["run"], seed, key, excess_from, path.name)
                        entries[method] = _regated(r, method, args.gate, excess)
                for name, top1 in entries.items():
                    m = f"{name} ({options})" if options else name
                    scores.setdefault((m, seed), {}).setdefault(key, (clean, r["source"], top1))
                    files.setdefault((m, seed), set()).add(path.name)
    per: dict[tuple[str, int], dict[str, object]] = {}
    for (m, seed), by_key in scores.items():
        shares, won, lost_sum = [], 0.0, 0.0
        for key, (clean, source, mine) in by_key.items():
            share = share_won_back(clean, source, mine) if key != "clean" else None
            if share is not None:
                shares.append(share)
                won, lost_sum = won + mine - source, lost_sum + clean - source
        if shares and "clean" in by_key:
            clean, source, mine = by_key["clean"]
            per[(m, seed)] = {"files": sorted(files[(m, seed)]), "mean_share": statistics.fmean(shares), "n": len(shares),
                              "pooled_share": won / lost_sum, "clean_points": 100 * (mine - source)}  # fmt: skip
    methods = list(dict.fromkeys(m for m, _ in per))
    seeds = sorted({s for _, s in per})
    lines = [f"# Adaptation methods over seeds (severity {args.severity})", "",
             "Share of the accuracy lost to corruption that each method wins back: mean over corruption types (n: types "
             "that cost more than 1 point) / pooled (points won over points lost). Clean: top-1 change on uncorrupted "
             "images, points. Target for the default (shot): mean share >= 50%, clean >= -0.5.", "",
             "| method | " + " | ".join(f"seed {s}: mean (n) / pooled / clean" for s in seeds) + " | mean over seeds: share / pooled |",
             "|---|" + "---|" * (len(seeds) + 1)]  # fmt: skip
    summary = {}
    for m in methods:
        rows = [per.get((m, s)) for s in seeds]
        cells = [f"{100 * r['mean_share']:.0f}% ({r['n']}) / {100 * r['pooled_share']:.0f}% / {r['clean_points']:+.1f}" if r else "-"
                 for r in rows]  # fmt: skip
        got = [r for r in rows if r]
        both = (statistics.fmean(r["mean_share"] for r in got), statistics.fmean(r["pooled_share"] for r in got))
        summary[m] = {"per_seed": {s: per.get((m, s)) for s in seeds}, "mean_share": both[0], "pooled_share": both[1], "seeds": len(got)}
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {100 * both[0]:.0f}% / {100 * both[1]:.0f}% ({len(got)} seeds) |")
    lines += ["", "Files: " + ", ".join(sorted({f for r in per.values() for f in r["files"]}))]  # type: ignore[attr-defined]
    if args.gate is not None:
        lines[2:2] = [f"The shift gate re-decided at {args.gate} from each condition's recorded excess score (shut: the model as trained; "
                      "open: the method's ungated top-1), not as the runs decided it.", ""]  # fmt: skip
    save(args.name, {"severity": args.severity, "gate": args.gate, "methods": summary}, "\n".join(lines))


def _excess_scores(name: str) -> dict[tuple[str, int, str], float]:
    """(run, seed, condition) -> the gate's excess score, from an adapt_shift_gate.py result."""
    payload = load_result(name, "adapt_shift_gate.py result")
    return {(payload["run"], int(row["seed"]), row["condition"]): float(row["excess"]) for row in payload["rows"]}


def _excess_of(r: dict[str, float], method: str, run: str, seed: int, key: str,
               scores: dict[tuple[str, int, str], float] | None, file: str) -> float:  # fmt: skip
    """A condition's excess score: recorded with the result, or from --excess-from for the same run, seed and condition."""
    if f"{method}_gate_excess" in r:
        return r[f"{method}_gate_excess"]
    if scores is not None and (run, seed, key) in scores:
        return scores[(run, seed, key)]
    raise SystemExit(f"{file}: {method} on {key} has no recorded excess score (seed {seed}); --gate cannot re-decide it "
                     "(give --excess-from with an adapt_shift_gate.py result of the same run)")  # fmt: skip


def _regated(r: dict[str, float], method: str, threshold: float, excess: float) -> float:
    """The top-1 a gate at `threshold` gives: the source model's when it shuts, the ungated method's when it opens."""
    return ungated_top1(r, method) if gate_opens(excess, threshold) else r["source"]


if __name__ == "__main__":
    main()
