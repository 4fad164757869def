"""Byte-identical images in the data a run trains and chooses on.

A validation image that is also a training image (a copy under another name, a file scraped twice) makes
validation accuracy, and everything chosen on it (the recipe, the kept checkpoint, the int8 budget), look
better than the model is; one picture filed under two classes teaches both labels for the same pixels.
Neither is an error (a user may have reasons), so `edgetl train` says what it found, with examples, and
records it in manifest.json.

What it costs: in training, nothing is read for it. The decode (edgetl.decoded) hashes each image's
bytes from its own read of them (BLAKE2b, about 1 GB/s: a few per cent of decoding them);
`find_duplicates` groups those digests. Train records them in splits.json (`record_digests`), so
`edgetl eval` compares the digests of the images it scores with them and reads no training image
(`recorded_copies`). For runs recorded without digests, eval first digests the training images whose
recorded byte count a scored image has (`with_file_digests`). The test split is never read in training.

Copies that are not byte-identical (re-encoded, resized, re-saved): training compares each validation image
with its nearest training images on thumbnails (`_lookalikes`), and records the training images' 8x8 grey
thumbnails (64 bytes an image, `write_train_vectors`), from which eval finds the scored images' nearest
training images and reads only those to confirm (`recorded_lookalikes`).
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgetl.data import ImageRef, content_digest, dataset_from_record
from edgetl.decoded import DecodedImages
from edgetl.errors import EdgetlError

EXAMPLES = 5  # pairs shown in the log and kept in the manifest, per kind


@dataclass
class Duplicates:
    """What `find_duplicates` found: pairs of keys with identical bytes (counts are of images, examples of pairs)."""

    across: int = 0  # validation images with a byte-identical training image
    conflicting: int = 0  # images with a byte-identical copy under another class (in either split)
    across_examples: list[tuple[str, str]] = field(default_factory=list)  # (validation key, training key)
    conflicting_examples: list[tuple[str, str, str, str]] = field(default_factory=list)  # (key, class, key, class)
    near: int = 0  # validation images that look the same as a training image without being byte-identical
    near_examples: list[tuple[str, str]] = field(default_factory=list)  # (validation key, training key)
    train_vectors: np.ndarray | None = field(default=None, repr=False)  # the training images' grey_vectors, for the record

    def to_dict(self) -> dict[str, Any]:
        return {"val_in_train": self.across, "val_in_train_examples": [list(p) for p in self.across_examples],
                "conflicting_labels": self.conflicting,
                "conflicting_label_examples": [list(p) for p in self.conflicting_examples],
                "val_looks_like_train": self.near, "val_looks_like_train_examples": [list(p) for p in self.near_examples]}  # fmt: skip

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
        if self.near:
            shown = "; ".join(f"{v} ~ {t}" for v, t in self.near_examples)
            out.append(f"{self.near} validation image(s) look the same as training images without being byte-identical "
                       f"(re-encoded, resized or re-saved copies; e.g. {shown}): validation accuracy will look better than "
                       "the model is")  # fmt: skip
        return out


Entry = tuple[str, ImageRef, int]  # (which set, image, label)


def _digest_of(ref: ImageRef) -> bytes | None:
    """The digest of the image's stored bytes; None when they cannot be read (decoding reports that)."""
    try:
        return content_digest(ref.read())
    except OSError:
        return None


def _groups_of(by_digest: dict[bytes, list[Entry]]) -> list[list[Entry]]:
    return [group for group in by_digest.values() if len(group) > 1]


def _decoded_groups(named: list[tuple[str, DecodedImages]]) -> list[list[Entry]]:
    """Groups of two or more images with identical bytes, from the digests the decode took."""
    by_digest: dict[bytes, list[Entry]] = defaultdict(list)
    for name, images in named:
        for ref, label, digest in zip(images.refs, images.labels, images.digests, strict=True):
            by_digest[digest.tobytes()].append((name, ref, int(label)))
    return _groups_of(by_digest)


def _copies(groups: list[list[Entry]], of: str, among: str) -> tuple[int, list[tuple[str, str]]]:
    """How many images of set `of` have an identical image in set `among`, and example pairs."""
    count, examples = 0, []
    for group in groups:
        for name, ref, _ in group:
            if name != of:
                continue
            other = next((e[1] for e in group if e[0] == among), None)
            if other is not None:
                count += 1
                if len(examples) < EXAMPLES:
                    examples.append((ref.key, other.key))
    return count, examples


