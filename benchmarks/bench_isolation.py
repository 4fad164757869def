"""Issue 19: does `edgetl bench` agree with the runtimes' own tools?

    python benchmarks/bench_isolation.py RUN [--min-time 10]

RUN is a run folder with exported fp32 and int8 models (e.g. from benchmarks/int8_targets.py). The
same files are benchmarked twice in one go: the old method (every variant in one process, rounds
interleaved) and the new one (each variant in a worker process of its own, turns interleaved in
rounds), the second with --check-reference (OpenVINO benchmark_app, a bare ONNX Runtime
InferenceSession.run loop). Accuracy on the clothing-small test split. Writes
results/bench_isolation.{json,md}; the goal is agreement within 10% at batch 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import save

from edgetl.bench.runner import BenchOptions, bench
from edgetl.progress import Reporter

DATA = Path(__file__).resolve().parents[2] / "shared/datasets/clothing-small"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--min-time", type=float, default=10.0)
    args = ap.parse_args()
    rep = Reporter()
    common = dict(data=str(DATA), batches=(1,), min_time=args.min_time, warmup=20)
    before = bench([args.run], BenchOptions(**common, isolation="in-process", out="/tmp/edgetl-bench-isolation/before"), rep)
    after = bench([args.run], BenchOptions(**common, check_reference=True, out="/tmp/edgetl-bench-isolation/after"), rep)
    app = app_latency(Path(args.run))
    old = {r["variant"]: r for r in before["results"]}
    rows = []
    for r in after["results"]:
        ref = r.get("reference", {})
        o = old.get(r["variant"], {}).get("latency", {})
        rows.append(
            f"| {r['variant']} | {r['executed_precision']} | {r['accuracy']['top1']:.2%} | {o.get('p50_ms', float('nan')):.2f} | "
            f"{r['latency']['p50_ms']:.2f} | {ref.get('tool', '-')} | "
            + (f"{ref['p50_ms']:.2f} | {ref['edgetl_over_reference']:.2f} |" if "p50_ms" in ref else f"{ref.get('error', '-')} | - |")
        )
    rows.append("")
    rows.append(f"App path (`edgetl.runtime.Classifier`, its default session, {app['runs']} runs): model call alone p50 "
                f"{app['logits_p50_ms']:.2f} ms; from a decoded photo (resize, crop, normalise, run, softmax) p50 "
                f"{app['predict_p50_ms']:.2f} ms.")
    save("bench_isolation", {"before": before, "after": after, "app": app},
         "# edgetl bench against the runtimes' own tools\n\n"
         f"Same files, one session: before = every variant in one process; after = each variant in its own worker "
         f"process; ref = the runtime's own tool on the same file, threads and hint, run after. Batch 1, "
         f"{after['options']['threads']} threads, >= {args.min_time:g} s per variant, test top-1 on {after['data']['n']} images.\n\n"
         "| variant | runs in | top-1 | before p50 ms | after p50 ms | reference | ref p50 ms | after / ref |\n"
         "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))  # fmt: skip


def app_latency(run: Path, runs: int = 2000) -> dict[str, float]:
    """What an app embedding model.onnx gets: Classifier with its defaults, end to end from a decoded image."""
    import time

    import numpy as np

    from edgetl.preprocess import decode_image
    from edgetl.runtime import Classifier

    clf = Classifier(run / "model.onnx")
    img = decode_image(next((DATA / "test").rglob("*.jpg")))
    x = clf.prepare(img)[None]
    out: dict[str, list[float]] = {"logits": [], "predict": []}
    for _ in range(50):
        clf.predict(img)
    for _ in range(runs):  # alternate the two so drift hits both alike
        t = time.perf_counter()
        clf.logits(x)
        out["logits"].append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        clf.predict(img)
        out["predict"].append((time.perf_counter() - t) * 1000)
    return {"runs": runs, **{f"{k}_p50_ms": float(np.percentile(v, 50)) for k, v in out.items()}}


if __name__ == "__main__":
    main()
