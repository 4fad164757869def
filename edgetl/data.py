"""Datasets: image folders, pre-split folders and IDX files, as lists of labelled image refs.

Discovery is cheap (it lists files); decoding happens once, in `edgetl.decoded.decode_split`, which
also finds the corrupt files so they can be skipped and reported. Nothing here imports torch.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgetl.config import parse_fold
from edgetl.errors import EdgetlError
from edgetl.preprocess import IMAGE_EXTENSIONS, decode_image

VAL_DIR_NAMES = ("val", "valid", "validation")
DIGEST_BYTES = 16  # content_digest: 128 bits, no accidental collision in any dataset
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


@dataclass(frozen=True)
class ImageRef:
    """One image: a file on disk, one slot of an in-memory uint8 array (IDX data), or `length` bytes
    at offset `index` of a tar shard (`path`)."""

    key: str
    path: Path | None = None
    array: np.ndarray | None = field(default=None, compare=False, repr=False)
    index: int = -1
    length: int = -1

    def size_on_disk(self) -> int | None:
        """Bytes of the file or shard member (None for in-memory IDX images): recorded so a replaced file is noticed."""
        if self.length >= 0:
            return self.length
        try:
            return self.path.stat().st_size if self.path is not None else None
        except OSError:
            return None

    def read(self) -> bytes:
        """The image's stored bytes: the file, the shard member, or (an in-memory IDX image) its pixels.
        Raises OSError when they cannot be read."""
        if self.path is None:
            assert self.array is not None
            return self.array[self.index].tobytes()
        with open(self.path, "rb") as f:
            if self.length >= 0:
                f.seek(self.index)
                return f.read(self.length)
            return f.read()

    def load(self) -> Image.Image:
        if self.path is None:
            assert self.array is not None
            return decode_image(Image.fromarray(self.array[self.index]))
        return decode_image(self.read())

    def load_with_digest(self) -> tuple[Image.Image, bytes]:
        """The decoded image and the digest of its stored bytes (`content_digest`), from one read of them."""
        if self.path is None:
            return self.load(), content_digest(self.read())  # IDX pixels: already in memory
        data = self.read()
        return decode_image(data), content_digest(data)


def content_digest(data: bytes) -> bytes:
    """16-byte BLAKE2b of an image's stored bytes: equal digests mean byte-identical images (edgetl.duplicates).
    About 1 GB/s on one core, a small fraction of decoding the same bytes."""
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


@dataclass
class LabelledSet:
    refs: list[ImageRef]
    labels: np.ndarray  # int64 class indices, parallel to refs

    def __len__(self) -> int:
        return len(self.refs)

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelledSet:
        idx = np.asarray(indices, dtype=np.int64)
        return LabelledSet([self.refs[i] for i in idx], self.labels[idx])

    def class_counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()

    @staticmethod
    def join(sets: Sequence[LabelledSet]) -> LabelledSet:
        """The images of `sets`, one after another."""
        return LabelledSet([r for ls in sets for r in ls.refs], np.concatenate([ls.labels for ls in sets]))


SPLITS_FORMAT = "edgetl.splits"
# Rows [key, class, size]; from version 3, the splits training decoded have a fourth column, the image's
# content digest (edgetl.duplicates.record_digests); from version 4, "train_vectors" names the file of the
# training images' 8x8 grey thumbnails and its hash (edgetl.duplicates.write_train_vectors).
SPLITS_FORMAT_VERSION = 4


@dataclass
class Dataset:
    root: Path
    kind: str  # "split-folders" | "train-test-folders" | "folders" | "idx" | "shards"
    classes: list[str]
    train: LabelledSet
    val: LabelledSet
    test: LabelledSet | None
    split_note: str
    skipped: list[dict[str, str]] = field(default_factory=list)
    unused: LabelledSet | None = None  # images left out by --limit-train/--limit-val (recorded, never used)
    patterns: dict[str, str | None] | None = None  # kind "shards": the train and val shard patterns

    @property
    def name(self) -> str:
        return self.root.resolve().name

    def splits(self) -> dict[str, LabelledSet]:
        out = {"train": self.train, "val": self.val}
        if self.test is not None:
            out["test"] = self.test
        return out

    def all_sets(self) -> dict[str, LabelledSet]:
        """Every image found, by where it went: the splits, and `unused` for what limits left out."""
        out = self.splits()
        if self.unused is not None and len(self.unused):
            out["unused"] = self.unused
        return out

    def fingerprint(self) -> str:
        """A hash of which images are in which split with which label (not of pixel data: cheap)."""
        h = hashlib.sha256()
        h.update("\n".join(self.classes).encode())
        for split, ls in self.splits().items():
            for ref, label in zip(ls.refs, ls.labels, strict=True):
                h.update(f"{split}\t{ref.key}\t{label}\n".encode())
        return h.hexdigest()[:16]

    def split_record(self) -> dict[str, Any]:
        """Which file went where (with its size), for the run folder: later stages read their images
        from this record instead of re-deriving the split, and compare it with the folder to notice
        files that appeared, went or were replaced."""
        return {
            "format": SPLITS_FORMAT, "format_version": SPLITS_FORMAT_VERSION, "root": str(self.root.resolve()),
            "kind": self.kind, "classes": list(self.classes), "fingerprint": self.fingerprint(),
            **({"patterns": self.patterns} if self.patterns else {}),
            "splits": {
                split: [[ref.key, self.classes[int(label)], ref.size_on_disk()] for ref, label in zip(ls.refs, ls.labels, strict=True)]
                for split, ls in self.all_sets().items()
            },
        }  # fmt: skip


def listing(ds: Dataset) -> dict[str, tuple[str, int | None]]:
    """key -> (class, size) of every image in `ds`, whatever split it is in."""
    return {
        ref.key: (ds.classes[int(label)], ref.size_on_disk())
        for ls in ds.all_sets().values()
        for ref, label in zip(ls.refs, ls.labels, strict=True)
    }


def recorded_listing(record: dict[str, Any]) -> dict[str, tuple[str, int | None]]:
    return {row[0]: (row[1], row[2] if len(row) > 2 else None) for rows in record["splits"].values() for row in rows}


def current_listing(root: Path, kind: str, patterns: dict[str, str | None] | None = None) -> dict[str, tuple[str, int | None]]:
    """key -> (class, size) of every image now at `root`, found the way a dataset of `kind` is found,
    without the checks that make a folder trainable (the point is to say what changed, not to refuse)."""
    out: dict[str, tuple[str, int | None]] = {}
    if kind == "shards":
        from edgetl.shards import shard_refs

        return {key: (cls, ref.length) for key, (ref, cls) in shard_refs(patterns or {}).items()}
    if kind == "idx":
        for prefix, names in (("train", ("train",)), ("test", ("t10k", "test"))):
            pair = next((p for p in (_idx_pair(root, n) for n in names) if p is not None), None)
            if pair is not None:
                out.update({f"{prefix}:{i}": (str(int(lab)), None) for i, lab in enumerate(pair[1])})
        return out
    folders = split_folders(root)
    if kind == "split-folders":
        bases = list(folders.values())
    elif kind == "train-test-folders":
        bases = [folders[n] for n in ("train", "test") if n in folders]
    else:
        bases = [folders["train"] if "train" in folders and own_validation_folder(root, folders) is None else root]
    for base in bases:
        for cls, files in _class_folders(base).items():
            for f in files:
                try:
                    size: int | None = f.stat().st_size
                except OSError:
                    size = None
                out[f.relative_to(root).as_posix()] = (cls, size)
    return out


def dataset_from_record(record: dict[str, Any]) -> Dataset:
    """The dataset exactly as a run recorded it (same files, same splits, same labels); files that are
    no longer there are left out (the caller has already decided that is acceptable)."""
    root, kind, classes = Path(record["root"]), record["kind"], list(record["classes"])
    arrays: dict[str, np.ndarray] = {}
    shard_samples: dict[str, Any] = {}
    if kind == "shards":
        from edgetl.shards import shard_refs

        shard_samples = shard_refs(record["patterns"])
    if kind == "idx":
        for prefix, names in (("train", ("train",)), ("test", ("t10k", "test"))):
            pair = next((p for p in (_idx_pair(root, n) for n in names) if p is not None), None)
            if pair is not None:
                arrays[prefix] = pair[0]
    index = {c: i for i, c in enumerate(classes)}
    sets: dict[str, LabelledSet] = {}
    for split, rows in record["splits"].items():
        refs, labels = [], []
        for row in rows:
            key, cls = row[0], row[1]
            if kind == "shards":
                if key not in shard_samples:
                    continue
                refs.append(shard_samples[key][0])
            elif kind == "idx":
                prefix, _, i = key.partition(":")
                arr = arrays.get(prefix)
                if arr is None or not i.isdigit() or int(i) >= len(arr):
                    continue
                refs.append(ImageRef(key=key, array=arr, index=int(i)))
            else:
                path = root / key
                if not path.is_file():
                    continue
                refs.append(ImageRef(key=key, path=path))
            labels.append(index[cls])
        sets[split] = LabelledSet(refs, np.asarray(labels, dtype=np.int64))
    return Dataset(
        root=root, kind=kind, classes=classes, train=sets["train"], val=sets["val"], test=sets.get("test"),
        split_note="the run's recorded file lists (splits.json)", unused=sets.get("unused"), patterns=record.get("patterns"),
    )  # fmt: skip


def load_dataset(
    root: str | os.PathLike[str],
    val_fraction: float = 0.2,
    seed: int = 0,
    limit_train: int | None = None,
    limit_val: int | None = None,
    val_data: str | None = None,
    hold_out_fold: str | None = None,
) -> Dataset:
    """Find a dataset at `root`: IDX files, `train/` + `val/` folders, class folders to split, or
    WebDataset tar shards (`root` a shard pattern; `val_data` a validation pattern, else a held-out fraction)."""
    from edgetl.shards import is_shard_pattern, load_shard_dataset

    if val_data is not None and not is_shard_pattern(str(root)):
        raise EdgetlError("--val-data goes with training shards (DATA a .tar pattern); a folder brings its own val/")
    if is_shard_pattern(str(root)):
        if not 0.0 < val_fraction < 1.0:
            raise EdgetlError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
        ds = load_shard_dataset(str(root), val_data, val_fraction, seed)
        return _hold_out(_limit(ds, seed, limit_train, limit_val), hold_out_fold)
    root = Path(root)
    if not root.exists():
        raise EdgetlError(f"data path does not exist: {root}")
    if not root.is_dir():
        raise EdgetlError(f"data path is not a folder: {root} (expected ROOT/<class>/<image> or IDX files)")
    if not 0.0 < val_fraction < 1.0:
        raise EdgetlError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    ds = _load_idx(root, val_fraction, seed) if _find_idx(root, "train") is not None else _load_folders(root, val_fraction, seed)
    return _hold_out(_limit(ds, seed, limit_train, limit_val), hold_out_fold)


def fold_of(refs: Sequence[ImageRef], labels: np.ndarray, folds: int) -> np.ndarray:
    """Each training image's fold (0..folds-1): within each class, images ordered by a hash of their key are
    dealt out in turn. It depends only on which images the training split holds, not on --seed or on the
    order files are listed in, so the runs of K/N for K = 0..N-1 leave out complementary parts, each with
    every class's share."""
    out = np.empty(len(refs), dtype=np.int64)
    digest = np.asarray([hashlib.sha256(r.key.encode()).hexdigest() for r in refs])
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        out[members[np.argsort(digest[members], kind="stable")]] = np.arange(len(members)) % folds
    return out


