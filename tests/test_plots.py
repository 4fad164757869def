"""Plots take any class name: one in a script the installed fonts lack is drawn, without a warning per glyph."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image

from edgetl.plots import plot_confusion


def test_a_class_name_in_any_script_plots_without_warnings(tmp_path: Path) -> None:
    target = tmp_path / "confusion.png"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_confusion([[3, 1], [0, 4]], ["bag", "日本の服"], target, "validation")
    assert [str(w.message) for w in caught] == []
    with Image.open(target) as img:
        assert img.format == "PNG" and img.size[0] > 100