# Two images "look the same" when their 32x32 colour thumbnails differ by at most this much on average (of 255):
# a JPEG re-encode or a resize of one photo differs by 0.6 (2.4 at most; benchmarks/results/lookalikes.md); on
# Fashion-MNIST, pairs at 4-5 are one product photo processed twice, above 6 start to be two similar garments.
LOOKS_SAME_MAD = 5.0
NEAREST = 8  # training images compared on thumbnails per validation image: its nearest on 8x8 grey vectors
CANDIDATE_RMS = 10.0  # 8x8 root-mean-square difference (of 255) beyond which no thumbnail comparison is made
BLOCK_FLOATS = 1 << 24  # one distance block: validation images x training images, 64 MB of float32


def _thumbnail(images: DecodedImages, i: int) -> Image.Image:
    """Image i as a 32x32 colour thumbnail: exact box averages of the decoded pixels, so two copies of a picture
    cached at different sizes (a training image at its crop size, a validation image at the evaluation size)
    give the same thumbnail. (Pillow's integer `reduce` first would shift the grid by its remainder.) Colour
    counts: a white and a yellow T-shirt on one background are alike in grey (clothing-small has such a pair)."""
    return images.get_stored(i).resize((32, 32), Image.Resampling.BOX)


def grey_vectors(images: DecodedImages) -> np.ndarray:
    """(n, 64) uint8: each image's thumbnail in grey, box-averaged to 8x8, for the nearest-neighbour search.
    64 bytes an image: train records its training images' (`write_train_vectors`) for `edgetl eval`."""
    out = np.zeros((len(images), 64), dtype=np.uint8)
    for i in range(len(images)):
        out[i] = np.asarray(_thumbnail(images, i).convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.uint8).ravel()
    return out


def _candidates(queries: np.ndarray, pool: np.ndarray) -> Iterator[tuple[int, list[int]]]:
    """For each query vector (row of `queries`), its NEAREST rows of `pool` within CANDIDATE_RMS, nearest first:
    all pairs, by blocks of matrix products (no hash whose bits a re-encode could flip)."""
    if not len(queries) or not len(pool):
        return
    # |a - b|^2 = |a|^2 + |b|^2 - 2ab. A row's own |a|^2 does not change which b are nearest, so the ranking takes
    # |b|^2 - 2ab, one product of [a, 1] with [-2b, |b|^2] (memory passes over the block are most of the cost).
    q = np.hstack([queries.astype(np.float32), np.ones((len(queries), 1), np.float32)])
    pool_f = pool.astype(np.float32)
    ranking = np.vstack([-2.0 * pool_f.T, (pool_f**2).sum(1)[None, :]])
    k, within = min(NEAREST, len(pool)), CANDIDATE_RMS**2
    rows_per_block = max(1, min(len(q), BLOCK_FLOATS // len(pool)))
    for start in range(0, len(q), rows_per_block):
        block = q[start : start + rows_per_block]
        block_sq = (block[:, :-1] ** 2).sum(1)
        partial = block @ ranking
        # Only pool rows within CANDIDATE_RMS can be candidates, and a row has few: one comparison finds them (with a
        # margin for float32 rounding), where partitioning every row by distance took half the search's time.
        near = partial <= (64 * within * 1.01 - block_sq)[:, None]
        hit = np.flatnonzero(near.any(axis=1))
        if not len(hit):
            continue
        rows, cols = np.nonzero(near[hit])
        rows = hit[rows]
        sq = np.maximum(partial[rows, cols] + block_sq[rows], 0.0) / 64
        firsts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])  # np.nonzero gives the rows in order
        for first, end in zip(firsts, [*firsts[1:], len(rows)], strict=True):
            by_distance = first + np.argsort(sq[first:end], kind="stable")[:k]
            order = [int(cols[c]) for c in by_distance if sq[c] <= within]
            if order:
                yield start + int(rows[first]), order


