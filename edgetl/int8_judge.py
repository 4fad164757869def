"""What an int8 candidate is judged on against --max-drop.

Every run: top-1 on its recorded validation images, fp32 minus int8, in points.

An adapted run (`edgetl adapt`) is deployed on another domain than its validation split, and an int8 model
calibrated there can hold its accuracy on clean validation images and lose it on the target images
(measured: -0.9 points on clean validation, 5.9 points on defocus-blurred target images). Target images
have no labels, so the fp32 model's own class probabilities stand in for them: the expected top-1 points
int8 loses there is the mean over target images of p_fp32(fp32's class) - p_fp32(int8's class). It is 0
where int8 keeps the class, and a changed class costs what fp32 was sure of it, so a near tie that flips
costs little while a confident prediction that flips costs a point. (The share of changed classes, also
recorded, bounds the loss but makes a budget of 1 point on 100 images mean "no image may flip".)
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
        fp32_right = int((fp32_logits[:n].argmax(1) == self.val.labels).sum())
        int8_right = int((int8_logits[:n].argmax(1) == self.val.labels).sum())
        fp32_top1, top1 = fp32_right / n, int8_right / n
        # From the counts: (0.84 - 0.83) * 100 is 1.0000000000000142, which a budget of 1 point would refuse.
        val_drop = (fp32_right - int8_right) * 100 / n
        out: dict[str, Any] = {"fp32_top1": fp32_top1, "top1": top1, "val_drop_points": val_drop, "drop_points": val_drop}
        if self.target is not None:
            expected = self.expected_target_drop(fp32_logits[n:], int8_logits[n:])
            out["target_changed_points"] = float((fp32_logits[n:].argmax(1) != int8_logits[n:].argmax(1)).mean()) * 100
            out["target_expected_drop_points"] = expected
            out["drop_points"] = max(val_drop, expected)
        return out

    @staticmethod
    def expected_target_drop(fp32_logits: np.ndarray, int8_logits: np.ndarray) -> float:
        """Expected top-1 points int8 loses on unlabelled images, fp32's probabilities standing in for the labels."""
        z = fp32_logits.astype(np.float64)
        prob = np.exp(z - z.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        rows = np.arange(len(z))
        return float((prob[rows, z.argmax(1)] - prob[rows, int8_logits.argmax(1)]).mean()) * 100

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"validation": self.val.describe()}
        if self.target is not None:
            out["target"] = {**self.target.describe(), "note": self.target_note}
        return out

    def log_line(self, judged: dict[str, Any]) -> str:
        line = f"top-1 {judged['top1']:.2%} (drop {judged['val_drop_points']:+.2f} points on validation"
        if "target_expected_drop_points" in judged:
            line += (f", expected {judged['target_expected_drop_points']:+.2f} on target images, "
                     f"class changed on {judged['target_changed_points']:.2f}% of them")  # fmt: skip
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
