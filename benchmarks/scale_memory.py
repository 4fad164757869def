"""Peak memory and throughput of `edgetl train` as the dataset grows (issue 14).

    python benchmarks/scale_memory.py --sizes 2000 20000 100000      # tiny backbone, generated JPEG folders
    python benchmarks/scale_memory.py --sizes 2000 --lite0 --workers-compare --processes-compare --baseline REV

Generates folders of N photos-like JPEGs (240x180, 10 classes; kept under /tmp/edgetl-bench-data) and
runs `edgetl train` on each in its own process, sampling the resident memory of the whole process
tree (training processes and DataLoader workers) every 0.1 s: peak RSS, and peak anonymous RSS (what
the process itself allocated, without file pages such as the decode cache's page cache). Images/s
come from the run's manifest. `--baseline REV` runs the same command with edgetl at git revision REV
(a worktree) for the before/after comparison on the smallest size.

Writes benchmarks/results/scale_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from common import result_name, save
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/tmp/edgetl-bench-data")
RUNS = Path("/tmp/edgetl-bench-runs/scale")
TINY = ["--backbone", "tiny", "--no-pretrained", "--input-size", "160", "--epochs-head", "2", "--epochs-finetune", "1",
        "--patience", "0", "--lr-head", "0.01"]  # fmt: skip
LITE0 = ["--epochs-head", "2", "--epochs-finetune", "1", "--patience", "0"]


def generate(n: int) -> Path:
    folder = DATA / f"gen-{n}"
    done = folder / ".complete"
    if done.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (180, 480, 3), dtype=np.uint8)
    colours = rng.integers(30, 225, (10, 3))
    for i in range(n):
        c = i % 10
        d = folder / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        x0 = int(rng.integers(0, 240))
        img = (base[:, x0 : x0 + 240].astype(np.int16) // 2 + colours[c] // 2).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"{i:06d}.jpg", quality=85)
    done.write_text("")
    return folder


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(RSS, anonymous RSS) summed over `proc` and its children, from /proc/<pid>/status."""
    total = anon = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        total += int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        anon += int(fields.get("RssAnon", "0 kB").split()[0]) * 1024
    return total, anon


def measure(cmd: list[str], run: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    ps = psutil.Process(proc.pid)
    peak = peak_anon = 0
    while proc.poll() is None:
        rss, anon = tree_rss(ps)
        peak, peak_anon = max(peak, rss), max(peak_anon, anon)
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    manifest = json.loads((run / "manifest.json").read_text())
    t = manifest["timings"]
    n_train = sum(manifest["dataset"]["counts"]["train"])
    head = t.get("head", {})
    return {
        "peak_rss_mb": peak / 2**20, "peak_anon_rss_mb": peak_anon / 2**20, "wall_seconds": wall, "train_images": n_train,
        "feature_cache_seconds": head.get("feature_cache_seconds"),
        "feature_images_per_second": n_train / head["feature_cache_seconds"] if head.get("feature_cache_seconds") else None,
        "finetune_images_per_second": t.get("finetune", {}).get("images_per_second"),
    }  # fmt: skip


def train_cmd(data: Path, extra: list[str], run: Path, tree: Path = ROOT) -> list[str]:
    return edgetl_cmd(["train", str(data), *extra, "--out", str(run)], tree)


def edgetl_cmd(args: list[str], tree: Path = ROOT) -> list[str]:
    # `python -c` with the tree on sys.path: older revisions have no `python -m edgetl`.
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tree)!r}); sys.argv[0] = 'edgetl'; "
            "from edgetl.cli.main import run; run()", *args]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000])
    ap.add_argument("--lite0", action="store_true", help="also Lite0 on the smallest size")
    ap.add_argument("--workers-compare", action="store_true", help="Lite0 feature extraction with 0 vs 2 DataLoader workers")
    ap.add_argument("--processes-compare", action="store_true", help="1 vs 2 training processes on the smallest size")
    ap.add_argument("--baseline", default=None, help="git revision to compare with on the smallest size")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    args = ap.parse_args()
    rows: dict[str, Any] = {}
    small = min(args.sizes)
    for n in args.sizes:
        data = generate(n)
        rows[f"tiny-{n}"] = measure(train_cmd(data, TINY, RUNS / f"tiny-{n}"), RUNS / f"tiny-{n}")
        print(n, rows[f"tiny-{n}"], flush=True)
    data = generate(small)
    if args.baseline:
        tree = Path(f"/tmp/edgetl-rev-{args.baseline}")
        if not tree.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.baseline], check=True)
        rows[f"tiny-{small}-before"] = measure(train_cmd(data, TINY, RUNS / "before", tree), RUNS / "before")
        if args.lite0:
            rows[f"lite0-{small}-before"] = measure(train_cmd(data, LITE0, RUNS / "lite0-before", tree), RUNS / "lite0-before")
    if args.lite0:
        rows[f"lite0-{small}"] = measure(train_cmd(data, LITE0, RUNS / "lite0"), RUNS / "lite0")
    if args.workers_compare:
        rows[f"lite0-{small}-workers2"] = measure(train_cmd(data, [*LITE0, "--workers", "2"], RUNS / "lite0-w2"), RUNS / "lite0-w2")
    if args.processes_compare:
        rows[f"tiny-{small}-2proc"] = measure(train_cmd(data, [*TINY, "--nproc-per-node", "2"], RUNS / "2proc"), RUNS / "2proc")
    sizes = sorted(args.sizes)
    flat = rows[f"tiny-{sizes[-1]}"]["peak_rss_mb"] / rows[f"tiny-{sizes[0]}"]["peak_rss_mb"] if len(sizes) > 1 else None
    lines = ["# Peak memory and throughput of `edgetl train` by dataset size", "",
             "| run | train images | peak RSS MB | peak anon RSS MB | features img/s | fine-tune img/s | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, r in rows.items():
        fi = f"{r['feature_images_per_second']:.0f}" if r["feature_images_per_second"] else "-"
        ft = f"{r['finetune_images_per_second']:.0f}" if r["finetune_images_per_second"] else "-"
        mem = f"{r['peak_rss_mb']:.0f} | {r['peak_anon_rss_mb']:.0f}"
        lines.append(f"| {name} | {r['train_images']} | {mem} | {fi} | {ft} | {r['wall_seconds']:.0f} |")
    if flat is not None:
        lines += ["", f"Peak RSS {sizes[-1]} / {sizes[0]} images: {flat:.2f}x (goal <= 1.5x)."]
    payload = {"rows": rows, "peak_rss_ratio_largest_over_smallest": flat, "tiny_args": TINY, "lite0_args": LITE0}
    save(result_name("scale_memory", args.tag), payload, "\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
