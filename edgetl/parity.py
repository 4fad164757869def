"""Real images for checking an exported or quantized model against the model it came from."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgetl.data import LabelledSet, relabel, scoring_set, stratified_sample
from edgetl.decoded import decode_for_scoring
from edgetl.errors import EdgetlError
from edgetl.preprocess import PreprocessSpec, normalize, resize_and_crop
from edgetl.progress import Reporter
from edgetl.run import RunFolder


@dataclass
class ParityData:
    pixels: np.ndarray  # uint8 NHWC after resize + crop (what a --embed-preprocess model takes)
    floats: np.ndarray  # float32 NCHW, normalised (what the plain model takes)
    labels: np.ndarray
    keys: list[str]
    source: str

    def describe(self) -> dict[str, Any]:
        h = hashlib.sha256("\n".join(self.keys).encode()).hexdigest()[:16]
        return {"source": self.source, "n": len(self.keys), "files_sha256": h}


def prepare(ls: LabelledSet, spec: PreprocessSpec, source: str, reporter: Reporter) -> ParityData:
    images, _ = decode_for_scoring(ls, spec, reporter, source)
    pixels = np.stack([np.asarray(resize_and_crop(images.get(i), spec)) for i in range(len(images))])
    return ParityData(pixels, normalize(pixels, spec), images.labels, [r.key for r in images.refs], source)


def scoring_data(data: str, labels: list[str], spec: PreprocessSpec, reporter: Reporter, max_images: int | None = None,
                 seed: int = 0) -> ParityData:  # fmt: skip
    """Labelled images a user pointed at (every image of a plain folder; test, else val, of a dataset)."""
    ls, classes, source, _ = scoring_set(data)
    ls = relabel(ls, classes, labels, source)
    return prepare(_sample(ls, max_images, seed), spec, source, reporter)


def run_split_data(run: RunFolder, split: str, labels: list[str], spec: PreprocessSpec, reporter: Reporter,
                   max_images: int | None = None, seed: int = 0, allow_changed: bool = False) -> ParityData:  # fmt: skip
    """One of the run's recorded splits (never re-drawn), a seeded sample of `max_images` when larger."""
    ds = run.dataset(allow_changed=allow_changed, reporter=reporter)
    ls = ds.splits().get(split)
    if ls is None or len(ls) == 0:
        raise EdgetlError(f"the run {run.path} recorded no {split} images")
    source = f"{ds.root} ({split} split as recorded in {run.path / 'splits.json'})"
    ls = relabel(ls, ds.classes, labels, source)
    return prepare(_sample(ls, max_images, seed), spec, source, reporter)


def _sample(ls: LabelledSet, n: int | None, seed: int) -> LabelledSet:
    """A seeded subset of `n` that keeps every class's share (bench and parity score the same way)."""
    if n is None or len(ls) <= n:
        return ls
    return ls.subset(stratified_sample(ls.labels, n, np.random.default_rng(seed)))


def compare(reference: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """How far `logits` are from `reference` (the PyTorch model's), and both models' accuracy."""
    diff = np.abs(reference.astype(np.float64) - logits.astype(np.float64))
    return {
        "n": len(labels),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float((reference.argmax(1) == logits.argmax(1)).mean()),
        "top1": float((logits.argmax(1) == labels).mean()),
    }
