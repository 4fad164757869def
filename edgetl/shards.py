"""WebDataset tar shards as a dataset, and `edgetl shards` to write them from an image folder.

A shard is a plain tar in the WebDataset layout: the members of one sample share a key (the name up
to the first dot of the file name, `webdataset.tariterators.base_plus_ext`) and differ in extension:
the image (`jpg`, `png`, ...) and its label, `cls` (a class index, or a class name) or `class` (a
name). Class indices are named by a `classes.txt` beside the shards when there is one.

Shards are written with `webdataset.ShardWriter`. They are read with an index of where each image
lies in its tar (`tarfile` headers: a seek per member, no image data read), so every stage can read
exactly the samples the run recorded, in any order, through the same decode cache as image folders.
Keys in the run's file lists are `<shard file>/<sample key>`.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.data import Dataset, ImageRef, LabelledSet, _class_folders, split_folders, stratified_split
from edgetl.errors import EdgetlError
from edgetl.preprocess import IMAGE_EXTENSIONS

SHARD_IMAGE_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
LABEL_KEYS = ("cls", "cls.txt", "class", "class.txt", "label")
CLASSES_FILE = "classes.txt"


def is_shard_pattern(data: str) -> bool:
    """Whether DATA names tar shards (a file or a brace pattern such as `train-{000..099}.tar`)."""
    return data.endswith(".tar") or (".tar" in data and "{" in data)


def pattern_for(names: list[str]) -> list[str]:
    """Brace patterns that name exactly these shard files (the shell's expansion of an unquoted pattern,
    undone): `d/train-000000.tar d/train-000001.tar` -> `d/train-{000000..000001}.tar`, one pattern per
    prefix, a comma list where the numbers have gaps. Names without a number before `.tar` stay as they are."""
    import re

    groups: dict[tuple[str, int], list[int]] = {}
    out: list[str] = []
    for name in names:
        m = re.fullmatch(r"(.*?)(\d+)\.tar", name)
        if m is None:
            out.append(name)
            continue
        groups.setdefault((m.group(1), len(m.group(2))), []).append(int(m.group(2)))
    for (prefix, width), numbers in groups.items():
        numbers = sorted(set(numbers))
        if len(numbers) == 1:
            out.append(f"{prefix}{numbers[0]:0{width}d}.tar")
        elif numbers == list(range(numbers[0], numbers[-1] + 1)):
            out.append(f"{prefix}{{{numbers[0]:0{width}d}..{numbers[-1]:0{width}d}}}.tar")
        else:
            out.append(f"{prefix}{{{','.join(f'{n:0{width}d}' for n in numbers)}}}.tar")
    return out


def expand(pattern: str) -> list[Path]:
    """The shard files a pattern names (brace expansion as webdataset does it); all must exist."""
    from braceexpand import braceexpand

    paths = [Path(p) for p in braceexpand(pattern)]
    missing = [p for p in paths if not p.is_file()]
    if not paths or len(missing) == len(paths):
        raise EdgetlError(f"shard pattern {pattern} matches no file")
    if missing:
        raise EdgetlError(f"shard pattern {pattern}: {len(missing)} of {len(paths)} shards are missing, e.g. {missing[0]}")
    return paths


@dataclass(frozen=True)
class ShardSample:
    key: str  # <shard file name>/<sample key>
    shard: Path
    offset: int
    size: int
    label: str  # the label member's text: an index or a class name

    def ref(self) -> ImageRef:
        """The sample's image (its bytes at `offset` of the shard)."""
        return ImageRef(key=self.key, path=self.shard, index=self.offset, length=self.size)


def index_shards(paths: list[Path]) -> list[ShardSample]:
    """Every sample of the shards, in order, with where its image lies. Errors: not a tar, a sample
    with an image and no label (or a label and no image), a name used twice."""
    out: list[ShardSample] = []
    seen: set[str] = set()
    for path in paths:
        try:
            st = path.stat()
        except OSError as exc:
            raise EdgetlError(f"{path} is not a readable tar shard: {exc.strerror or exc}") from None
        for sample in _index_one(str(path), st.st_size, st.st_mtime_ns):
            if sample.key in seen:
                raise EdgetlError(f"sample {sample.key} appears twice")
            seen.add(sample.key)
            out.append(sample)
    return out