def _hold_out(ds: Dataset, hold_out_fold: str | None) -> Dataset:
    """--hold-out-fold K/N: train without fold K (recorded as unused), e.g. for cross-fitted teachers whose
    logits on the images they did not see are honest soft labels."""
    if hold_out_fold is None:
        return ds
    k, n = parse_fold(hold_out_fold)
    held = fold_of(ds.train.refs, ds.train.labels, n) == k
    left_out, kept = ds.train.subset(np.flatnonzero(held)), ds.train.subset(np.flatnonzero(~held))
    emptied = sorted(set(ds.train.labels.tolist()) - set(kept.labels.tolist()))
    if emptied or not len(left_out):
        detail = f"class {', '.join(ds.classes[c] for c in emptied)} would have none left" if emptied else f"fold {k} is empty"
        raise EdgetlError(f"--hold-out-fold {hold_out_fold}: too few training images for {n} folds ({detail})")
    ds.train = kept
    ds.unused = left_out if ds.unused is None else LabelledSet.join([ds.unused, left_out])
    ds.split_note += f"; fold {k} of {n} of the training images held out ({len(left_out)} images)"
    return ds


def _limit(ds: Dataset, seed: int, limit_train: int | None, limit_val: int | None) -> Dataset:
    """Seeded stratified subsets for --limit-train/--limit-val; what is left out is recorded as unused."""
    rng = np.random.default_rng(seed + 1)
    left_out: list[LabelledSet] = []
    if limit_train is not None and limit_train < len(ds.train):
        keep = stratified_sample(ds.train.labels, limit_train, rng)
        left_out.append(ds.train.subset(np.setdiff1d(np.arange(len(ds.train)), keep)))
        ds.train = ds.train.subset(keep)
        ds.split_note += f"; training subset of {limit_train} images (seed {seed})"
    if limit_val is not None and limit_val < len(ds.val):
        keep = stratified_sample(ds.val.labels, limit_val, rng)
        left_out.append(ds.val.subset(np.setdiff1d(np.arange(len(ds.val)), keep)))
        ds.val = ds.val.subset(keep)
        ds.split_note += f"; validation subset of {limit_val} images"
    if left_out:
        ds.unused = LabelledSet.join(left_out)
    return ds


