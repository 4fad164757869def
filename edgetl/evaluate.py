"""Score a trained checkpoint on a folder of labelled images or one split of a dataset."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgetl import checkpoint
from edgetl.data import LabelledSet, decode_for_scoring, load_dataset, relabel
from edgetl.errors import EdgetlError
from edgetl.metrics import classification_metrics
from edgetl.progress import Reporter


def pick_split(
    data: str | os.PathLike[str], split: str | None, seed: int = 0, val_fraction: float = 0.2
) -> tuple[LabelledSet, list[str], str]:
    """The labelled images to score: a split of a dataset (default: test if there is one, else val)."""
    ds = load_dataset(data, val_fraction=val_fraction, seed=seed)
    splits = ds.splits()
    name = split or ("test" if "test" in splits else "val")
    if name not in splits:
        raise EdgetlError(f"{data} has no {name!r} split (it has: {', '.join(splits)})")
    return splits[name], ds.classes, name


def evaluate(
    run: str | os.PathLike[str],
    data: str | os.PathLike[str],
    split: str | None = None,
    device: str = "auto",
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    import torch  # noqa: F401 - the model below needs it; imported here to keep the CLI fast

    from edgetl.train import pick_device, predict_logits

    reporter = reporter or Reporter()
    model, ckpt = checkpoint.load_model(run)
    spec = checkpoint.spec_of(ckpt)
    labels = list(ckpt["config"]["labels"])
    ls, data_classes, split_name = pick_split(data, split, seed=ckpt["config"]["train"]["seed"],
                                              val_fraction=ckpt["config"]["train"]["val_fraction"])  # fmt: skip
    ls = relabel(ls, data_classes, labels, str(data))
    images, failed = decode_for_scoring(ls, spec, reporter, f"{data} ({split_name})")
    dev = pick_device(device)
    logits = predict_logits(model.to(dev), images, spec, dev, reporter=reporter)
    metrics = classification_metrics(logits, images.labels, labels)
    metrics.update({"data": str(Path(data).resolve()), "split": split_name, "skipped_files": failed,
                    "checkpoint": ckpt["path"]})  # fmt: skip
    return metrics
