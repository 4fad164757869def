"""One method over several trained models: the share of the lost accuracy won back per seed-run, per model and
over all, from `adapt_methods_seeds.py` summaries (one summary per model, each over its seeds). Issue 16's
target is the default method's share averaged over corruption types; one model's seeds vary its split and
corruption noise, not its training, so the models are the wider test.

    python benchmarks/adapt_models_summary.py adapt_gate_seeds adapt_gate_model_s1 adapt_gate_model_amx \\
        --method shot --name adapt_gate_models

Reported: each seed-run's mean share, each model's mean, the mean over all seed-runs with its standard error
(seed-runs of one model are not independent draws of a model, so the mean of the model means is given too),
the pooled share (points won over points lost), and the worst clean-image change.
"""

from __future__ import annotations

import argparse
import statistics

from common import load_result, save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("summaries", nargs="+", help="results/<name>.json files written by adapt_methods_seeds.py --name <name>")
    ap.add_argument("--method", default="shot", help="the method's row in those summaries (e.g. 'shot, no gate')")
    ap.add_argument("--name", default="adapt_models_summary")
    args = ap.parse_args()
    if len(args.summaries) < 2:
        raise SystemExit("give at least two models' summaries: one model's seeds are what adapt_methods_seeds.py reports")
    models: dict[str, dict[str, dict[str, float]]] = {}
    for name in args.summaries:
        methods = load_result(name, "adapt_methods_seeds.py summary (names are its --name)")["methods"]
        if args.method not in methods:
            raise SystemExit(f"{name}.json has no method {args.method!r}; it has {', '.join(methods)}")
        models[name] = {seed: run for seed, run in methods[args.method]["per_seed"].items() if run}
    runs = [run for per_seed in models.values() for run in per_seed.values()]
    shares = [run["mean_share"] for run in runs]
    if len(shares) < 2:
        raise SystemExit("fewer than two seed-runs in these summaries: no spread to report")
    model_means = {name: statistics.fmean(r["mean_share"] for r in per_seed.values()) for name, per_seed in models.items()}
    overall = {
        "seed_runs": len(shares),
        "mean_share": statistics.fmean(shares),
        "standard_error": statistics.stdev(shares) / len(shares) ** 0.5,
        "mean_of_model_means": statistics.fmean(model_means.values()),
        "pooled_share": statistics.fmean(r["pooled_share"] for r in runs),
        "min_share": min(shares),
        "max_share": max(shares),
        "worst_clean_points": min(r["clean_points"] for r in runs),
    }
    lines = [f"# {args.method} over {len(models)} trained models (severity 3)", "",
             "Share of the accuracy lost to corruption won back, mean over corruption types that cost more than 1 point, per "
             "seed-run (adapt_methods_seeds.py summaries). Target (issue 16): >= 50%, clean >= -0.5 points.", "",
             "| model summary | seed-runs: mean share | model mean | worst clean change |", "|---|---|---|---|"]  # fmt: skip
    for name, per_seed in models.items():
        cells = ", ".join(f"s{seed} {100 * r['mean_share']:.1f}%" for seed, r in per_seed.items())
        worst = min(r["clean_points"] for r in per_seed.values())
        lines.append(f"| {name} | {cells} | {100 * model_means[name]:.1f}% | {worst:+.1f} |")
    lines += ["", f"All {overall['seed_runs']} seed-runs: **{100 * overall['mean_share']:.1f}%** (standard error "
              f"{100 * overall['standard_error']:.1f}, range {100 * overall['min_share']:.0f}-{100 * overall['max_share']:.0f}%); "
              f"mean of the model means {100 * overall['mean_of_model_means']:.1f}%; pooled {100 * overall['pooled_share']:.1f}%; "
              f"worst clean change {overall['worst_clean_points']:+.1f} points."]  # fmt: skip
    save(args.name, {"method": args.method, "models": models, "model_means": model_means, "overall": overall}, "\n".join(lines))


if __name__ == "__main__":
    main()