def relabel(ls: LabelledSet, classes: list[str], labels: list[str], source: str) -> LabelledSet:
    """Re-index a split's labels (positions in `classes`) to a model's `labels`; a folder may hold a
    subset of the model's classes, but not a class the model does not know."""
    unknown = sorted(set(classes) - set(labels))
    if unknown:
        raise EdgetlError(f"{source} has classes the model was not trained on: {', '.join(unknown)}")
    remap = np.asarray([labels.index(c) for c in classes], dtype=np.int64)
    return LabelledSet(ls.refs, remap[ls.labels])


def stratified_sample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of exactly `n` items (or all, if fewer) keeping each class's share, at least one per
    class where n allows; largest-remainder rounding so the total is exact. Sorted."""
    classes, counts = np.unique(labels, return_counts=True)
    if n >= counts.sum():
        return np.arange(len(labels))
    share = counts / counts.sum() * n
    want = np.minimum(counts, np.maximum(1 if n >= len(classes) else 0, np.floor(share))).astype(int)
    order = np.argsort(-(share - np.floor(share)))
    i = 0
    while want.sum() < n:  # hand out what rounding down left, biggest remainders first
        c = order[i % len(order)]
        if want[c] < counts[c]:
            want[c] += 1
        i += 1
    while want.sum() > n:  # the at-least-one rule can overshoot with many small classes
        c = int(np.argmax(want))
        want[c] -= 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:w] for c, w in zip(classes, want, strict=True)]
    return np.sort(np.concatenate(picked))


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (keep, held_out) with `fraction` of every class held out (at least one)."""
    keep, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_held = min(len(idx) - 1, max(1, round(len(idx) * fraction)))
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


