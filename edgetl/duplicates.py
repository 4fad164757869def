"""Byte-identical images in the data a run trains and chooses on.

A validation image that is also a training image (a copy under another name, a file scraped twice) makes
validation accuracy, and everything chosen on it (the recipe, the kept checkpoint, the int8 budget), look
better than the model is; one picture filed under two classes teaches both labels for the same pixels.
Neither is an error (a user may have reasons), so `edgetl train` says what it found, with examples, and
records it in manifest.json.

Cheap on any size of set: only files that share their byte count with another file are read and hashed
(distinct JPEGs seldom do), so a set without duplicates costs one stat per file (a shard member's size is
known without one; in-memory IDX images are hashed, 0.2 s for Fashion-MNIST's 60k). The test split is
never read here: training does not open it.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from edgetl.data import ImageRef, LabelledSet

EXAMPLES = 5  # pairs shown in the log and kept in the manifest, per kind


@dataclass
class Duplicates:
    """What `find_duplicates` found: pairs of keys with identical bytes (counts are of images, examples of pairs)."""

    across: int = 0  # validation images with a byte-identical training image
    conflicting: int = 0  # images with a byte-identical copy under another class (in either split)
    across_examples: list[tuple[str, str]] = field(default_factory=list)  # (validation key, training key)
    conflicting_examples: list[tuple[str, str, str, str]] = field(default_factory=list)  # (key, class, key, class)

    def to_dict(self) -> dict[str, Any]:
        return {"val_in_train": self.across, "val_in_train_examples": [list(p) for p in self.across_examples],
                "conflicting_labels": self.conflicting,
                "conflicting_label_examples": [list(p) for p in self.conflicting_examples]}  # fmt: skip

    def warnings(self) -> list[str]:
        out = []
        if self.across:
            shown = "; ".join(f"{v} = {t}" for v, t in self.across_examples)
            out.append(f"{self.across} validation image(s) are byte-identical to training images (e.g. {shown}): validation "
                       "accuracy, and the recipe and checkpoint chosen on it, will look better than the model is")  # fmt: skip
        if self.conflicting:
            shown = "; ".join(f"{a} ({ca}) = {b} ({cb})" for a, ca, b, cb in self.conflicting_examples)
            out.append(f"{self.conflicting} image(s) have a byte-identical copy filed under another class (e.g. {shown}): "
                       "the same pixels are taught two labels")  # fmt: skip
        return out


def _content(ref: ImageRef) -> bytes | None:
    """The image's stored bytes (an IDX image: its pixels); None when it cannot be read (decoding reports that)."""
    try:
        if ref.path is None:
            return None if ref.array is None else ref.array[ref.index].tobytes()
        with open(ref.path, "rb") as f:
            if ref.length >= 0:  # a member of a tar shard
                f.seek(ref.index)
                return f.read(ref.length)
            return f.read()
    except OSError:
        return None


def find_duplicates(train: LabelledSet, val: LabelledSet, classes: list[str]) -> Duplicates:
    """Byte-identical images between `val` and `train`, and across classes within and between them."""
    entries = [("train", r, int(c)) for r, c in zip(train.refs, train.labels, strict=True)]
    entries += [("val", r, int(c)) for r, c in zip(val.refs, val.labels, strict=True)]
    by_size: dict[int | None, list[tuple[str, ImageRef, int]]] = defaultdict(list)
    for entry in entries:
        by_size[entry[1].size_on_disk()].append(entry)
    by_hash: dict[bytes, list[tuple[str, ImageRef, int]]] = defaultdict(list)
    for size, group in by_size.items():
        if len(group) < 2 and size is not None:
            continue  # a unique byte count: no identical copy can exist
        for entry in group:
            content = _content(entry[1])
            if content is not None:
                by_hash[hashlib.blake2b(content, digest_size=16).digest()].append(entry)
    found = Duplicates()
    for group in by_hash.values():
        if len(group) < 2:
            continue
        trains = [e for e in group if e[0] == "train"]
        for split, ref, _ in group:
            if split == "val" and trains:
                found.across += 1
                if len(found.across_examples) < EXAMPLES:
                    found.across_examples.append((ref.key, trains[0][1].key))
        first_label = group[0][2]
        if any(label != first_label for _, _, label in group):
            found.conflicting += len(group)  # each one has a copy under another class
            other = next(e for e in group if e[2] != first_label)
            if len(found.conflicting_examples) < EXAMPLES:
                found.conflicting_examples.append((group[0][1].key, classes[first_label], other[1].key, classes[other[2]]))
    return found
