"""Score a trained checkpoint on a folder of labelled images or one split of a dataset."""

from __future__ import annotations

import os
from typing import Any

from edgetl.data import relabel, scoring_set
from edgetl.decoded import decode_for_scoring
from edgetl.progress import Reporter
from edgetl.run import RunFolder


def evaluate(
    run: str | os.PathLike[str],
    data: str | os.PathLike[str],
    split: str | None = None,
    device: str = "auto",
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Every image of a plain folder of class folders, or one split of a dataset (default: test,
    else the validation folder): top-1, top-5, per-class accuracy, macro-F1, and what was scored."""
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
    dev = pick_device(device)
    logits = predict_logits(model.to(dev), images, spec, dev, reporter=reporter)
    from edgetl.metrics import classification_metrics

    metrics = classification_metrics(logits, images.labels, labels)
    metrics.update({"data": source, "split": split_name, "scored": len(images),
                    "skipped_files": failed, "checkpoint": ckpt["path"], "checkpoint_sha256": folder.checkpoint_sha256})  # fmt: skip
    return metrics
