"""Tables for the terminal from result dictionaries. Never runs models."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

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
    table = Table(title=f"export of {report['run']} (parity on {report['parity_images']['n']} images)", show_edge=False)
    for col in ("file", "size", "precision", "top-1", "agreement", "max |Δlogit|", "gate"):
        table.add_column(col, justify="left" if col in ("file", "precision", "gate") else "right")
    ref = report["parity"]["pytorch"]
    table.add_row("PyTorch checkpoint", "", "fp32", f"{ref['top1']:.2%}", "", "", "reference")
    for key, rec in report["files"].items():
        p = report["parity"].get(key)
        if p is None:
            continue
        table.add_row(
            _short(rec.get("moved_to", rec["path"]), report["run"]), _mb(rec["bytes"]), p["precision"], f"{p['top1']:.2%}",
            f"{p['top1_agreement']:.2%}", f"{p['max_abs_diff']:.1e}", p["gate"],
        )  # fmt: skip
    console.print(table)


def print_quantize_report(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or make_console()
    n = report["validation_images"]["n"]
    table = Table(title=f"int8 of {report['run']} (accuracy on {n} validation images, batch-1 latency medians)", show_edge=False)
    for col in ("runtime", "fp32 top-1", "int8 top-1", "drop", "fp32 ms", "int8 ms", "int8/fp32", "size", "kept in float", "runs in int8"):
        table.add_column(col, justify="left" if col == "runtime" else "right")
    for name, r in report["results"].items():
        lat = r["latency"]
        fp32_top1 = r["fp32_top1"]
        int8_top1 = r.get("int8_top1", r.get("top1"))
        table.add_row(
            name, f"{fp32_top1:.2%}", f"{int8_top1:.2%}", f"{r['drop_points']:+.2f} pt", f"{lat['fp32']['median_ms']:.2f}",
            f"{lat['int8']['median_ms']:.2f}", f"{lat['int8_over_fp32']:.2f}x", f"{r['size_ratio']:.0%}", str(len(r["kept_in_float"])),
            f"{r['executed']['int8_compute_ops']}/{r['executed']['compute_ops']} ops" if "executed" in r else "-",
        )  # fmt: skip
    console.print(table)


def bench_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per variant (for CSV and tables)."""
    rows = []
    for r in report["results"]:
        lat, acc, proc = r.get("latency", {}), r.get("accuracy", {}), r.get("process", {})
        row = {
            "variant": r["variant"], "target": r["target"], "precision": r["precision"], "input": r["input"],
            "model": r["model"], "size_mb": round(r["bytes"] / 1e6, 3), "threads": r["threads"],
            "p50_ms": lat.get("p50_ms"), "p90_ms": lat.get("p90_ms"), "p99_ms": lat.get("p99_ms"), "mean_ms": lat.get("mean_ms"),
            "std_ms": lat.get("std_ms"), "runs": lat.get("runs"), "ratio_to_fp32": r.get("ratio_to_fp32_same_target"),
            "top1": acc.get("top1"), "top5": acc.get("top5"), "macro_f1": acc.get("macro_f1"), "agreement": acc.get("top1_agreement"),
            "load_s": proc.get("load_seconds"), "cold_ms": proc.get("cold_ms"), "peak_rss_mb": proc.get("peak_rss_mb"),
            "runs_in": r.get("executed_precision"),
            "reference_tool": r.get("reference", {}).get("tool"), "reference_p50_ms": r.get("reference", {}).get("p50_ms"),
            "edgetl_over_reference": r.get("reference", {}).get("edgetl_over_reference"),
        }  # fmt: skip
        for b, ips in r.get("throughput", {}).items():
            row[f"images_per_s_b{b}"] = ips
        rows.append(row)
    return rows


def _fmt(v: Any, pattern: str) -> str:
    return "-" if v is None else pattern.format(v)


