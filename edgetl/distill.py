"""Knowledge distillation from a trained edgetl run (`edgetl train DATA --teacher RUN`).

The teacher is another run folder's best checkpoint, typically a bigger backbone fine-tuned on the same
data. It runs once over the training images, with its own recorded preprocessing (its input size may
differ from the student's), and its logits are kept like the stage-1 features; every training step of
both stages then mixes the true labels with the teacher's temperature-softened ones (Hinton et al., 2015).

Several teachers are either cross-fitted or an ensemble. Cross-fitted teachers each trained without one
fold of the training images (`--hold-out-fold K/N`) and score only the fold they did not see, so every
soft label is an honest prediction rather than the echo of a label the teacher memorised (a teacher fits
its own training images almost perfectly; its soft labels there carry little beyond the true label).
An ensemble's teachers all trained on every training image; their logits are averaged over all of them.

Refused clearly, before any training: a teacher with other labels or another label order, with other
pixel preprocessing than the student's (normalisation, interpolation, channel order; the size may
differ), or one that trained on images that are this run's validation or test images (its soft labels
would leak them into model selection).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgetl import checkpoint
from edgetl.errors import EdgetlError
from edgetl.preprocess import PreprocessSpec
from edgetl.run import RunFolder

# What must match between teacher and student preprocessing; sizes may differ.
_PIXEL_FIELDS = ("mean", "std", "interpolation", "channel_order", "layout")


def distillation_loss(student: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, hard: Any, alpha: float,
                      temperature: float) -> torch.Tensor:  # fmt: skip
    """(1 - alpha) * hard(student, labels) + alpha * T^2 * KL(teacher_T || student_T); T^2 keeps the soft
    term's gradients on the scale of the hard one's."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher.float() / t, dim=1),
                    log_target=True, reduction="batchmean") * (t * t)  # fmt: skip
    return (1 - alpha) * hard(student, labels) + alpha * soft if alpha < 1 else soft


def load_teacher(
    run: str, classes: list[str], student_spec: PreprocessSpec, record: dict[str, Any]
) -> tuple[Any, PreprocessSpec, dict[str, Any]]:
    """The teacher's model (fp32, eval mode), its preprocessing and what the run records about it,
    after checking it against this run's labels, preprocessing and split record."""
    folder = RunFolder.open(run)
    ckpt = folder.checkpoint()
    cfg = ckpt["config"]
    name = f"--teacher {run}"
    if list(cfg["labels"]) != list(classes):
        raise EdgetlError(f"{name} was trained on the labels {cfg['labels']}, this data has {list(classes)}: "
                          "a teacher must have the same labels in the same order")  # fmt: skip
    spec = checkpoint.spec_of(ckpt)
    differ = [f for f in _PIXEL_FIELDS if getattr(spec, f) != getattr(student_spec, f)]
    if differ:
        detail = ", ".join(f"{f} {getattr(spec, f)} vs {getattr(student_spec, f)}" for f in differ)
        raise EdgetlError(f"{name} preprocesses pixels differently from the student ({detail}): "
                          "its soft labels would be for other inputs; pick a teacher with the same normalisation")  # fmt: skip
    leak_check = _check_no_leak(folder, record, name)
    info = {"run": str(Path(folder.path).resolve()), "checkpoint_sha256": folder.checkpoint_sha256, "backbone": cfg["backbone"],
            "input_size": spec.input_size, "val_top1": ckpt.get("val_top1"), "leak_check": leak_check}  # fmt: skip
    return checkpoint.build_model(ckpt), spec, info


def _training_keys(folder: RunFolder, record: dict[str, Any]) -> set[str] | None:
    """The files a teacher trained on, by its split record; None when it trained on other data than the
    student's `record`, whose files cannot be matched by name."""
    teacher = folder.split_record()
    if Path(teacher["root"]).resolve() != Path(record["root"]).resolve():
        return None
    return {key for key, *_ in teacher["splits"].get("train", [])}


