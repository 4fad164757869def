"""Tables for the terminal from result dictionaries. Never runs models."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgetl.bench.reference import AGREEMENT_MARGIN
from edgetl.hostinfo import host_lines
from edgetl.progress import make_console


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _short(path: str, base: str) -> str:
    from pathlib import Path

    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return path


def print_export_report(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or make_console()
    table = Table(title=f"export of {escape(str(report['run']))} (parity on {report['parity_images']['n']} images)", show_edge=False)
    for col in ("file", "size", "precision", "top-1", "agreement", "max |Δlogit|", "gate"):
        table.add_column(col, justify="left" if col in ("file", "precision", "gate") else "right")
    ref = report["parity"]["pytorch"]
    table.add_row("PyTorch checkpoint", "", "fp32", f"{ref['top1']:.2%}", "", "", "reference")
    for key, rec in report["files"].items():
        p = report["parity"].get(key)
        if p is None:
            continue
        table.add_row(
            escape(_short(rec.get("moved_to", rec["path"]), report["run"])), _mb(rec["bytes"]), p["precision"], f"{p['top1']:.2%}",
            f"{p['top1_agreement']:.2%}", f"{p['max_abs_diff']:.1e}", p["gate"],
        )  # fmt: skip
    console.print(table)


def print_quantize_report(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or make_console()
    n = report["validation_images"]["n"]
    target = report.get("judged_on", {}).get("target")
    title = f"int8 of {escape(str(report['run']))} (accuracy on {n} validation images"
    title += f"; expected top-1 drop on {target['n']} target images, fp32's probabilities as labels" if target else ""
    table = Table(title=f"{title}; batch-1 latency medians)", show_edge=False)
    columns = ["runtime", "fp32 top-1", "int8 top-1", "drop", *(["target drop", "target changed"] if target else []),
               "fp32 ms", "int8 ms", "int8/fp32", "size", "kept in float", "runs in int8"]  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col == "runtime" else "right")
    for name, r in report["results"].items():
        lat = r["latency"]
        fp32_top1 = r["fp32_top1"]
        int8_top1 = r.get("int8_top1", r.get("top1"))
        changed = [f"{r['target_expected_drop_points']:+.2f} pt", f"{r['target_changed_points']:.2f}%"] if target else []
        table.add_row(
            name, f"{fp32_top1:.2%}", f"{int8_top1:.2%}", f"{r.get('val_drop_points', r['drop_points']):+.2f} pt", *changed,
            f"{lat['fp32']['median_ms']:.2f}", f"{lat['int8']['median_ms']:.2f}", f"{lat['int8_over_fp32']:.2f}x", f"{r['size_ratio']:.0%}",
            str(len(r["kept_in_float"])),
            f"{r['executed']['int8_compute_ops']}/{r['executed']['compute_ops']} ops" if "executed" in r else "-",
        )  # fmt: skip
    console.print(table)


def bench_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per variant (for CSV and tables)."""
    rows = []
    for r in report["results"]:
        lat, acc, proc = r.get("latency", {}), r.get("accuracy", {}), r.get("process", {})
        turns = r.get("reference", {}).get("turn_p50_ms") or []
        by_round = r.get("ratio_to_fp32_by_round") or []
        row = {
            "variant": r["variant"], "target": r["target"], "precision": r["precision"], "input": r["input"],
            "input_size": r.get("input_size"),
            "model": r["model"], "size_mb": round(r["bytes"] / 1e6, 3), "threads": r["threads"],
            "p50_ms": lat.get("p50_ms"), "p90_ms": lat.get("p90_ms"), "p99_ms": lat.get("p99_ms"), "mean_ms": lat.get("mean_ms"),
            "std_ms": lat.get("std_ms"), "runs": lat.get("runs"), "ratio_to_fp32": r.get("ratio_to_fp32_same_target"),
            # The ratio's range over the interleaved rounds: no ratio is surer than that.
            "ratio_to_fp32_min": min(by_round) if by_round else None, "ratio_to_fp32_max": max(by_round) if by_round else None,
            "top1": acc.get("top1"), "top5": acc.get("top5"), "macro_f1": acc.get("macro_f1"), "agreement": acc.get("top1_agreement"),
            "load_s": proc.get("load_seconds"), "cold_ms": proc.get("cold_ms"), "peak_rss_mb": proc.get("peak_rss_mb"),
            "runs_in": r.get("executed_precision"),
            "reference_tool": r.get("reference", {}).get("tool"), "reference_p50_ms": r.get("reference", {}).get("p50_ms"),
            "edgetl_over_reference": r.get("reference", {}).get("edgetl_over_reference"),
            "reference_verdict": r.get("reference", {}).get("verdict"),
            # The tool's turn medians: how far the host moved between its turns (a ratio is no better than that).
            "reference_turns_min_ms": min(turns) if turns else None, "reference_turns_max_ms": max(turns) if turns else None,
        }  # fmt: skip
        for b, ips in r.get("throughput", {}).items():
            row[f"images_per_s_b{b}"] = ips
        rows.append(row)
    return rows


