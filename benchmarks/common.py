"""Shared helpers for benchmark scripts: result files that carry the host, and robust statistics."""

from __future__ import annotations

import ast
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgetl.config import has_type
from edgetl.errors import EdgetlError
from edgetl.fileio import write_json, write_text
from edgetl.hostinfo import host_lines, host_record

RESULTS = Path(__file__).resolve().parent / "results"


def save(name: str, payload: dict[str, Any], markdown: str) -> Path:
    """Write results/<name>.json (with host and time) and results/<name>.md."""
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": host_record(), **payload}
    write_json(RESULTS / f"{name}.json", payload)
    lines = host_lines(payload["host"])
    write_text(RESULTS / f"{name}.md", f"{markdown.rstrip()}\n\n" + "\n".join(lines) + f"\nCommand: `{' '.join(sys.argv)}`\n")
    print(json.dumps({k: v for k, v in payload.items() if k != "host"}, indent=1, default=str)[:4000])
    return RESULTS / f"{name}.json"


def result_name(base: str, suffix: str = "") -> str:
    """A results file's name: `base`, or `base_suffix` for a variant or another host (--tag / --label)."""
    return f"{base}_{suffix}" if suffix else base


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


def read_settings(base: Any, items: list[str]) -> dict[str, Any]:
    """The `--set KEY=VALUE` items for the options dataclass `base` (TrainConfig, AdaptOptions) as {key: value}.

    VALUE is a Python literal, or the text itself where the field takes text (`--set teacher=/some/run`,
    `--set unfreeze=3`); true/false (and 1/0 where the field is a bool) are booleans. Each value must fit its field's declared type
    (edgetl.config.has_type, the check recorded configs go through) and `base` with all of them applied must pass
    the options' own validation; anything else (an unknown key, a wrong type, an invalid value) ends the script
    in one line before anything runs, not in a traceback from deep inside training or adapting."""
    annotations = {f.name: str(f.type) for f in dataclasses.fields(base)}
    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in annotations:
            raise SystemExit(f"--set {item}: expected KEY=VALUE with KEY one of {', '.join(annotations)}")
        try:
            literal = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            literal = text
        # A bool field also takes 1/0; an int field still gets the int first, so `seed=1` stays 1.
        flag = {"true": True, "false": False, "1": True, "0": False}.get(text.strip().lower())
        candidates = [literal, text] + ([flag] if flag is not None else [])
        fitting = [c for c in candidates if has_type(c, annotations[key])]
        if not fitting:
            raise SystemExit(f"--set {item}: {key} takes {annotations[key]}, got {text!r}")
        values[key] = fitting[0]
    try:
        dataclasses.replace(base, **values)
    except EdgetlError as exc:
        raise SystemExit(f"--set {' '.join(items)}: {exc}") from None
    return values


def load_result(name: str, what: str = "result file") -> dict[str, Any]:
    """results/<name>.json as a dict; a missing one ends the script in one line naming `what` it should be."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"no {what} {path}")
    return json.loads(path.read_text())


def ungated_top1(result: dict[str, float], method: str) -> float:
    """A method's top-1 without the shift gate on one condition of an adapt_corruptions result: recorded as
    `<method>_ungated` where the gate shut, else the method's own top-1 (the gate opened, or there was none)."""
    return result.get(f"{method}_ungated", result[method])


def adapt_result_path(tag: str) -> Path:
    """results/adapt_corruptions_<tag>.json (`-` or "" for the untagged file); a missing one ends the script in one line."""
    path = RESULTS / ("adapt_corruptions.json" if tag in ("", "-") else f"adapt_corruptions_{tag}.json")
    if not path.is_file():
        raise SystemExit(f"no result file {path} (tags name results/adapt_corruptions_<tag>.json)")
    return path


def recorded_args(path: Path) -> dict[str, Any]:
    """The command-line arguments a result file was made with: its JSON's `args`, or, for files written before
    those were recorded, the `--flag value` pairs of the command line at the end of its Markdown (dashes as
    underscores; only flags followed by one value)."""
    import re
    import shlex

    payload = json.loads(path.read_text())
    if "args" in payload:
        return dict(payload["args"])
    command = re.search(r"Command: `([^`]*)`", path.with_suffix(".md").read_text())
    if command is None:
        raise SystemExit(f"{path}: no recorded arguments and no command line in its Markdown")
    argv = shlex.split(command.group(1))
    return {a[2:].replace("-", "_"): argv[i + 1] for i, a in enumerate(argv[:-1])
            if a.startswith("--") and not argv[i + 1].startswith("--")}  # fmt: skip


# A corruption counts in "share of the lost accuracy won back" when it cost more than 1 point of top-1:
# below that, one image more or less swings the share by tens of percent.
MIN_LOST = 0.01


def share_won_back(clean: float, corrupted: float, adapted: float) -> float | None:
    """The share of the top-1 lost to a corruption (clean -> corrupted) that adapting won back; None when the
    corruption cost MIN_LOST or less."""
    lost = clean - corrupted
    return (adapted - corrupted) / lost if lost > MIN_LOST else None
