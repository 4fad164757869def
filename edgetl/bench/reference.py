"""`edgetl bench --check-reference`: each runtime's own figure for the same file, threads and hint,
beside edgetl's, so every speed claim can be checked against a tool the runtime's authors stand by.

- OpenVINO: `benchmark_app` (it ships in the openvino wheel), synchronous API (one request, as an app
  calling infer() does), LATENCY hint (or one stream on the same number of threads when fewer than
  every core are used), the same inference precision, batch 1.
- ONNX Runtime: a bare `InferenceSession.run` loop with the same session options (intra-op threads,
  default spinning), in a fresh process, written here without edgetl's backends on purpose.

Each reference takes turns inside edgetl's own interleaved rounds (`ReferenceTurns`), one process at a
time with nothing else running, so drift on a shared machine hits edgetl's figure and the tool's alike;
its p50 is the median of its turns' medians (benchmark_app reports a median per invocation, not samples).

    python -m edgetl.bench.reference ort MODEL THREADS SECONDS DTYPE D0,D1,D2,D3
    python -m edgetl.bench.reference benchmark_app ARGS...   (benchmark_app with edgetl's telemetry block)
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

OV_PRECISION = {"fp32": "f32", "int8": "f32", "bf16": "bf16", "fp16": "f16"}
# edgetl and the tool time nearly the same call, but not exactly: edgetl feeds a real image through its worker
# loop, the tool zeros through its own. 10% beyond the tool's own turn-to-turn range allows for that; a figure
# outside it is a difference in what is timed (or edgetl's overhead), not the host's drift.
AGREEMENT_MARGIN = 0.10


def find_benchmark_app() -> str | None:
    beside = Path(sys.executable).parent / "benchmark_app"  # the wheel's entry point in this environment
    return str(beside) if beside.is_file() else shutil.which("benchmark_app")


def openvino_reference(model: Path, shape: tuple[int, ...], threads: int, precision: str, seconds: float) -> dict[str, Any]:
    exe = find_benchmark_app()
    if exe is None:
        return {"tool": "benchmark_app", "error": "benchmark_app is not installed here (it ships in the openvino wheel)"}
    from edgetl.hostinfo import physical_cores

    # benchmark_app takes a thread count only without a hint: with every core, the LATENCY hint edgetl
    # uses (one stream on all physical cores); with fewer, its equivalent spelled out.
    tuning = ["-hint", "latency"] if threads >= physical_cores() else ["-hint", "none", "-nstreams", "1", "-nthreads", str(threads)]
    cmd = [exe, "-m", str(model), "-d", "CPU", *tuning, "-api", "sync", "-infer_precision", OV_PRECISION.get(precision, "f32"),
           "-shape", "[" + ",".join(map(str, shape)) + "]", "-t", str(max(1, round(seconds)))]  # fmt: skip
    # The same tool and arguments, started through edgetl so that OpenVINO's telemetry stays off in it too
    # (edgetl.no_telemetry); `command` records the plain benchmark_app line a user can rerun.
    launched = [sys.executable, "-m", "edgetl.bench.reference", "benchmark_app", *cmd[1:]]
    proc = subprocess.run(launched, capture_output=True, text=True, timeout=600)
    found = re.search(r"Median:\s+([0-9.]+)\s*(ms|us)", proc.stdout)  # it switches to microseconds below a millisecond
    if proc.returncode != 0 or not found:
        tail = (proc.stderr if proc.returncode else "no Median latency in its output").strip().splitlines()
        return {"tool": "benchmark_app", "command": " ".join(cmd), "error": (tail or ["failed"])[-1][:200]}
    median_ms = float(found.group(1)) / (1000.0 if found.group(2) == "us" else 1.0)
    return {"tool": "benchmark_app", "command": " ".join(cmd), "p50_ms": median_ms}


def ort_reference(model: Path, shape: tuple[int, ...], threads: int, dtype: str, seconds: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "edgetl.bench.reference", "ort", str(model), str(threads), str(seconds), dtype, ",".join(map(str, shape))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"tool": "InferenceSession.run loop", "error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return {"tool": "InferenceSession.run loop", **json.loads(proc.stdout.strip().splitlines()[-1])}


def _bare_ort_loop(model: str, threads: int, seconds: float, dtype: str, shape: list[int]) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: np.zeros(shape, dtype=np.uint8 if dtype == "uint8" else np.float32)}
    for _ in range(20):
        sess.run(None, feed)
    ms, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(ms) < 10:
        t = time.perf_counter()
        sess.run(None, feed)
        ms.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": float(np.percentile(ms, 50)), "runs": len(ms)}


def has_reference(target: str) -> bool:
    """Whether a bench target has a runtime's own tool to check it against (PyTorch and GPUs have none)."""
    return target in ("openvino-cpu", "ort-cpu")


