"""Shared helpers for benchmark scripts: result files that carry the host, and robust statistics."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgetl.fileio import write_json, write_text
from edgetl.hostinfo import host_record

RESULTS = Path(__file__).resolve().parent / "results"


def save(name: str, payload: dict[str, Any], markdown: str) -> Path:
    """Write results/<name>.json (with host and time) and results/<name>.md."""
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": host_record(), **payload}
    write_json(RESULTS / f"{name}.json", payload)
    host = payload["host"]
    libs = ", ".join(f"{k} {v}" for k, v in host["libraries"].items())
    write_text(RESULTS / f"{name}.md", f"{markdown.rstrip()}\n\nHost: {host['cpu_model']}, {host['cores_available']} cores, "
               f"flags {' '.join(host['cpu_flags'])}; {libs}. Command: `{' '.join(sys.argv)}`\n")  # fmt: skip
    print(json.dumps({k: v for k, v in payload.items() if k != "host"}, indent=1, default=str)[:4000])
    return RESULTS / f"{name}.json"


def spread(values: list[float]) -> dict[str, float]:
    """Median and IQR for noisy timings; mean and std too, for scores judged on their mean."""
    s = sorted(values)
    return {
        "median": statistics.median(s), "min": s[0], "max": s[-1], "n": len(s),
        "mean": statistics.fmean(s), "std": statistics.stdev(s) if len(s) > 1 else 0.0,
        "iqr": (s[(3 * len(s)) // 4] - s[len(s) // 4]) if len(s) >= 4 else s[-1] - s[0],
    }  # fmt: skip


def score_run(data: Path, run: Path) -> dict[str, Any]:
    """A finished run's kept-checkpoint validation top-1, its test top-1 on `data`, and its own stage wall times
    (so a run reused from an earlier invocation reports its real training time)."""
    from edgetl.evaluate import evaluate
    from edgetl.progress import Reporter

    metrics = json.loads((run / "metrics.json").read_text())
    test = evaluate(run, data, split="test", reporter=Reporter(quiet=True))
    return {"run": str(run), "val_top1": float(metrics["best"]["top1"]), "test_top1": test["top1"],
            "train_seconds": float(sum(s.get("seconds", 0.0) for s in metrics["stages"].values()))}  # fmt: skip


def train_and_score(data: Path, cfg: Any, run: Path) -> dict[str, Any]:
    """Train `cfg` on `data` into `run` unless a finished run is already there, then `score_run` it."""
    from edgetl.progress import Reporter
    from edgetl.train import train

    manifest = run / "manifest.json"
    if not (manifest.is_file() and json.loads(manifest.read_text()).get("status") == "finished"):
        train(data, cfg, out=str(run), reporter=Reporter(quiet=True))
    return score_run(data, run)
