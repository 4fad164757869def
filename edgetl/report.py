"""Tables for the terminal from result dictionaries. Never runs models."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _short(path: str, base: str) -> str:
    from pathlib import Path

    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return path


def print_export_report(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
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
    console = console or Console()
    n = report["validation_images"]["n"]
    table = Table(title=f"int8 of {report['run']} (accuracy on {n} validation images, batch-1 latency medians)", show_edge=False)
    for col in ("runtime", "fp32 top-1", "int8 top-1", "drop", "fp32 ms", "int8 ms", "int8/fp32", "size", "in float"):
        table.add_column(col, justify="left" if col == "runtime" else "right")
    for name, r in report["results"].items():
        lat = r["latency"]
        fp32_top1 = r["fp32_top1"]
        int8_top1 = r.get("int8_top1", r.get("top1"))
        table.add_row(
            name, f"{fp32_top1:.2%}", f"{int8_top1:.2%}", f"{r['drop_points']:+.2f} pt", f"{lat['fp32']['median_ms']:.2f}",
            f"{lat['int8']['median_ms']:.2f}", f"{lat['int8_over_fp32']:.2f}x", f"{r['size_ratio']:.0%}", str(len(r["kept_in_float"])),
        )  # fmt: skip
    console.print(table)
