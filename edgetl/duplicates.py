"""Byte-identical images in the data a run trains and chooses on.

A validation image that is also a training image (a copy under another name, a file scraped twice) makes
validation accuracy, and everything chosen on it (the recipe, the kept checkpoint, the int8 budget), look
better than the model is; one picture filed under two classes teaches both labels for the same pixels.
Neither is an error (a user may have reasons), so `edgetl train` says what it found, with examples, and
records it in manifest.json.

What it costs: only files that share their byte count with another file are read and hashed. In a few
thousand photos that is almost none (clothing-small: 0.05 s); in hundreds of thousands most byte counts
repeat, and the check reads nearly every file once more before the decode reads them again (hashing in
the decode's own read would avoid that; not done yet). A shard member's size is known without a stat;
in-memory IDX images are hashed (0.20 s for Fashion-MNIST's 60k). The test split is never read here:
training does not open it.
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


Entry = tuple[str, ImageRef, int]  # (which set, image, label)


def _identical_groups(named: list[tuple[str, LabelledSet]]) -> list[list[Entry]]:
    """Groups of two or more images with identical bytes, over every image of the named sets."""
    by_size: dict[int | None, list[Entry]] = defaultdict(list)
    for name, ls in named:
        for ref, label in zip(ls.refs, ls.labels, strict=True):
            by_size[ref.size_on_disk()].append((name, ref, int(label)))
    by_hash: dict[bytes, list[Entry]] = defaultdict(list)
    for size, group in by_size.items():
        if len(group) < 2 and size is not None:
            continue  # a unique byte count: no identical copy can exist
        for entry in group:
            content = _content(entry[1])
            if content is not None:
                by_hash[hashlib.blake2b(content, digest_size=16).digest()].append(entry)
    return [group for group in by_hash.values() if len(group) > 1]


def _location(ref: ImageRef) -> tuple[str, int]:
    """Where an image's bytes live: one file (links resolved), one shard member, one slot of an array."""
    if ref.path is None:  # an IDX image: its key ("train:123") names the slot in every load of the files
        return f"idx {ref.key}", -1
    return str(ref.path.resolve()), ref.index


def _copies(groups: list[list[Entry]], of: str, among: str, other_files_only: bool = False) -> tuple[int, list[tuple[str, str]]]:
    """How many images of set `of` have an identical image in set `among`, and example pairs; `other_files_only`:
    an image is not its own copy (two loads of one folder)."""
    count, examples = 0, []
    for group in groups:
        for name, ref, _ in group:
            if name != of:
                continue
            here = _location(ref)
            other = next((e[1] for e in group if e[0] == among and not (other_files_only and _location(e[1]) == here)), None)
            if other is not None:
                count += 1
                if len(examples) < EXAMPLES:
                    examples.append((ref.key, other.key))
    return count, examples


def find_duplicates(train: LabelledSet, val: LabelledSet, classes: list[str]) -> Duplicates:
    """Byte-identical images between `val` and `train`, and across classes within and between them."""
    groups = _identical_groups([("train", train), ("val", val)])
    found = Duplicates()
    found.across, found.across_examples = _copies(groups, of="val", among="train")
    for group in groups:
        first_label = group[0][2]
        if any(label != first_label for _, _, label in group):
            found.conflicting += len(group)  # each one has a copy under another class
            other = next(e for e in group if e[2] != first_label)
            if len(found.conflicting_examples) < EXAMPLES:
                found.conflicting_examples.append((group[0][1].key, classes[first_label], other[1].key, classes[other[2]]))
    return found


def copies_of_training_images(scored: LabelledSet, train: LabelledSet) -> dict[str, Any]:
    """`edgetl eval`: how many scored images are byte-identical to one of the run's training images in another
    file (scoring the training split itself finds only real copies), with example pairs (scored, training)."""
    groups = _identical_groups([("train", train), ("scored", scored)])
    count, examples = _copies(groups, of="scored", among="train", other_files_only=True)
    return {"count": count, "examples": [list(e) for e in examples]}