def _lookalikes(train: DecodedImages, val: DecodedImages, train_vec: np.ndarray | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Validation images that look the same as a training image without being byte-identical to it: each
    validation image's `_candidates` among the training images (`train_vec`, their `grey_vectors`, computed
    here unless given) are compared on 32x32 colour thumbnails (LOOKS_SAME_MAD)."""
    if train_vec is None:
        train_vec = grey_vectors(train)
    exact = {d.tobytes() for d in train.digests}  # a byte-identical copy is reported as such, not again here

    @functools.lru_cache(maxsize=4096)  # training images near many validation images; bounded (12 KB each)
    def train_thumb(j: int) -> np.ndarray:
        return np.asarray(_thumbnail(train, j), dtype=np.float32)

    count, examples = 0, []
    for i, order in _candidates(grey_vectors(val), train_vec):
        if val.digests[i].tobytes() in exact:
            continue
        mine = np.asarray(_thumbnail(val, i), dtype=np.float32)
        match = next((j for j in order if float(np.abs(mine - train_thumb(j)).mean()) <= LOOKS_SAME_MAD), None)
        if match is not None:
            count += 1
            if len(examples) < EXAMPLES:
                examples.append((val.refs[i].key, train.refs[match].key))
    return count, examples


def find_duplicates(train: DecodedImages, val: DecodedImages, classes: list[str]) -> Duplicates:
    """Byte-identical images between `val` and `train`, and across classes within and between them, from
    the digests their decode took (unreadable images, left out of training, are left out here too); and
    validation images that look the same as a training image without being byte-identical (`_lookalikes`)."""
    groups = _decoded_groups([("train", train), ("val", val)])
    found = Duplicates(train_vectors=grey_vectors(train))
    found.across, found.across_examples = _copies(groups, of="val", among="train")
    found.near, found.near_examples = _lookalikes(train, val, found.train_vectors)
    for group in groups:
        first_label = group[0][2]
        if any(label != first_label for _, _, label in group):
            found.conflicting += len(group)  # each one has a copy under another class
            other = next(e for e in group if e[2] != first_label)
            if len(found.conflicting_examples) < EXAMPLES:
                found.conflicting_examples.append((group[0][1].key, classes[first_label], other[1].key, classes[other[2]]))
    return found


def record_digests(record: dict[str, Any], decoded: dict[str, DecodedImages]) -> dict[str, Any]:
    """The split record (`Dataset.split_record`) with a fourth column in the rows of the decoded splits: the
    hex digest of each image's stored bytes, None for one that could not be decoded. `edgetl eval` then
    finds copies of the training images without reading them, or even having them."""
    splits = dict(record["splits"])
    for split, images in decoded.items():
        hexes: list[str | None] = [None] * len(splits[split])
        for position, digest in zip(images.positions, images.digests, strict=True):
            hexes[int(position)] = digest.tobytes().hex()
        splits[split] = [[*row[:3], digest] for row, digest in zip(splits[split], hexes, strict=True)]
    return {**record, "splits": splits}


def recorded_copies(scored: DecodedImages, record: dict[str, Any]) -> dict[str, Any] | None:
    """`edgetl eval`: how many scored images have the digest of one of the run's training images as recorded
    in `record` (no training image is read), with example pairs (scored, training); None when the record
    has no digests (runs made before they were recorded)."""
    rows = record["splits"].get("train", [])
    if any(len(row) < 4 for row in rows):
        return None
    wanted = {digest.tobytes().hex() for digest in scored.digests}
    keys_by_digest: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        if row[3] in wanted:
            keys_by_digest[row[3]].append(row[0])
    count, examples = 0, []
    for ref, digest in zip(scored.refs, scored.digests, strict=True):
        keys = keys_by_digest.get(digest.tobytes().hex(), [])
        other = next((key for key in keys if not _is_recorded_image(ref, key, record)), None)
        if other is not None:
            count += 1
            if len(examples) < EXAMPLES:
                examples.append([ref.key, other])
    return {"count": count, "examples": examples}


def _is_recorded_image(ref: ImageRef, key: str, record: dict[str, Any]) -> bool:
    """Whether `ref` is the very image recorded as `key` (scoring the training split itself finds no copies)."""
    if ref.path is not None and ref.length < 0 and record["kind"] not in ("idx", "shards"):
        return ref.path.resolve() == (Path(record["root"]) / key).resolve()
    return ref.key == key  # an IDX slot ("train:12") or a shard member ("<shard>/<sample>") is named by its key


def with_file_digests(record: dict[str, Any], sizes: set[int | None]) -> dict[str, Any] | None:
    """A record made before digests were recorded (format 2), its training rows digested from their files for
    `recorded_copies`: only the rows whose recorded byte count is in `sizes` (those of the scored images; no
    stat of the rest, no scan of their shards). None where the training images cannot be read here."""
    rows = [row for row in record["splits"].get("train", []) if len(row) < 3 or row[2] is None or row[2] in sizes]
    try:
        train = dataset_from_record({**record, "splits": {"train": rows, "val": []}}).train
    except (EdgetlError, OSError):
        return None
    if rows and not len(train):
        return None
    digested = [(ref.key, _digest_of(ref)) for ref in train.refs]
    return {**record, "splits": {"train": [[key, None, None, d.hex() if d else None] for key, d in digested]}}


# ----------------------------------------------------------------------------- look-alikes of training images in eval


def write_train_vectors(run_dir: Path, train: DecodedImages, vectors: np.ndarray) -> dict[str, Any]:
    """Record the training images' `grey_vectors` in the run folder (64 bytes an image, with each one's row in
    the split record), for `recorded_lookalikes`; returns the entry splits.json names it by, with its hash."""
    from edgetl.fileio import write_bytes
    from edgetl.run import TRAIN_VECTORS

    buffer = io.BytesIO()
    np.savez(buffer, positions=np.asarray(train.positions, dtype=np.int64), vectors=np.asarray(vectors, dtype=np.uint8))
    data = buffer.getvalue()
    write_bytes(run_dir / TRAIN_VECTORS, data)
    return {"file": TRAIN_VECTORS, "sha256": hashlib.sha256(data).hexdigest(), "images": len(train)}


def _read_train_vectors(run_dir: Path, entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(positions, vectors) as recorded; a file that is missing or not the one recorded is a clear error."""
    path = run_dir / str(entry["file"])
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EdgetlError(f"{path} is missing from the run folder ({exc.strerror or exc}): splits.json records it, and eval "
                          "compares the scored images with the training images through it; copy the run folder whole") from None
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise EdgetlError(f"{path} is not the file this run recorded (its sha256 differs from splits.json's): the run "
                          "folder was changed after training")  # fmt: skip
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return z["positions"], z["vectors"]