def _fmt(v: Any, pattern: str) -> str:
    return "-" if v is None else pattern.format(v)


# How bench.md marks an edgetl / reference ratio that the tool's turns (and the agreement margin) do not cover.
VERDICT_MARK = {"edgetl-slower": " (slower)", "edgetl-faster": " (faster)"}


def _ratio_range(r: dict[str, Any]) -> str:
    lo, hi = r["ratio_to_fp32_min"], r["ratio_to_fp32_max"]
    return f" ({lo:.2f}-{hi:.2f})" if lo is not None and f"{lo:.2f}" != f"{hi:.2f}" else ""


def _several_sizes(rows: list[dict[str, Any]]) -> bool:
    """Models of different input sizes in one bench: the tables then show each row's size."""
    return len({r["input_size"] for r in rows}) > 1


def bench_markdown(report: dict[str, Any]) -> str:
    rows = bench_rows(report)
    batches = sorted({k for r in rows for k in r if k.startswith("images_per_s_b")}, key=lambda k: int(k.split("b")[-1]))
    refs = any(r["reference_p50_ms"] is not None for r in rows)
    sizes = _several_sizes(rows)
    head = ["variant", *(["input px"] if sizes else []), "runs in", "size MB", "top-1", "agree", "p50 ms", "p90 ms", "p99 ms",
            "std ms", "x fp32",
            *(["ref p50 ms", "edgetl / ref"] if refs else []),
            *[f"img/s b{k.split('b')[-1]}" for k in batches], "load s", "cold ms", "peak MB"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        turns = (f" ({r['reference_turns_min_ms']:.2f}-{r['reference_turns_max_ms']:.2f})"
                 if r["reference_turns_min_ms"] is not None and r["reference_turns_max_ms"] > r["reference_turns_min_ms"] else "")
        ratio = _fmt(r["edgetl_over_reference"], "{:.2f}") + VERDICT_MARK.get(r["reference_verdict"], "")
        ref_cells = [_fmt(r["reference_p50_ms"], "{:.2f}") + turns, ratio] if refs else []
        cells = [r["variant"], *([_fmt(r["input_size"], "{}")] if sizes else []), r["runs_in"] or "-", _fmt(r["size_mb"], "{:.2f}"),
                 _fmt(r["top1"], "{:.2%}"), _fmt(r["agreement"], "{:.1%}"),
                 _fmt(r["p50_ms"], "{:.2f}"), _fmt(r["p90_ms"], "{:.2f}"), _fmt(r["p99_ms"], "{:.2f}"), _fmt(r["std_ms"], "{:.2f}"),
                 _fmt(r["ratio_to_fp32"], "{:.2f}") + _ratio_range(r), *ref_cells, *[_fmt(r.get(k), "{:.0f}") for k in batches],
                 _fmt(r["load_s"], "{:.2f}"),
                 _fmt(r["cold_ms"], "{:.1f}"), _fmt(r["peak_rss_mb"], "{:.0f}")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    host = report["host"]
    data = report.get("data")
    notes = [
        "",
        f"Accuracy on {data['n']} images of {data['source']}" + (", each model on its own preprocessing of the same images "
        "(resize, centre crop to its input size, its normalisation), and timed on its own input size." if sizes else ".")
        if data else "No labelled images: accuracy left out.",
        f"Latency: batch 1, {report['options']['threads']} threads, warm-up {report['options']['warmup']}; "
        f"{report.get('method', 'variants interleaved in rounds')}, 5 rounds, >= {report['options']['min_time']:g} s each; "
        "'x fp32' is the ratio of p50 to the fp32 model of the same runtime in the same rounds (eager PyTorch for "
        "torch.compile), with its lowest and highest value in any one round in brackets; 'runs in' is the precision the "
        "runtime reports it executes. Load time (fresh process) includes "
        "importing the runtime library."
        + (" 'ref' is the runtime's own tool on the same file, threads and hint (OpenVINO benchmark_app -api sync -hint "
           "latency; ONNX Runtime a bare InferenceSession.run loop), taking turns inside the same rounds: its p50 is the median "
           "of its turns' medians, whose range is in brackets (a ratio is no surer than that range); a ratio marked slower or "
           f"faster lies outside that range widened by {AGREEMENT_MARGIN:.0%}, so edgetl and the tool did not time the same "
           "thing." if refs else ""),
        *host_lines(host),
    ]  # fmt: skip
    if report["skipped"]:
        notes.append("Skipped: " + "; ".join(f"{s['target']} ({s['reason']})" for s in report["skipped"]) + ".")
    return "\n".join(lines + notes) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not beaten on both lower latency and higher accuracy."""
    front = []
    for i, (lat, acc) in enumerate(points):
        if not any((l2 <= lat and a2 >= acc) and (l2 < lat or a2 > acc) for j, (l2, a2) in enumerate(points) if j != i):
            front.append(i)
    return front


# Where a label may go relative to its point (offset points), tried in this order until one collides with nothing:
# beside the point first, then further up or down (with a leader line).
LABEL_OFFSETS = [(6, 4), (6, -10), (-6, 4), (-6, -10)] + [(dx, dy) for step in range(1, 7) for dy in (14 * step, -10 - 14 * step)
                                                           for dx in (6, -6)]  # fmt: skip


def place_labels(ax: Any, points: list[tuple[float, float]], labels: list[str], fontsize: float = 7) -> list[Any]:
    """Annotate each point with its label where it overlaps no other label and no marker: the first
    free offset of LABEL_OFFSETS (else the least crowded one), most accurate points first; a thin
    leader line when the label had to move away from its point."""
    from matplotlib.text import Text

    fig = ax.figure
    fig.canvas.draw()  # the data -> pixel transform is final only after a draw
    renderer = fig.canvas.get_renderer()
    marker_boxes = []
    for x, y in points:
        px, py = ax.transData.transform((x, y))
        marker_boxes.append((px - 5, py - 5, px + 5, py + 5))
    placed: list[tuple[float, float, float, float]] = []
    texts = []
    for i in sorted(range(len(points)), key=lambda i: (-points[i][1], points[i][0])):
        x, y = points[i]
        others = placed + [m for j, m in enumerate(marker_boxes) if j != i]
        best: tuple[int, int, tuple[float, float, float, float]] | None = None
        for k, (dx, dy) in enumerate(LABEL_OFFSETS):
            probe = ax.annotate(labels[i], (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                                ha="left" if dx > 0 else "right", va="bottom")  # fmt: skip
            bb = Text.get_window_extent(probe, renderer)  # the text alone, not an arrow
            probe.remove()
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            hits = sum(_overlap(box, o) for o in others)
            if best is None or hits < best[0]:
                best = (hits, k, box)
            if hits == 0:
                break
        assert best is not None
        _, k, box = best
        dx, dy = LABEL_OFFSETS[k]
        texts.append(ax.annotate(labels[i], (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                                 ha="left" if dx > 0 else "right", va="bottom",
                                 arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5} if k >= 4 else None))  # fmt: skip
        placed.append(box)
    return texts


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def plot_bench(report: dict[str, Any], target: Any) -> None:
    from edgetl.fileio import write_with
    from edgetl.plots import _pyplot

    rows = [r for r in bench_rows(report) if r["p50_ms"] is not None]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    has_acc = all(r["top1"] is not None for r in rows)
    pts = [(r["p50_ms"], r["top1"] if has_acc else 0.0) for r in rows]
    front = set(pareto_front(pts)) if has_acc else set()
    others = [p for i, p in enumerate(pts) if i not in front]
    ax.scatter([p[0] for p in others], [p[1] for p in others], s=40, color="tab:blue", label="variant")
    if front:
        fp = sorted(pts[i] for i in front)
        # The front as a staircase: nothing above-left of it exists among these variants.
        ax.step([p[0] for p in fp], [p[1] for p in fp], where="post", ls="--", color="tab:orange", marker="*", ms=12,
                label="Pareto front (no variant both faster and more accurate)")  # fmt: skip
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xpad, ypad = (max(xs) - min(xs)) * 0.25 + 0.5, (max(ys) - min(ys)) * 0.3 + 0.005
    ax.set_xlim(max(0.0, min(xs) - xpad), max(xs) + xpad)
    ax.set_ylim(min(ys) - ypad, max(ys) + ypad)
    ax.set(xlabel="batch-1 latency p50 (ms)", ylabel="top-1" if has_acc else "(no accuracy data)", title="accuracy x latency")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    place_labels(ax, pts, [r["variant"] for r in rows])
    write_with(target, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def write_bench_files(report: dict[str, Any], out_dir: Any) -> dict[str, str]:
    from pathlib import Path

    from edgetl.fileio import write_csv, write_json, write_text

    out = Path(out_dir)
    paths = {k: str(out / f"bench.{k}") for k in ("json", "csv", "md", "png")}
    write_json(paths["json"], report)
    write_csv(paths["csv"], bench_rows(report))
    write_text(paths["md"], bench_markdown(report))
    plot_bench(report, paths["png"])
    return paths


def print_bench_table(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or make_console()
    table = Table(title="edgetl bench", show_edge=False)
    rows = bench_rows(report)
    refs = any(r["reference_p50_ms"] is not None for r in rows)
    sizes = _several_sizes(rows)
    for col in ("variant", *(["px"] if sizes else []), "runs in", "MB", "top-1", "agree", "p50 ms", "p99 ms", "x fp32",
                *(["ref p50 ms"] if refs else []), "img/s (largest batch)", "peak MB"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("variant", "runs in") else "right")
    for r in rows:
        tp = [k for k in r if k.startswith("images_per_s_b")]
        best = r[tp[-1]] if tp else None
        # escape: a run's name in brackets ("ort-cpu/int8 [l0]") would otherwise be read as rich markup and vanish.
        table.add_row(escape(r["variant"]), *([_fmt(r["input_size"], "{}")] if sizes else []), r["runs_in"] or "-",
                      _fmt(r["size_mb"], "{:.1f}"), _fmt(r["top1"], "{:.1%}"), _fmt(r["agreement"], "{:.1%}"),
                      _fmt(r["p50_ms"], "{:.2f}"), _fmt(r["p99_ms"], "{:.2f}"),
                      _fmt(r["ratio_to_fp32"], "{:.2f}"), *([_fmt(r["reference_p50_ms"], "{:.2f}")] if refs else []),
                      _fmt(best, "{:.0f}"), _fmt(r["peak_rss_mb"], "{:.0f}"))  # fmt: skip
    console.print(table)
    for s in report["skipped"]:
        console.print(f"skipped {s['target']}: {s['reason']}", markup=False)