@functools.lru_cache(maxsize=4096)
def _index_one(path_name: str, size: int, mtime_ns: int) -> tuple[ShardSample, ...]:
    """One shard's samples. Cached by (path, size, mtime): a resume checks the recorded lists against
    the shards and then reads the dataset from them, and a shard rewritten in between is indexed again."""
    from webdataset.tariterators import base_plus_ext

    path = Path(path_name)
    images: dict[str, tarfile.TarInfo] = {}
    labels: dict[str, str] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base, ext = base_plus_ext(m.name)
                if base is None or base.split("/")[-1].startswith("_"):
                    continue  # webdataset skips names without an extension and __meta__ members
                ext = ext.lower()
                if ext in SHARD_IMAGE_EXTENSIONS:
                    images[base] = m
                elif ext in LABEL_KEYS:
                    f = tar.extractfile(m)
                    labels[base] = (f.read() if f is not None else b"").decode("utf-8", "replace").strip()
    except (tarfile.TarError, OSError) as exc:
        raise EdgetlError(f"{path} is not a readable tar shard: {exc}") from None
    unlabelled = [b for b in images if b not in labels or not labels[b]]
    if unlabelled:
        raise EdgetlError(f"{path}: {len(unlabelled)} sample(s) have no label ({', '.join(LABEL_KEYS)}), "
                          f"e.g. {unlabelled[0]}")  # fmt: skip
    return tuple(ShardSample(f"{path.name}/{base}", path, m.offset_data, m.size, labels[base]) for base, m in images.items())


def class_names(samples: list[ShardSample], folder: Path) -> tuple[list[str], list[str]]:
    """(class names, each sample's class name). Integer labels are named by classes.txt beside the
    shards when it has enough lines, else by the number; text labels are the names."""
    labels = [s.label for s in samples]
    if all(re.fullmatch(r"\d+", label) for label in labels):
        n = max(int(label) for label in labels) + 1
        listed = folder / CLASSES_FILE
        names = [line.strip() for line in listed.read_text().splitlines() if line.strip()] if listed.is_file() else []
        names = names[:n] if len(names) >= n else [str(i) for i in range(n)]
        return names, [names[int(label)] for label in labels]
    if any(ord(ch) < 32 for label in labels for ch in label):
        raise EdgetlError("a class name in the shards has a control character")
    return sorted(set(labels)), labels


def load_shard_dataset(train_pattern: str, val_pattern: str | None, val_fraction: float, seed: int) -> Dataset:
    """A Dataset of shards: the training pattern, and a validation pattern or a stratified held-out fraction."""
    train_paths = expand(train_pattern)
    val_paths = expand(val_pattern) if val_pattern else []
    train_samples = index_shards(train_paths)
    val_samples = index_shards(val_paths)
    if not train_samples:
        raise EdgetlError(f"no samples in {train_pattern}")
    root = train_paths[0].parent
    classes, names = class_names(train_samples + val_samples, root)  # one naming for both, so the same indices
    idx = {c: i for i, c in enumerate(classes)}

    def as_set(samples: list[ShardSample], cls: list[str]) -> LabelledSet:
        return LabelledSet([s.ref() for s in samples], np.asarray([idx[c] for c in cls], dtype=np.int64))

    train = as_set(train_samples, names[: len(train_samples)])
    if len(np.unique(train.labels)) < 2:
        raise EdgetlError(f"only one class in {train_pattern}: a classifier needs at least two")
    if val_samples:
        val = as_set(val_samples, names[len(train_samples) :])
        note = f"given shards: {train_pattern} for training, {val_pattern} for validation"
    else:
        counts = np.bincount(train.labels, minlength=len(classes))
        if (counts[counts > 0] < 2).any():
            raise EdgetlError("a class has a single sample in the shards: at least 2 per class are needed to hold some out")
        keep, held = stratified_split(train.labels, val_fraction, np.random.default_rng(seed))
        train, val = train.subset(keep), train.subset(held)
        note = f"shards {train_pattern}; {val_fraction:.0%} of each class held out for validation (seed {seed})"
    return Dataset(root=root, kind="shards", classes=classes, train=train, val=val, test=None, split_note=note,
                   patterns={"train": train_pattern, "val": val_pattern})