# ----------------------------------------------------------------------------- image folders


def _class_folders(root: Path) -> dict[str, list[Path]]:
    root_resolved = root.resolve()
    by_class: dict[str, list[Path]] = {}
    for f in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        target = f.resolve()
        if target == root_resolved or target in root_resolved.parents:
            continue  # a link back to the data root (or above it) is not a class: it would hold every image
        if any(ord(ch) < 32 for ch in f.name):
            raise EdgetlError(f"class folder name {f.name!r} in {root} has a control character (a newline?): rename the folder")
        by_class[f.name] = image_files(f)
    return by_class


def check_run_outside_data(run_dir: Path, data: Path, given: bool) -> None:
    """Refuse a run folder inside an image-folder dataset: the class folders are searched for images at any
    depth, so the run's own files (its plots are PNGs) would be found as images, of a class named after the
    folder that holds the run, by this training (an empty class) and every later one. IDX data is not
    searched, so a run beside the IDX files is fine (`cd data && edgetl train .`)."""
    if not data.is_dir() or _find_idx(data, "train") is not None:
        return
    root, where = data.resolve(), run_dir.resolve()
    if where != root and root not in where.parents:
        return
    how = f"--out {run_dir}" if given else f"the default run folder {run_dir} (models/ in the current folder)"
    if where == root:
        raise EdgetlError(f"{how} is the data folder {data}: give --out a folder outside the data")
    raise EdgetlError(f"{how} is inside the data folder {data}: its files would be read as images of a class "
                      f"{where.relative_to(root).parts[0]!r} by this and every later training; give --out a folder "
                      "outside the data")  # fmt: skip


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder` (any depth), sorted. Hidden files and folders are left out: macOS's
    `._name.jpg` (metadata, not an image), `.DS_Store`, `.git`, `.ipynb_checkpoints`. Links to folders are
    not followed (os.walk), so a link loop cannot list an image twice."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / n for n in filenames if Path(n).suffix.lower() in IMAGE_EXTENSIONS and not n.startswith(".")]
    return sorted(files)


def _labelled(root: Path, by_class: dict[str, list[Path]], classes: list[str]) -> LabelledSet:
    refs, labels = [], []
    for label, name in enumerate(classes):
        for p in by_class.get(name, []):
            refs.append(ImageRef(key=p.relative_to(root).as_posix(), path=p))
            labels.append(label)
    return LabelledSet(refs, np.asarray(labels, dtype=np.int64))


def _check_classes(by_class: dict[str, list[Path]], where: Path) -> None:
    if not by_class:
        raise EdgetlError(f"no class folders in {where}: expected {where}/<class>/<image files>")
    empty = [name for name, files in by_class.items() if not files]
    if empty:
        raise EdgetlError(
            f"class folder{'s' if len(empty) > 1 else ''} with no images in {where}: {', '.join(empty)} "
            f"(supported: {', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
        )
    if len(by_class) < 2:
        raise EdgetlError(f"only one class ({next(iter(by_class))}) in {where}: a classifier needs at least two")


def split_folders(root: Path) -> dict[str, Path]:
    """The split folders present at `root`, by split name: "train" (train/), "val" (val/, valid/ or
    validation/) and "test" (test/), names in any case. The one place that names them: training, the
    run folder's data check, scoring and sharding all read a dataset's layout from here."""
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()} if root.is_dir() else {}
    found = {"train": subdirs.get("train"), "val": next((subdirs[n] for n in VAL_DIR_NAMES if n in subdirs), None),
             "test": subdirs.get("test")}  # fmt: skip
    return {name: path for name, path in found.items() if path is not None}


def own_validation_folder(root: Path, folders: dict[str, Path] | None = None) -> Path | None:
    """The folder a class-folder dataset validates on instead of holding out --val-fraction: val/, valid/ or
    validation/ (any case) beside a train/ folder; None when the dataset has no such pair. `folders`:
    split_folders(root) when the caller has it already."""
    folders = split_folders(root) if folders is None else folders
    return folders.get("val") if "train" in folders else None


def _test_folder_set(root: Path, folders: dict[str, Path], train_by: dict[str, list[Path]], classes: list[str]) -> LabelledSet | None:
    """The test/ folder beside train/, labelled with the training classes (None if there is none or it is empty)."""
    if "test" not in folders:
        return None
    test_by = {c: files for c, files in _class_folders(folders["test"]).items() if files}
    unknown = sorted(set(test_by) - set(train_by))
    if unknown:
        raise EdgetlError(f"{folders['test'].name}/ has classes that {folders['train'].name}/ does not: {', '.join(unknown)}")
    # A test folder may hold only some classes: they are scored, the others are simply absent.
    return _labelled(root, test_by, classes) if test_by else None


def _load_folders(root: Path, val_fraction: float, seed: int) -> Dataset:
    folders = split_folders(root)
    val_dir = own_validation_folder(root, folders)
    if val_dir is not None:
        train_by = _class_folders(folders["train"])
        val_by = _class_folders(val_dir)
        _check_classes(train_by, folders["train"])
        _check_classes(val_by, val_dir)
        _check_same_classes(train_by, val_by, "train", val_dir.name)
        classes = sorted(train_by)
        test = _test_folder_set(root, folders, train_by, classes)
        return Dataset(
            root=root,
            kind="split-folders",
            classes=classes,
            train=_labelled(root, train_by, classes),
            val=_labelled(root, val_by, classes),
            test=test,
            split_note=f"given splits: train/, {val_dir.name}/" + (", test/" if test is not None else ""),
        )
    # A train/ folder with no validation folder beside it holds the classes: split it. A test/ folder beside it
    # stays the test split (held out of training and of the recipe choice, scored by `edgetl evaluate`).
    base = folders.get("train", root)
    by_class = _class_folders(base)
    _check_classes(by_class, base)
    classes = sorted(by_class)
    test = _test_folder_set(root, folders, by_class, classes) if "train" in folders else None
    everything = _labelled(root, by_class, classes)
    too_small = [classes[c] for c, n in enumerate(everything.class_counts(len(classes))) if n < 2]
    if too_small:
        raise EdgetlError(
            f"class{'es' if len(too_small) > 1 else ''} {', '.join(too_small)} "
            "ha{} a single image: at least 2 per class are needed to hold some out for validation".format(
                "ve" if len(too_small) > 1 else "s"
            )
        )
    keep, held = stratified_split(everything.labels, val_fraction, np.random.default_rng(seed))
    split_note = f"stratified split: {val_fraction:.0%} of each class held out for validation (seed {seed})"
    return Dataset(
        root=root,
        kind="train-test-folders" if test is not None else "folders",
        classes=classes,
        train=everything.subset(keep),
        val=everything.subset(held),
        test=test,
        split_note=split_note + (f"; test: {folders['test'].name}/" if test is not None else ""),
    )


def _check_same_classes(a: dict[str, list[Path]], b: dict[str, list[Path]], a_name: str, b_name: str) -> None:
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        parts = []
        if only_a:
            parts.append(f"only in {a_name}/: {', '.join(only_a)}")
        if only_b:
            parts.append(f"only in {b_name}/: {', '.join(only_b)}")
        raise EdgetlError(f"{a_name}/ and {b_name}/ have different classes ({'; '.join(parts)})")


# ----------------------------------------------------------------------------- IDX (MNIST format)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array."""
    path = Path(path)
    opener: Callable[..., object] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:  # type: ignore[operator]
            data = f.read()  # type: ignore[attr-defined]
    except (OSError, EOFError) as exc:
        raise EdgetlError(f"cannot read IDX file {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise EdgetlError(f"not an IDX file: {path}")
    ndim = data[3]
    if ndim == 0:
        raise EdgetlError(f"IDX file {path} declares 0 dimensions: it holds no array")
    if len(data) < 4 + 4 * ndim:
        raise EdgetlError(f"IDX file {path} is truncated: its header declares {ndim} dimensions but ends early")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise EdgetlError(f"IDX file {path} is truncated or corrupt ({len(body)} bytes of data, expected {expected})")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _find_idx(root: Path, prefix: str, kind: str = "images-idx3") -> Path | None:
    for suffix in ("-ubyte.gz", "-ubyte", ".gz", ""):
        for p in (root / f"{prefix}-{kind}{suffix}",):
            if p.is_file():
                return p
    return None


def _idx_pair(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    images_path = _find_idx(root, prefix)
    if images_path is None:
        return None
    labels_path = _find_idx(root, prefix, "labels-idx1")
    if labels_path is None:
        raise EdgetlError(f"found {images_path.name} but no {prefix}-labels-idx1-ubyte[.gz] beside it")
    images, raw_labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim not in (3, 4) or raw_labels.ndim != 1 or len(images) != len(raw_labels):
        raise EdgetlError(f"{images_path.name} and {labels_path.name} do not match ({images.shape} vs {raw_labels.shape})")
    if len(images) == 0:
        raise EdgetlError(f"{images_path.name} holds no images")
    if raw_labels.dtype.kind == "f" and not np.all(np.isfinite(raw_labels) & (raw_labels == np.round(raw_labels))):
        raise EdgetlError(f"{labels_path.name} has labels that are not whole numbers (NaN or fractions)")
    labels = raw_labels.astype(np.int64)
    if labels.min() < 0:
        raise EdgetlError(f"{labels_path.name} has negative labels ({int(labels.min())}): class indices start at 0")
    return _idx_pixels(images, images_path.name), labels


def _idx_pixels(images: np.ndarray, name: str) -> np.ndarray:
    """IDX images as uint8: floats in [0, 1] are scaled to 0-255 (casting them would make every pixel black)."""
    if images.dtype == np.uint8:
        return images
    arr = images.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise EdgetlError(f"{name} has NaN or infinite pixel values")
    lo, hi = float(arr.min()), float(arr.max())
    if images.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        arr = arr * 255.0
    elif lo < 0 or hi > 255:
        raise EdgetlError(f"{name} has pixel values from {lo:g} to {hi:g}: expected 0-255 (or 0-1 for floats)")
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


def _idx_class_names(root: Path, num_classes: int) -> list[str]:
    labels_txt = root / "labels.txt"
    if labels_txt.is_file():
        names = [line.strip() for line in labels_txt.read_text().splitlines() if line.strip()]
        if len(names) >= num_classes:
            return names[:num_classes]
    if "fashion" in root.resolve().name.lower() and num_classes == 10:
        return list(FASHION_MNIST_CLASSES)
    return [str(i) for i in range(num_classes)]


def _load_idx(root: Path, val_fraction: float, seed: int) -> Dataset:
    train_pair = _idx_pair(root, "train")
    assert train_pair is not None
    test_pair = _idx_pair(root, "t10k") or _idx_pair(root, "test")
    images, labels = train_pair
    num_classes = int(labels.max()) + 1
    if len(np.unique(labels)) < 2:
        raise EdgetlError(f"only one class in {root}: a classifier needs at least two")
    classes = _idx_class_names(root, num_classes)

    def as_set(arr: np.ndarray, lab: np.ndarray, split: str) -> LabelledSet:
        return LabelledSet([ImageRef(key=f"{split}:{i}", array=arr, index=i) for i in range(len(arr))], lab)

    everything = as_set(images, labels, "train")
    keep, held = stratified_split(labels, val_fraction, np.random.default_rng(seed))
    return Dataset(
        root=root,
        kind="idx",
        classes=classes,
        train=everything.subset(keep),
        val=everything.subset(held),
        test=as_set(*test_pair, "test") if test_pair else None,
        split_note=f"IDX files; {val_fraction:.0%} of each training class held out for validation (seed {seed})",
    )


# ----------------------------------------------------------------------------- scoring


def scoring_set(root: str | os.PathLike[str], split: str | None = None) -> tuple[LabelledSet, list[str], str, str]:
    """The labelled images a user points at to score a model: every image of a plain folder of class
    folders (one class is fine), or one split of a dataset with split folders or IDX files (default:
    test if there is one, else the validation folder). Returns the set, its class names, a
    description of what was taken from where, and the split's name ("all" for a plain folder).
    A WebDataset shard pattern (`test-{000..009}.tar`) is scored whole, like a plain folder."""
    from edgetl.shards import is_shard_pattern, shard_scoring_set

    if is_shard_pattern(str(root)):
        return shard_scoring_set(str(root), split)
    root = Path(root)
    if not root.exists():
        raise EdgetlError(f"data path does not exist: {root}")
    if not root.is_dir():
        raise EdgetlError(f"data path is not a folder: {root} (expected ROOT/<class>/<image> or a dataset with split folders)")
    if _find_idx(root, "train") is not None or _find_idx(root, "t10k") is not None or _find_idx(root, "test") is not None:
        pairs = {"train": _idx_pair(root, "train"), "test": _idx_pair(root, "t10k") or _idx_pair(root, "test")}
        name = split or ("test" if pairs["test"] is not None else "train")
        if pairs.get(name) is None:
            raise EdgetlError(f"{root} has no {name!r} IDX files (it has: {', '.join(k for k, v in pairs.items() if v is not None)})")
        images, labels = pairs[name]  # type: ignore[misc]
        classes = _idx_class_names(root, int(labels.max()) + 1)
        refs = [ImageRef(key=f"{name}:{i}", array=images, index=i) for i in range(len(images))]
        return LabelledSet(refs, labels), classes, f"{root} ({name} IDX files, all {len(refs)} images)", name
    split_dirs = split_folders(root)
    if split_dirs:
        name = split or next(n for n in ("test", "val", "train") if n in split_dirs)
        if name not in split_dirs:
            raise EdgetlError(f"{root} has no {name!r} folder (it has: {', '.join(sorted(split_dirs))})")
        folder = split_dirs[name]
    else:
        if split not in (None, "all"):
            raise EdgetlError(f"{root} has no split folders, so every image in it is scored: drop --split {split}")
        name, folder = "all", root
    by_class = {c: files for c, files in _class_folders(folder).items() if files}
    if not by_class:
        raise EdgetlError(f"no images in class folders under {folder}: expected {folder}/<class>/<image files>")
    classes = sorted(by_class)
    ls = _labelled(root, by_class, classes)
    what = "every image" if name == "all" else f"the {folder.name}/ folder"
    return ls, classes, f"{root} ({what}: {len(ls)} images in {len(classes)} classes)", name


def check_after_skips(classes: list[str], split: str, labels: np.ndarray) -> None:
    """After corrupt files were dropped, every class must still have images."""
    counts = Counter(labels.tolist())
    missing = [classes[c] for c in range(len(classes)) if counts.get(c, 0) == 0]
    if missing and split != "test":
        raise EdgetlError(f"no readable images left in {split} for class{'es' if len(missing) > 1 else ''}: {', '.join(missing)}")