def _check_no_leak(folder: RunFolder, record: dict[str, Any], name: str) -> str:
    """Refuse a teacher that trained on this run's val or test images; say what could be checked. By name
    where the teacher trained on this data (its file lists); by content where both runs recorded digests
    (edgetl.duplicates.record_digests): a validation image byte-identical to one the teacher trained on
    leaks too, wherever the teacher's copy was, unless this run trains on a copy of it as well."""
    seen = _training_keys(folder, record)
    checked = []
    if seen is not None:
        for split in ("val", "test"):
            leaked = [key for key, *_ in record["splits"].get(split, []) if key in seen]
            if leaked:
                raise EdgetlError(f"{name} trained on {len(leaked)} image(s) that are in this run's {split} split "
                                  f"(e.g. {leaked[0]}): its soft labels would leak them; train the teacher with the same "
                                  "split (same --seed and --val-fraction) or on the training images only")  # fmt: skip
        checked.append("none of this run's validation or test images is among the teacher's training images")
    taught = _digests(folder.split_record(), "train")
    val_rows = [row for row in record["splits"].get("val", []) if len(row) > 3]
    if taught and val_rows:
        taught -= _digests(record, "train")  # a copy this run trains on as well teaches the student nothing new
        copies = [row[0] for row in val_rows if row[3] in taught]
        if copies:
            raise EdgetlError(f"{name} trained on byte-identical copies of {len(copies)} of this run's validation image(s) "
                              f"(e.g. {copies[0]}; its data: {folder.split_record()['root']}): its soft labels would leak "
                              "them; train the teacher without them")  # fmt: skip
        checked.append("no validation image is byte-identical to one the teacher trained on")
    if not checked:
        return f"not checked: the teacher trained on other data ({folder.split_record()['root']}), whose files cannot be matched by name"
    if seen is None:
        checked.append("the test split (never read in training) could not be checked: the teacher trained on other data "
                       f"({folder.split_record()['root']})")  # fmt: skip
    return "passed: " + "; ".join(checked)


def _digests(record: dict[str, Any], split: str) -> set[str]:
    """The content digests a split record holds for `split` (none for runs recorded without them)."""
    return {row[3] for row in record["splits"].get(split, []) if len(row) > 3 and row[3]}


def teacher_coverage(runs: Sequence[str], record: dict[str, Any], keys: Sequence[str]) -> tuple[np.ndarray, str]:
    """Several teachers: a (teachers x images) mask of which teacher scores which of the student's training
    images (`keys`), and how they are combined, by the teachers' recorded file lists:

    - "cross-fitted": the teachers left out complementary parts (--hold-out-fold); each scores only the
      images it did not train on, and every image is left out by at least one teacher.
    - "ensemble": no teacher left out any of the student's images; all score every image, averaged.
      An ensemble is usually a better teacher than any one of its members (Hinton et al., 2015).

    Anything between (some images left out, others trained on by every teacher) is refused: those images
    would get a memorised label while the rest get an honest one."""
    mask = np.zeros((len(runs), len(keys)), dtype=bool)
    other_data = []
    for i, run in enumerate(runs):
        folder = RunFolder.open(run)
        seen = _training_keys(folder, record)
        if seen is None:  # trained on other data: it held out none of these images
            other_data.append(f"--teacher {run} trained on other data ({folder.split_record()['root']})")
            continue
        mask[i] = [key not in seen for key in keys]
    if not mask.any():
        return np.ones_like(mask), "ensemble"
    if other_data:
        raise EdgetlError(f"{other_data[0]}: cross-fitted teachers score the training images they did not see, which "
                          "needs the student's own data")  # fmt: skip
    missing = np.flatnonzero(~mask.any(axis=0))
    if len(missing):
        raise EdgetlError(f"{len(missing)} of the {len(keys)} training image(s) (e.g. {keys[missing[0]]}) were trained on by "
                          "every --teacher, while others were left out: cross-fitted teachers must leave out complementary "
                          "parts (train them with --hold-out-fold K/N for K = 0..N-1, same N); an ensemble of teachers "
                          "must each have trained on all of them")  # fmt: skip
    return mask, "cross-fitted"
