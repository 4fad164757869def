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