def shard_refs(patterns: dict[str, str | None]) -> dict[str, tuple[ImageRef, str]]:
    """key -> (ImageRef, class name) of every sample the recorded patterns name now."""
    out: dict[str, tuple[ImageRef, str]] = {}
    samples: list[ShardSample] = []
    for pattern in patterns.values():
        if pattern:
            samples += index_shards(expand(pattern))
    if not samples:
        return out
    _, names = class_names(samples, samples[0].shard.parent)
    for s, name in zip(samples, names, strict=True):
        out[s.key] = (s.ref(), name)
    return out


def shard_scoring_set(pattern: str, split: str | None) -> tuple[LabelledSet, list[str], str, str]:
    """Every sample of the shards a pattern names, labelled as training reads shards (classes.txt beside
    them), as edgetl.data.scoring_set returns a set to score: (set, class names, description, "all")."""
    if split not in (None, "all"):
        raise EdgetlError(f"{pattern} is a shard pattern, so every sample in it is scored: drop --split {split} "
                          "and give the pattern of the split's shards instead")  # fmt: skip
    paths = expand(pattern)
    samples = index_shards(paths)
    if not samples:
        raise EdgetlError(f"no samples in {pattern}")
    classes_all, names = class_names(samples, paths[0].parent)
    classes = sorted(set(names), key=classes_all.index)
    idx = {c: i for i, c in enumerate(classes)}
    ls = LabelledSet([s.ref() for s in samples], np.asarray([idx[n] for n in names], dtype=np.int64))
    return ls, classes, f"{pattern} (every sample of {len(paths)} shard(s): {len(ls)} images in {len(classes)} classes)", "all"


def write_shards(source: str | os.PathLike[str], out: str | os.PathLike[str], shard_size: int = 1000) -> dict[str, Any]:
    """Write the images of a folder dataset (its train/val/test folders, or its class folders as one
    `train` set) into `OUT/<split>-NNNNNN.tar` shards of `shard_size` samples, with classes.txt.
    Image bytes are copied as they are (no re-encoding). Written in a temporary folder and moved into
    place at the end, so an interrupted run leaves nothing half-written."""
    import webdataset as wds

    src, dst = Path(source), Path(out)
    if not src.is_dir():
        raise EdgetlError(f"not a folder: {src}")
    if shard_size < 1:
        raise EdgetlError("--shard-size must be at least 1")
    if dst.exists() and any(dst.glob("*.tar")):
        raise EdgetlError(f"{dst} already holds shards: choose an empty folder")
    # The splits edgetl.data trains on: train/ (else the folder itself), its own val/ if it has one (else
    # training holds out --val-fraction of the train shards), and test/ beside train/.
    folders = split_folders(src)
    splits = {"train": folders["train"]} if "train" in folders else {"train": src}
    if "train" in folders:
        splits.update({n: folders[n] for n in ("val", "test") if n in folders})
    by_split = {name: _class_folders(folder) for name, folder in splits.items()}
    classes = sorted(by_split["train"])
    if len(classes) < 2:
        raise EdgetlError(f"{splits['train']} needs at least two class folders")
    dst.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shards-", dir=dst))
    summary: dict[str, Any] = {"classes": classes, "splits": {}}
    try:
        for split, by_class in by_split.items():
            count, used = 0, set()
            with wds.ShardWriter(str(tmp / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0) as writer:
                for cls, files in sorted(by_class.items()):
                    if cls not in classes:
                        raise EdgetlError(f"{split}/ has a class train/ does not: {cls}")
                    for f in files:
                        rel = f.relative_to(splits[split]).with_suffix("").as_posix()
                        key = re.sub(r"[.\s]", "_", rel)  # a dot would end the key (webdataset's rule)
                        while key in used:
                            key += "_"
                        used.add(key)
                        ext = f.suffix.lower().lstrip(".").replace("jpeg", "jpg")
                        try:
                            data = f.read_bytes()
                        except OSError as exc:
                            raise EdgetlError(f"cannot read {f}: {exc.strerror or exc}") from None
                        writer.write({"__key__": key, ext: data, "cls": str(classes.index(cls)).encode()})
                        count += 1
            summary["splits"][split] = {"samples": count, "pattern": None}
        (tmp / CLASSES_FILE).write_text("".join(c + "\n" for c in classes))
        for p in sorted(tmp.iterdir()):
            os.replace(p, dst / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for split in summary["splits"]:
        n = len(list(dst.glob(f"{split}-*.tar")))
        summary["splits"][split]["pattern"] = str(dst / f"{split}-{{{0:06d}..{n - 1:06d}}}.tar")
    return summary
