"""Real images for checking an exported or quantized model against the model it came from."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.data import LabelledSet, decode_for_scoring, load_dataset, relabel
from edgetl.errors import EdgetlError
from edgetl.preprocess import PreprocessSpec, normalize, resize_and_crop
from edgetl.progress import Reporter


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


def load_parity_data(ckpt: dict[str, Any], data: str | None, n: int, seed: int, reporter: Reporter) -> ParityData:
    """The run's validation images (or those of `data`), a seeded sample of `n` when there are more."""
    cfg = ckpt["config"]
    labels = list(cfg["labels"])
    spec = PreprocessSpec.from_dict(cfg["preprocess"])
    if data is None:
        t = cfg["train"]
        if not Path(cfg["data"]).exists():
            raise EdgetlError(f"the run's data ({cfg['data']}) is not here; pass --data DIR with labelled images to check against")
        ds = load_dataset(cfg["data"], t["val_fraction"], t["seed"], t["limit_train"], t["limit_val"])
        ls, classes, source = ds.val, ds.classes, f"{cfg['data']} (validation split)"
    else:
        from edgetl.evaluate import pick_split

        ls, classes, split = pick_split(data, None)
        source = f"{data} ({split} split)"
    ls = relabel(ls, classes, labels, source)
    if len(ls) > n:
        idx = np.sort(np.random.default_rng(seed).choice(len(ls), size=n, replace=False))
        ls = ls.subset(idx)
    return prepare(ls, spec, source, reporter)


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
