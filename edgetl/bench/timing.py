"""One timing loop for every target: warm-up, then timed runs in interleaved rounds.

Targets synchronise inside their run() (CUDA waits for the device), so the clock read after run()
returns covers the whole inference. Latency statistics are over individual runs; the ratio to a
reference is the ratio of medians measured in the same rounds, so a slow patch of this shared
machine slows both alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np


def latency_stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)), "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()), "std_ms": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "runs": len(a),
    }  # fmt: skip


def interleaved_latency(
    runners: dict[str, Callable[[np.ndarray], np.ndarray]],
    x: np.ndarray,
    min_time: float,
    warmup: int,
    rounds: int = 5,
    runs_per_round: int | None = None,
) -> dict[str, list[float]]:
    """Batch latency samples (ms) for each runner over `rounds` interleaved rounds.

    Each round gives every runner at least min_time/rounds seconds (and 3 runs), or exactly
    `runs_per_round` runs when that is set (for a fixed, reportable run count).
    """
    for run in runners.values():
        for _ in range(warmup):
            run(x)
    samples: dict[str, list[float]] = {k: [] for k in runners}
    per_round = max(min_time / rounds, 0.05)
    for _ in range(rounds):
        for name, run in runners.items():
            start, done = time.perf_counter(), 0
            while True:
                t = time.perf_counter()
                run(x)
                samples[name].append((time.perf_counter() - t) * 1000.0)
                done += 1
                if runs_per_round is not None:
                    if done >= runs_per_round:
                        break
                elif time.perf_counter() - start >= per_round and done >= 3:
                    break
    return samples


def throughput(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, seconds: float) -> float:
    """Images per second at the batch size of `x` (median of per-call rates over `seconds`)."""
    run(x)
    rates, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(rates) < 3:
        t = time.perf_counter()
        run(x)
        rates.append(len(x) / (time.perf_counter() - t))
    return float(statistics.median(rates))
