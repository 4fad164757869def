"""Score a trained checkpoint on a folder of labelled images or one split of a dataset."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgetl.data import relabel, scoring_set
from edgetl.decoded import DecodedImages, decode_for_scoring
from edgetl.duplicates import recorded_copies, recorded_lookalikes, with_file_digests
from edgetl.progress import Reporter
from edgetl.run import RunFolder


@dataclass
class Scored:
    """A checkpoint's logits on a scoring set, with what was scored."""

    logits: np.ndarray
    labels: np.ndarray  # in the checkpoint's label order
    label_names: list[str]
    source: str
    split: str | None
    skipped_files: list[dict[str, str]]
    checkpoint: str
    checkpoint_sha256: str
    copies_of_training_images: dict[str, Any] | None = None  # None: the run's training images are not here to compare
    looks_like_training_images: dict[str, Any] | None = None  # None: a run recorded without its training thumbnails


def score(
    run: str | os.PathLike[str],
    data: str | os.PathLike[str],
    split: str | None = None,
    device: str = "auto",
    reporter: Reporter | None = None,
) -> Scored:
    """The run's kept checkpoint over every image of a plain folder of class folders, or one split of a
    dataset (default: test, else the validation folder), decoded with the run's recorded preprocessing."""
    import torch  # noqa: F401 - the model below needs it; imported here to keep the CLI fast

    from edgetl import checkpoint
    from edgetl.train import pick_device, predict_logits

    reporter = reporter or Reporter()
    folder = RunFolder.open(run)
    ckpt = folder.checkpoint()
    model = checkpoint.build_model(ckpt)
    spec = checkpoint.spec_of(ckpt)
    labels = list(ckpt["config"]["labels"])
    ls, data_classes, source, split_name = scoring_set(data, split)
    ls = relabel(ls, data_classes, labels, str(data))
    reporter.log(f"scoring {source}")
    images, failed = decode_for_scoring(ls, spec, reporter, source)
    copies = _copies_of_training_images(images, folder)
    if copies and copies["count"]:
        shown = "; ".join(f"{a} = {b}" for a, b in copies["examples"])
        reporter.warn(f"{copies['count']} of the {len(ls)} image(s) are byte-identical to images the run trained on (e.g. {shown}): "
                      "this score will look better than the model is")  # fmt: skip
    alike = recorded_lookalikes(images, folder.split_record(), folder.path)
    if alike and alike["count"]:
        shown = "; ".join(f"{a} ~ {b}" for a, b in alike["examples"])
        reporter.warn(f"{alike['count']} of the {len(ls)} image(s) look the same as images the run trained on without being "
                      f"byte-identical (re-encoded, resized or re-saved copies; e.g. {shown}): this score will look better "
                      "than the model is")  # fmt: skip
    if alike and alike["unconfirmed"]:
        reporter.warn(f"{alike['unconfirmed']} of the {len(ls)} image(s) are close to training images that are not here to "
                      f"compare with (the run's data: {folder.data_root}): they may be copies of them")  # fmt: skip
    dev = pick_device(device)
    logits = predict_logits(model.to(dev), images, spec, dev, reporter=reporter)
    return Scored(logits, np.asarray(images.labels), labels, source, split_name, failed, ckpt["path"], folder.checkpoint_sha256,
                  copies, alike)  # fmt: skip


def _copies_of_training_images(images: DecodedImages, folder: RunFolder) -> dict[str, Any] | None:
    """The scored images that are copies of the run's training images, from the digests the run recorded
    (nothing of the training data is read, or needs to be here); for a run recorded without them, from
    digests of the training images that could be copies (`with_file_digests`; None where they are not here)."""
    record = folder.split_record()
    if any(len(row) < 4 for row in record["splits"].get("train", [])):
        record = with_file_digests(record, {ref.size_on_disk() for ref in images.refs})
        if record is None:
            return None
    return recorded_copies(images, record)


def evaluate(
    run: str | os.PathLike[str],
    data: str | os.PathLike[str],
    split: str | None = None,
    device: str = "auto",
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """`score`, then top-1, top-5, per-class accuracy, macro-F1, and what was scored."""
    from edgetl.metrics import classification_metrics

    s = score(run, data, split, device, reporter)
    metrics = classification_metrics(s.logits, s.labels, s.label_names)
    metrics.update({"data": s.source, "split": s.split, "scored": len(s.labels),
                    "skipped_files": s.skipped_files, "checkpoint": s.checkpoint, "checkpoint_sha256": s.checkpoint_sha256,
                    "copies_of_training_images": s.copies_of_training_images,
                    "looks_like_training_images": s.looks_like_training_images})  # fmt: skip
    return metrics
