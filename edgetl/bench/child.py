"""Measured in a fresh process per variant: load time, first (cold) inference, peak resident memory.

    python -m edgetl.bench.child '{"target": ..., "model": ..., "kind": ..., "precision": ...,
                                   "input_dtype": ..., "shape": [...], "threads": N}'
"""

from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np


def main() -> None:
    spec = json.loads(sys.argv[1])
    from edgetl.bench import targets  # noqa: F401 - registers the built-in targets
    from edgetl.bench.base import TARGETS, Variant

    v = Variant(spec["target"], spec["model"], spec["kind"], spec["precision"], spec["input_dtype"])
    x = np.zeros(spec["shape"], dtype=np.uint8 if v.input_dtype == "uint8" else np.float32)
    t0 = time.perf_counter()
    run = TARGETS[v.target].load(v, spec["threads"])
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    run(x)
    cold_ms = (time.perf_counter() - t1) * 1000
    for _ in range(5):
        run(x)
    print(json.dumps({"load_seconds": load_s, "cold_ms": cold_ms, "peak_rss_mb": peak_rss_kb() / 1024}))


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


if __name__ == "__main__":
    main()