def reference_for(target: str, model: Path, threads: int, precision: str, input_dtype: str, shape: tuple[int, ...],
                  seconds: float) -> dict[str, Any]:  # fmt: skip
    """One invocation of the runtime's own tool for a bench variant: {tool, p50_ms[, command]} or {tool, error}."""
    if target == "openvino-cpu":
        return openvino_reference(model, shape, threads, precision, seconds)
    return ort_reference(model, shape, threads, input_dtype, seconds)


def agreement_verdict(edgetl_p50_ms: float, turn_p50_ms: list[float]) -> str:
    """'agrees' when edgetl's p50 lies within the range of the tool's turn medians widened by AGREEMENT_MARGIN;
    'edgetl-slower' (edgetl adds time the runtime does not need) or 'edgetl-faster' (the two do not time the same
    work, or edgetl skips some) otherwise."""
    low, high = min(turn_p50_ms) * (1 - AGREEMENT_MARGIN), max(turn_p50_ms) * (1 + AGREEMENT_MARGIN)
    if edgetl_p50_ms > high:
        return "edgetl-slower"
    return "edgetl-faster" if edgetl_p50_ms < low else "agrees"


class ReferenceTurns:
    """A reference tool as a turn of bench.timing.rounds_of_turns: it runs in `rounds` of the rounds, spread from
    the first to the last (each invocation loads the model again, so short benches use fewer), for `seconds` in
    all, and returns no latency samples of its own to the rounds; `result()` gives what it measured."""

    def __init__(self, target: str, model: Path, threads: int, precision: str, input_dtype: str, shape: tuple[int, ...],
                 seconds: float, total_rounds: int) -> None:  # fmt: skip
        self.args = (target, model, threads, precision, input_dtype, shape)
        # benchmark_app times whole seconds: at least 1 s a turn, so a short bench gets fewer turns, not shorter ones.
        self.rounds = max(1, min(total_rounds, int(seconds)))
        self.turn_seconds = seconds / self.rounds
        last = total_rounds - 1
        self.scheduled = {round(i * last / (self.rounds - 1)) for i in range(self.rounds)} if self.rounds > 1 else {last // 2}
        self.calls = 0
        self.turns: list[dict[str, Any]] = []

    def __call__(self, seconds: float, runs: int | None) -> list[float]:
        if self.calls in self.scheduled:
            self.turns.append(reference_for(*self.args, self.turn_seconds))
        self.calls += 1
        return []

    def result(self, edgetl_p50_ms: float | None) -> dict[str, Any]:
        measured = [t for t in self.turns if "p50_ms" in t]
        if not measured:
            failed = self.turns[-1] if self.turns else {"error": "never ran"}
            return {k: v for k, v in failed.items() if k != "p50_ms"}
        medians = [t["p50_ms"] for t in measured]
        ref = {**{k: v for k, v in measured[-1].items() if k not in ("p50_ms", "runs")}, "p50_ms": float(statistics.median(medians)),
               "turn_p50_ms": medians, "turns": len(measured), "interleaved": True}  # fmt: skip
        if edgetl_p50_ms is not None:
            ref["edgetl_over_reference"] = edgetl_p50_ms / ref["p50_ms"]
            ref["verdict"] = agreement_verdict(edgetl_p50_ms, medians)
        return ref


def _benchmark_app(args: list[str]) -> int:
    from openvino.tools.benchmark.main import main  # what the wheel's benchmark_app entry point runs

    sys.argv = ["benchmark_app", *args]
    return main()


if __name__ == "__main__":
    if sys.argv[1] == "benchmark_app":
        sys.exit(_benchmark_app(sys.argv[2:]))
    _, kind, model, threads, seconds, dtype, shape = sys.argv
    assert kind == "ort"
    print(json.dumps(_bare_ort_loop(model, int(threads), float(seconds), dtype, [int(d) for d in shape.split(",")])))
