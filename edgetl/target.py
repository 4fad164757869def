"""Unlabelled images of a target domain: finding them, checking them against the training images, and
recording exactly which were used (the adapted run's `target.json`), so that later stages (int8
calibration) reach the same images through the run folder and notice when they changed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgetl.data import ImageRef, LabelledSet, image_files, stratified_sample
from edgetl.errors import EdgetlError
from edgetl.preprocess import IMAGE_EXTENSIONS

TARGET_FORMAT = "edgetl.target"
# Fewer images give per-channel statistics too noisy to align 30-odd layers to (and Tent batches of 16+).
MIN_TARGET_IMAGES = 32
# A median image side this many times larger or smaller than the training images' is another kind of camera.
SIZE_RATIO_LIMIT = 4.0
SHAPE_HINT = "pass --allow-shape-change to adapt anyway"


def list_target_images(root: str | os.PathLike[str], what: str = "target folder") -> tuple[LabelledSet, bool]:
    """Every image under `root`, flat or in (class) subfolders; labels are not read (all 0). Returns the
    images and whether they sat in subfolders."""
    root = Path(root)
    if not root.exists():
        raise EdgetlError(f"{what} not found: {root}")
    if not root.is_dir():
        raise EdgetlError(f"{what} {root} is a file: give a folder of images (flat, or in subfolders)")
    files = image_files(root)  # as training finds images: no hidden files, no link loops
    if not files:
        raise EdgetlError(f"no images in the {what} {root} (supported: {', '.join(IMAGE_EXTENSIONS)})")
    refs = [ImageRef(key=p.relative_to(root).as_posix(), path=p) for p in files]
    nested = any("/" in r.key for r in refs)
    return LabelledSet(refs, np.zeros(len(refs), dtype=np.int64)), nested


def require_enough(n_readable: int, root: Path, minimum: int = MIN_TARGET_IMAGES) -> None:
    if n_readable < minimum:
        raise EdgetlError(f"only {n_readable} readable image(s) in {root}: adapting needs at least {minimum} target images "
                          f"(a few hundred give steadier statistics)")  # fmt: skip


def _header(ref: ImageRef) -> tuple[int, int, int] | None:
    """(channels, width, height) from the file header, without decoding the pixels; None if unreadable."""
    try:
        if ref.path is not None and ref.length < 0:
            with Image.open(ref.path) as im:
                return len(im.getbands()) if im.mode not in ("P", "PA") else 3, im.width, im.height
        arr = ref.load()
        return 3, arr.width, arr.height
    except Exception:
        return None


def _look(refs: list[ImageRef]) -> tuple[bool, float] | None:
    heads = [h for h in map(_header, refs) if h is not None]
    if not heads:
        return None
    grey = sum(1 for c, _, _ in heads if c in (1, 2)) / len(heads)
    return grey > 0.5, float(np.median([min(w, h) for _, w, h in heads]))


def check_shape(target: LabelledSet, train: LabelledSet, root: Path, sample: int = 64, seed: int = 0) -> dict[str, Any]:
    """Compare target images with the training images (colour or grey; median shorter side) from a
    sample of file headers. A mismatch is an error: it usually means the wrong folder, and BatchNorm
    statistics of grey images are not those of colour ones. Returns what was compared."""
    rng = np.random.default_rng(seed)
    t_idx = rng.choice(len(target), min(sample, len(target)), replace=False)
    s_idx = stratified_sample(train.labels, min(sample, len(train)), rng) if len(train) else np.zeros(0, dtype=np.int64)
    t, s = _look([target.refs[i] for i in t_idx]), _look([train.refs[i] for i in s_idx])
    if t is None or s is None:
        return {"checked": False}
    (t_grey, t_side), (s_grey, s_side) = t, s
    found = {"checked": True, "target_grey": t_grey, "train_grey": s_grey, "target_median_side": t_side, "train_median_side": s_side}
    if t_grey != s_grey:
        kind = {True: "grey (1 channel)", False: "colour (3 channels)"}
        raise EdgetlError(f"the images in {root} are {kind[t_grey]} but the run was trained on {kind[s_grey]} images; {SHAPE_HINT}")
    ratio = max(t_side, s_side) / max(1.0, min(t_side, s_side))
    if ratio > SIZE_RATIO_LIMIT:
        raise EdgetlError(f"the images in {root} are about {t_side:.0f} px on their shorter side, the training images about "
                          f"{s_side:.0f} px ({ratio:.0f}x apart): is this the right folder? {SHAPE_HINT}")  # fmt: skip
    return found


def target_record(root: Path, images: LabelledSet, skipped: list[dict[str, str]]) -> dict[str, Any]:
    """Which target images were used (name and size), with a fingerprint, for the run folder."""
    files = [[r.key, r.size_on_disk()] for r in images.refs]
    h = hashlib.sha256("\n".join(f"{k}\t{s}" for k, s in files).encode()).hexdigest()[:16]
    return {"format": TARGET_FORMAT, "format_version": 1, "root": str(root.resolve()), "fingerprint": h,
            "count": len(files), "files": files, "skipped_files": skipped}  # fmt: skip


def recorded_target(record: dict[str, Any], allow_changed: bool = False) -> LabelledSet:
    """The recorded target images as they are now; a missing or replaced one is an error unless `allow_changed`."""
    root = Path(record["root"])
    refs, gone = [], []
    for key, size in record["files"]:
        p = root / key
        try:
            now = p.stat().st_size
        except OSError:
            now = None
        if now is None or (size is not None and now != size):
            gone.append(key)
            continue
        refs.append(ImageRef(key=key, path=p))
    if gone and not allow_changed:
        raise EdgetlError(f"{len(gone)} of the {len(record['files'])} target images this run was adapted on are missing or "
                          f"changed in {root} (e.g. {gone[0]}); pass --allow-data-change to use the rest")  # fmt: skip
    if not refs:
        raise EdgetlError(f"none of the target images this run was adapted on are left in {root}")
    return LabelledSet(refs, np.zeros(len(refs), dtype=np.int64))
