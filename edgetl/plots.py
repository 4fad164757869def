"""Plots: training curves, the confusion matrix and the shift report of `adapt`, written atomically as PNG."""

from __future__ import annotations

import os
from typing import Any

from edgetl.fileio import write_with

# Fonts with the scripts DejaVu Sans lacks (class names in Chinese, Japanese, Korean, ...), used where installed.
_FALLBACK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK KR", "Source Han Sans", "WenQuanYi Zen Hei",
                   "Droid Sans Fallback", "Arial Unicode MS", "Microsoft YaHei", "PingFang SC", "Hiragino Sans", "Noto Sans")  # fmt: skip


def _pyplot():
    import warnings

    import matplotlib
    from matplotlib import font_manager

    matplotlib.use("Agg")  # no display on servers; never try to open a window
    import matplotlib.pyplot as plt

    installed = {f.name for f in font_manager.fontManager.ttflist}
    extra = [name for name in _FALLBACK_FONTS if name in installed and name not in plt.rcParams["font.sans-serif"]]
    plt.rcParams["font.sans-serif"] = [*plt.rcParams["font.sans-serif"], *extra]  # matplotlib falls back glyph by glyph
    # A class name in a script no installed font has is drawn as boxes in the plot (it is written out in the
    # terminal and the JSON); matplotlib's warning for each such glyph would only clutter the training log.
    warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
    return plt


def plot_curves(history: list[dict[str, Any]], target: str | os.PathLike[str]) -> None:
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for stage, style in (("head", "-"), ("finetune", "--")):
        rows = [r for r in history if r["stage"] == stage]
        if not rows:
            continue
        x = [r["global_epoch"] for r in rows]
        ax_loss.plot(x, [r["train_loss"] for r in rows], style, color="tab:blue", label=f"train ({stage})")
        ax_loss.plot(x, [r["val_loss"] for r in rows], style, color="tab:orange", label=f"val ({stage})")
        ax_acc.plot(x, [r["val_top1"] for r in rows], style, color="tab:green", label=f"val top-1 ({stage})")
        if rows[0].get("train_top1") is not None:
            ax_acc.plot(x, [r["train_top1"] for r in rows], style, color="tab:gray", label=f"train top-1 ({stage})")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1", title="accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_with(target, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def plot_confusion(cm: list[list[int]], labels: list[str], target: str | os.PathLike[str], title: str) -> None:
    import numpy as np

    plt = _pyplot()
    mat = np.asarray(cm, dtype=float)
    norm = mat / np.maximum(mat.sum(axis=1, keepdims=True), 1)
    n = len(labels)
    size = max(4.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if mat[i, j]:
                    ax.text(j, i, int(mat[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
    fig.tight_layout()
    write_with(target, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def plot_shift(report: dict[str, Any], classes: list[str], target: str | os.PathLike[str]) -> None:
    import numpy as np

    """Predicted-class shares before and after against the training prior, and the headline numbers."""
    plt = _pyplot()
    fig, (ax_bar, ax_num) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    x = np.arange(len(classes))
    w = 0.28
    ax_bar.bar(x - w, report["prior"], w, label="training prior", color="#999999")
    ax_bar.bar(x, report["before"]["predicted_shares"], w, label="target, before", color="#d95f02")
    ax_bar.bar(x + w, report["after"]["predicted_shares"], w, label="target, after", color="#1b9e77")
    ax_bar.set_xticks(x, classes, rotation=45, ha="right")
    ax_bar.set_ylabel("share of images")
    ax_bar.set_title("predicted classes")
    ax_bar.legend()
    rows = [("feature shift", "feature_shift", "{:.3f}"), ("mean confidence", "mean_confidence", "{:.2f}"),
            ("distance to prior", "prior_distance", "{:.2f}")]  # fmt: skip
    if "top1" in report["before"]:
        rows.append(("top-1 (labelled)", "top1", "{:.1%}"))
    text = [f"{'':18s}{'before':>9s}{'after':>9s}"]
    for name, key, fmt in rows:
        text.append(f"{name:18s}{fmt.format(report['before'][key]):>9s}{fmt.format(report['after'][key]):>9s}")
    text.append("")
    text.append(f"in-domain feature shift: {report['in_domain_feature_shift']:.3f}")
    ax_num.axis("off")
    ax_num.text(0, 1, "\n".join(text), family="monospace", va="top", fontsize=9)
    fig.tight_layout()
    write_with(target, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