def bench_markdown(report: dict[str, Any]) -> str:
    rows = bench_rows(report)
    batches = sorted({k for r in rows for k in r if k.startswith("images_per_s_b")}, key=lambda k: int(k.split("b")[-1]))
    refs = any(r["reference_p50_ms"] is not None for r in rows)
    head = ["variant", "runs in", "size MB", "top-1", "agree", "p50 ms", "p90 ms", "p99 ms", "std ms", "x fp32",
            *(["ref p50 ms", "edgetl / ref"] if refs else []),
            *[f"img/s b{k.split('b')[-1]}" for k in batches], "load s", "cold ms", "peak MB"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ref_cells = [_fmt(r["reference_p50_ms"], "{:.2f}"), _fmt(r["edgetl_over_reference"], "{:.2f}")] if refs else []
        cells = [r["variant"], r["runs_in"] or "-", _fmt(r["size_mb"], "{:.2f}"), _fmt(r["top1"], "{:.2%}"), _fmt(r["agreement"], "{:.1%}"),
                 _fmt(r["p50_ms"], "{:.2f}"), _fmt(r["p90_ms"], "{:.2f}"), _fmt(r["p99_ms"], "{:.2f}"), _fmt(r["std_ms"], "{:.2f}"),
                 _fmt(r["ratio_to_fp32"], "{:.2f}"), *ref_cells, *[_fmt(r.get(k), "{:.0f}") for k in batches], _fmt(r["load_s"], "{:.2f}"),
                 _fmt(r["cold_ms"], "{:.1f}"), _fmt(r["peak_rss_mb"], "{:.0f}")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    host = report["host"]
    data = report.get("data")
    notes = [
        "", f"Accuracy on {data['n']} images of {data['source']}." if data else "No labelled images: accuracy left out.",
        f"Latency: batch 1, {report['options']['threads']} threads, warm-up {report['options']['warmup']}; "
        f"{report.get('method', 'variants interleaved in rounds')}, 5 rounds, >= {report['options']['min_time']:g} s each; "
        "'x fp32' is the ratio of p50 to the fp32 model of the same runtime in the same rounds (eager PyTorch for "
        "torch.compile); 'runs in' is the precision the runtime reports it executes. Load time (fresh process) includes "
        "importing the runtime library."
        + (" 'ref' is the runtime's own tool on the same file, threads and hint (OpenVINO benchmark_app -api sync -hint "
           "latency; ONNX Runtime a bare InferenceSession.run loop), run after edgetl's timing." if refs else ""),
        f"Host: {host['cpu_model']}, {host['cores_available']} cores, flags {' '.join(host['cpu_flags'])} "
        f"(VNNI: {host['vnni']}, bf16: {host['bf16']}).",
        "Libraries: " + ", ".join(f"{k} {v}" for k, v in host["libraries"].items()) + ".",
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


def plot_bench(report: dict[str, Any], target: Any) -> None:
    from edgetl.fileio import write_with
    from edgetl.plots import _pyplot

    rows = [r for r in bench_rows(report) if r["p50_ms"] is not None]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    has_acc = all(r["top1"] is not None for r in rows)
    pts = [(r["p50_ms"], r["top1"] if has_acc else 0.0) for r in rows]
    front = set(pareto_front(pts)) if has_acc else set()
    for i, (r, (x, y)) in enumerate(zip(rows, pts, strict=True)):
        ax.scatter([x], [y], marker="*" if i in front else "o", s=120 if i in front else 50)
        ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7)
    if front:
        fp = sorted(pts[i] for i in front)
        ax.plot([p[0] for p in fp], [p[1] for p in fp], "--", color="gray", label="Pareto front")
        ax.legend()
    ax.set(xlabel="batch-1 latency p50 (ms)", ylabel="top-1" if has_acc else "(no accuracy data)", title="accuracy x latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
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
    for col in ("variant", "runs in", "MB", "top-1", "agree", "p50 ms", "p99 ms", "x fp32", *(["ref p50 ms"] if refs else []),
                "img/s (largest batch)", "peak MB"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("variant", "runs in") else "right")
    for r in rows:
        tp = [k for k in r if k.startswith("images_per_s_b")]
        best = r[tp[-1]] if tp else None
        table.add_row(r["variant"], r["runs_in"] or "-", _fmt(r["size_mb"], "{:.1f}"), _fmt(r["top1"], "{:.1%}"),
                      _fmt(r["agreement"], "{:.1%}"), _fmt(r["p50_ms"], "{:.2f}"), _fmt(r["p99_ms"], "{:.2f}"),
                      _fmt(r["ratio_to_fp32"], "{:.2f}"), *([_fmt(r["reference_p50_ms"], "{:.2f}")] if refs else []),
                      _fmt(best, "{:.0f}"), _fmt(r["peak_rss_mb"], "{:.0f}"))  # fmt: skip
    console.print(table)
    for s in report["skipped"]:
        console.print(f"skipped {s['target']}: {s['reason']}")
