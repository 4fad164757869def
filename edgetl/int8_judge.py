"""What an int8 candidate is judged on against --max-drop.

Every run: top-1 on its recorded validation images, fp32 minus int8, in points.

An adapted run (`edgetl adapt`) is deployed on another domain than its validation split, and an int8 model
calibrated there can hold its accuracy on clean validation images and lose it on the target images
(measured: -0.9 points on clean validation, 5.9 points on defocus-blurred target images). Target images
have no labels, so they are judged by agreement with the fp32 model: the share of target images whose
top-1 class int8 changes. That is an upper bound on the top-1 points int8 can lose there (a prediction
fp32 gets right and int8 gets wrong is one int8 changed), so it needs no labels and never flatters.
The judged drop is the larger of the two. Target images judged on are ones int8 was not calibrated on
(quantize calibrates on at most half of them when there are enough), as validation images are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgetl import run as runfolder
from edgetl.parity import ParityData, prepare
from edgetl.progress import Reporter

# Fewer target images than this left out of calibration: judge on all of them (an in-sample check, noted).
TARGET_JUDGE_MIN = 32


@dataclass
class JudgeSet:
    val: ParityData
    target: ParityData | None = None  # adapted runs: recorded target images (labels unused)
    target_note: str | None = None

    def outputs(self, predict: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """A model's outputs on every judged image, validation first (run per set: no copy of the inputs)."""
        out = predict(self.val.floats)
        return out if self.target is None else np.concatenate([out, predict(self.target.floats)])

    def score(self, fp32_logits: np.ndarray, int8_logits: np.ndarray) -> dict[str, Any]:
        """fp32 and int8 `outputs` -> top-1s, each measured drop, and the judged drop (points)."""
        n = len(self.val.floats)
        fp32_top1 = float((fp32_logits[:n].argmax(1) == self.val.labels).mean())
        top1 = float((int8_logits[:n].argmax(1) == self.val.labels).mean())
        val_drop = (fp32_top1 - top1) * 100
        out: dict[str, Any] = {"fp32_top1": fp32_top1, "top1": top1, "val_drop_points": val_drop, "drop_points": val_drop}
        if self.target is not None:
            changed = float((fp32_logits[n:].argmax(1) != int8_logits[n:].argmax(1)).mean()) * 100
            out["target_changed_points"] = changed
            out["drop_points"] = max(val_drop, changed)
        return out

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"validation": self.val.describe()}
        if self.target is not None:
            out["target"] = {**self.target.describe(), "note": self.target_note}
        return out

    def log_line(self, judged: dict[str, Any]) -> str:
        line = f"top-1 {judged['top1']:.2%} (drop {judged['val_drop_points']:+.2f} points on validation"
        if "target_changed_points" in judged:
            line += f", top-1 class changed on {judged['target_changed_points']:.2f}% of target images"
        return line + ")"


def target_check_images(run: runfolder.RunFolder, spec: Any, calib_keys: list[str], max_images: int, seed: int,
                        allow_changed: bool, reporter: Reporter) -> tuple[ParityData | None, str | None]:  # fmt: skip
    """An adapted run's recorded target images to judge int8 on: those not used for calibration when
    at least TARGET_JUDGE_MIN are left, else all of them (the note says which). None for a run that was not adapted."""
    record = run.target_record()
    if record is None:
        return None, None
    from edgetl.target import recorded_target

    pool = recorded_target(record, allow_changed)
    used = set(calib_keys)
    held = [i for i, r in enumerate(pool.refs) if r.key not in used]
    if len(held) >= TARGET_JUDGE_MIN:
        idx, note = np.asarray(held), f"{len(held)} target images not used for calibration"
    else:
        idx, note = np.arange(len(pool)), f"all {len(pool)} target images (too few are left out of calibration to judge on them alone)"
    if len(idx) > max_images:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_images, replace=False))
        note += f", a seeded sample of {max_images}"
    return prepare(pool.subset(idx), spec, f"{record['root']} (target images of the adaptation)", reporter), note
