"""One benchmark variant in a process of its own.

Why: runtimes leave threads behind after a run. ONNX Runtime's intra-op threads spin waiting for
the next call (PyTorch's OpenMP threads do the same), and in one process those threads take the
cores from whichever runtime runs next: measured on a 2-core Zen 4, OpenVINO int8 took 3.27 ms next
to an ONNX Runtime session and 2.24 ms without it. So every variant is loaded in its own worker and
the parent gives the workers their turns one at a time (rounds still interleaved in time, so drift
hits every variant alike). An idle worker blocks on its stdin, and its runtime's threads go to
sleep after their short spin; the parent leaves a pause between turns for that.

The worker also measures what only a fresh process can: load time (import and model load), the
first (cold) inference, and peak resident memory after warm-up at batch 1.

    python -m edgetl.bench.worker '{"target": ..., "model": ..., "kind": ..., "precision": ..., "input_dtype": ..., "shape": [...],
                                   "threads": N}'

then one JSON command per line on stdin, one JSON answer per line on stdout.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any

import numpy as np


def peak_rss_kb() -> float:
    """High-water RSS of this process. VmHWM belongs to the address space made at exec; ru_maxrss
    would still count the parent's memory at fork time on Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def serve(spec: dict[str, Any], stdin: Any, stdout: Any) -> None:
    from edgetl.bench import targets  # noqa: F401 - registers the built-in targets
    from edgetl.bench.base import TARGETS, Variant
    from edgetl.bench.timing import throughput, timed_runs
    from edgetl.runners import run_in_chunks

    def reply(obj: dict[str, Any]) -> None:
        stdout.write(json.dumps(obj) + "\n")
        stdout.flush()

    v = Variant(spec["target"], spec["model"], spec["kind"], spec["precision"], spec["input_dtype"],
                settings=tuple(tuple(kv) for kv in spec.get("settings", ())))  # fmt: skip
    x1 = np.zeros(spec["shape"], dtype=np.uint8 if v.input_dtype == "uint8" else np.float32)
    t0 = time.perf_counter()
    try:
        run = TARGETS[v.target].load(v, spec["threads"])
    except Exception as exc:  # a target that fails on this model is reported by the parent, not fatal
        reply({"error": f"failed to load {os.path.basename(str(v.model))}: {type(exc).__name__}: {str(exc)[:160]}"})
        return
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    run(x1)
    cold_ms = (time.perf_counter() - t1) * 1000
    for _ in range(5):
        run(x1)
    executed = getattr(run, "precision", None) or v.precision
    reply({"ready": True, "pid": os.getpid(), "load_seconds": load_s, "cold_ms": cold_ms, "peak_rss_mb": peak_rss_kb() / 1024,
           "executed_precision": executed, "settings": getattr(run, "settings", None)})  # fmt: skip
    for line in stdin:
        cmd = json.loads(line)
        op = cmd["cmd"]
        if op == "exit":
            return
        x = np.load(cmd["input"]) if "input" in cmd else None
        if op == "predict":
            np.save(cmd["output"], run_in_chunks(run, x, cmd.get("fixed_batch")))
            reply({"ok": True})
        elif op == "warmup":
            for _ in range(cmd["n"]):
                run(x)
            reply({"ok": True})
        elif op == "time":
            reply({"ms": timed_runs(run, x, cmd["seconds"], cmd.get("runs"))})
        elif op == "throughput":
            reply({"images_per_second": throughput(run, x, cmd["seconds"])})
        else:
            reply({"error": f"unknown command {op!r}"})


def main() -> None:
    # Answers go on a private copy of stdout; fd 1 itself is pointed at stderr, so whatever a runtime
    # or library prints (from Python or C++) cannot break the one-JSON-object-per-line protocol.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(json.loads(sys.argv[1]), sys.stdin, replies)


if __name__ == "__main__":
    main()