def recorded_lookalikes(scored: DecodedImages, record: dict[str, Any], run_dir: Path) -> dict[str, Any] | None:
    """`edgetl eval`: scored images that look the same as one of the run's training images without being
    byte-identical to it (those are `recorded_copies`). The nearest recorded training thumbnails are found
    from the record alone; only those candidates' images are read, and compared on 32x32 colour thumbnails
    as training compares validation images. A scored image whose candidates could not be read (the training
    data is not here) is counted as `unconfirmed`. None for a run recorded without the vectors."""
    entry = record.get("train_vectors")
    if entry is None:
        return None
    positions, vectors = _read_train_vectors(run_dir, entry)
    rows = record["splits"].get("train", [])
    exact = {row[3] for row in rows if len(row) > 3 and row[3]}
    wanted: list[tuple[int, list[int]]] = []  # (scored image, recorded rows of its candidates, nearest first)
    for i, order in _candidates(grey_vectors(scored), vectors):
        if scored.digests[i].tobytes().hex() in exact:
            continue  # byte-identical: reported as a copy
        near = [int(positions[j]) for j in order]
        near = [r for r in near if not _is_recorded_image(scored.refs[i], rows[r][0], record)]
        if near:
            wanted.append((i, near))
    thumbs = _training_thumbnails(record, sorted({r for _, near in wanted for r in near}))
    count, unconfirmed, examples = 0, 0, []
    for i, near in wanted:
        mine = np.asarray(_thumbnail(scored, i), dtype=np.float32)
        theirs = [(r, thumbs.get(r)) for r in near]
        match = next((r for r, t in theirs if t is not None and float(np.abs(mine - t).mean()) <= LOOKS_SAME_MAD), None)
        if match is not None:
            count += 1
            if len(examples) < EXAMPLES:
                examples.append([scored.refs[i].key, rows[match][0]])
        elif any(t is None for _, t in theirs):
            unconfirmed += 1
    return {"count": count, "examples": examples, "unconfirmed": unconfirmed}


def _training_thumbnails(record: dict[str, Any], wanted_rows: list[int]) -> dict[int, np.ndarray]:
    """32x32 colour thumbnails of the recorded training rows `wanted_rows` (row -> thumbnail), of those that
    can be read here: one dataset of just those rows (an IDX file or a shard is opened once)."""
    if not wanted_rows:
        return {}
    rows = record["splits"]["train"]
    try:
        refs = dataset_from_record({**record, "splits": {"train": [rows[r] for r in wanted_rows], "val": []}}).train.refs
    except (EdgetlError, OSError):
        return {}
    by_key = {rows[r][0]: r for r in wanted_rows}
    out = {}
    for ref in refs:
        try:
            image = ref.load()
        except Exception:  # replaced by something that is not an image: that candidate stays unconfirmed
            continue
        out[by_key[ref.key]] = np.asarray(image.resize((32, 32), Image.Resampling.BOX), dtype=np.float32)
    return out
