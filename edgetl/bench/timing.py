"""One timing loop for every target: warm-up, then timed runs in interleaved rounds.

Targets synchronise inside their run() (CUDA waits for the device), so the clock read after run()
returns covers the whole inference. Latency statistics are over individual runs; the ratio to a
reference is the ratio of medians measured in the same rounds, so a slow patch of this shared
machine slows both alike.
"""

from __future__ import annotations

import functools
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


def timed_runs(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, seconds: float, runs: int | None = None,
               min_runs: int = 3) -> list[float]:  # fmt: skip
    """Latency samples (ms) of `run(x)`: exactly `runs` calls when given, else calls for at least
    `seconds` (and `min_runs`)."""
    out: list[float] = []
    start = time.perf_counter()
    while True:
        t = time.perf_counter()
        run(x)
        out.append((time.perf_counter() - t) * 1000.0)
        if runs is not None:
            if len(out) >= runs:
                return out
        elif time.perf_counter() - start >= seconds and len(out) >= min_runs:
            return out


def turns_by_round(turns: dict[str, Callable[[float, int | None], list[float]]], min_time: float, rounds: int = 5,
                   runs_per_round: int | None = None, settle: float = 0.0) -> dict[str, list[list[float]]]:  # fmt: skip
    """Interleave timed turns: each round gives every entry one turn of min_time/rounds seconds (or
    `runs_per_round` runs), one after another, so machine drift hits all alike. `turns[name](seconds,
    runs)` times one turn and returns its samples; `settle` seconds pass between turns. Returns each
    entry's samples round by round (what a ratio between two entries per round needs)."""
    samples: dict[str, list[list[float]]] = {k: [] for k in turns}
    per_round = max(min_time / rounds, 0.05)
    for _ in range(rounds):
        for name, turn in turns.items():
            samples[name].append(turn(per_round, runs_per_round))
            if settle:
                time.sleep(settle)
    return samples


def flatten_rounds(by_round: dict[str, list[list[float]]]) -> dict[str, list[float]]:
    return {name: [ms for turn in turns for ms in turn] for name, turns in by_round.items()}


def rounds_of_turns(turns: dict[str, Callable[[float, int | None], list[float]]], min_time: float, rounds: int = 5,
                    runs_per_round: int | None = None, settle: float = 0.0) -> dict[str, list[float]]:  # fmt: skip
    """turns_by_round, each entry's samples of every round together."""
    return flatten_rounds(turns_by_round(turns, min_time, rounds, runs_per_round, settle))


def ratio_by_round(a: list[list[float]], b: list[list[float]]) -> list[float]:
    """p50 of `a` over p50 of `b` in each round both took a turn in: how far the ratio of two variants
    timed side by side moves within one run (the machine's drift between rounds, not between variants)."""
    return [float(np.median(x) / np.median(y)) for x, y in zip(a, b, strict=False) if x and y]


def interleaved_latency(
    runners: dict[str, Callable[[np.ndarray], np.ndarray]],
    x: np.ndarray,
    min_time: float,
    warmup: int,
    rounds: int = 5,
    runs_per_round: int | None = None,
    turn_warmup: int = 5,
) -> dict[str, list[float]]:
    """Batch latency samples (ms) for runners in this process over `rounds` interleaved rounds.

    Each round gives every runner at least min_time/rounds seconds (and 3 runs), or exactly
    `runs_per_round` runs when that is set (for a fixed, reportable run count). Each turn starts with
    `turn_warmup` untimed runs: the first runs after another model ran find the caches holding that
    model's weights and measure the switch, not this model. In 16-run turns (the demo's quantize step)
    ONNX Runtime's Lite0 int8/fp32 read 0.72 without them, 0.61 with 5, 0.60 in 100-run turns
    (benchmarks/turn_warmup.py; OpenVINO 0.66 either way); the demo once printed 1.21x without them.
    """
    for run in runners.values():
        for _ in range(warmup):
            run(x)

    def turn(run: Callable[[np.ndarray], np.ndarray], seconds: float, runs: int | None) -> list[float]:
        for _ in range(turn_warmup):
            run(x)
        return timed_runs(run, x, seconds, runs)

    turns = {name: functools.partial(turn, run) for name, run in runners.items()}
    return rounds_of_turns(turns, min_time, rounds, runs_per_round)


def throughput(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, seconds: float) -> float:
    """Images per second at the batch size of `x` (median of per-call rates over `seconds`)."""
    run(x)
    rates, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(rates) < 3:
        t = time.perf_counter()
        run(x)
        rates.append(len(x) / (time.perf_counter() - t))
    return float(statistics.median(rates))
