"""Decoded images of one split in an on-disk cache, so memory does not grow with the dataset.

Every image is decoded once (threads: Pillow releases the GIL while decoding), resized, and appended
as raw uint8 RGB to one flat file. What stays in memory is a per-image index of 4 int64 (file,
offset, height, width: 32 bytes an image, 3.2 MB for 100k images). Reads are `os.pread` calls, so the
pixels pass through the kernel's page cache (shared, reclaimable, not this process's resident
memory) rather than through a growing Python list; a warm cache reads a 256 px image in ~50 us,
faster than decoding its JPEG again. The cost is disk: about 200 KB an image at 256 px
(20 GB for 100k photos), in the run folder (or the temp folder) and removed when the run ends.

DataLoader workers receive the index and the file's path (not the file handle), and open the file
themselves, so this works with any multiprocessing start method. Under torchrun the processes of a
node each decode a share of a split into their own file and read all of them (`join`).

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from edgetl.data import DIGEST_BYTES, ImageRef, LabelledSet
from edgetl.errors import EdgetlError
from edgetl.preprocess import PreprocessSpec, resize_shorter

if TYPE_CHECKING:
    from edgetl.progress import Reporter

CACHE_PREFIX = ".decoded-"  # + split + ".tmp": the run lock removes a killed process's leftovers (run.locked)


def stored_size(spec: PreprocessSpec, crop_scale: float | None) -> int:
    """Shorter side the cache keeps an image at. For evaluation: the spec's resize size (evaluation from
    the cache is then exact). For training with random-resized crops of down to `crop_scale` of the
    area: large enough that the smallest crop still has `input_size` pixels across, instead of being
    cut from the evaluation-size image and upsampled (blurrier than anything evaluation sees)."""
    if crop_scale is None:
        return spec.resize_size
    return max(spec.resize_size, math.ceil(spec.input_size / math.sqrt(crop_scale)))


class DecodedImages:
    """The decoded images of one split: `get(i)` gives image i at the evaluation resize size,
    `get_stored(i)` at the (possibly larger) size it was cached at, for training crops.

    The pixels live in one or more cache files (several when the processes of a node each decoded a
    share, see `join`); row i of `index` is (file number, offset, height, width) of image i.
    `positions[i]` is image i's position in the LabelledSet it was decoded from; `digests[i]` the
    `content_digest` of its stored bytes, taken from the decode's own read (edgetl.duplicates)."""

    def __init__(self, refs: list[ImageRef], labels: np.ndarray, paths: list[Path], index: np.ndarray, positions: np.ndarray,
                 digests: np.ndarray, resize_size: int, interpolation: str, owned: tuple[Path, ...] = ()) -> None:  # fmt: skip
        self.refs, self.labels, self.paths, self.index, self.positions = refs, labels, paths, index, positions
        self.digests = digests  # (n, DIGEST_BYTES) uint8
        self.resize_size, self.interpolation = resize_size, interpolation
        self._fds: dict[int, int] = {}
        self._pid = -1
        # Files this object made go when it is garbage collected or the process exits normally.
        self._finalizers = [weakref.finalize(self, _unlink, str(p)) for p in owned]
        self._owned = owned

    def __len__(self) -> int:
        return len(self.refs)

    def __getstate__(self) -> dict[str, Any]:
        # A worker process gets the index and the paths; it opens its own handles and never deletes a file.
        state = {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_finalizers", "_owned")}
        return {**state, "_fds": {}, "_pid": -1, "_finalizers": [], "_owned": ()}

    def _handle(self, file_no: int) -> int:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        if file_no not in self._fds:
            self._fds[file_no] = os.open(self.paths[file_no], os.O_RDONLY)
        return self._fds[file_no]

    def open_all(self) -> None:
        """Open every cache file now: a file a peer process wrote can then be removed by it at any time."""
        for f in range(len(self.paths)):
            self._handle(f)

    def get_stored(self, i: int) -> Image.Image:
        file_no, offset, height, width = (int(v) for v in self.index[i])
        data = os.pread(self._handle(file_no), height * width * 3, offset)
        return Image.fromarray(np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3), "RGB")

    def get(self, i: int) -> Image.Image:
        return resize_shorter(self.get_stored(i), self.resize_size, self.interpolation)

    def subset(self, indices: np.ndarray) -> DecodedImages:
        """A view of some images (same files, owning none: the files live as long as this object's source)."""
        view = DecodedImages([self.refs[i] for i in indices], self.labels[indices], self.paths, self.index[indices],
                             self.positions[indices], self.digests[indices], self.resize_size, self.interpolation)  # fmt: skip
        view._source = self  # type: ignore[attr-defined]  # keeps the owner (and so its files) alive
        return view

    @classmethod
    def join(cls, ls: LabelledSet, parts: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], resize_size: int,
             interpolation: str, owned: tuple[Path, ...] = ()) -> DecodedImages:  # fmt: skip
        """One split from the parts several processes decoded. Each part is (its file, its `index`, the
        positions in `ls` of its images, their `digests`), as `decode_split` made them."""
        rows, positions = [], []
        for file_no, (_, index, pos, _) in enumerate(parts):
            rows.append(index.copy())
            rows[-1][:, 0] = file_no
            positions.append(pos)
        index_all = np.concatenate(rows) if rows else np.zeros((0, 4), np.int64)
        pos_all = np.concatenate(positions) if positions else np.zeros(0, np.int64)
        digests_all = np.concatenate([p[3] for p in parts]) if parts else np.zeros((0, DIGEST_BYTES), np.uint8)
        order = np.argsort(pos_all, kind="stable")
        index_all, pos_all, digests_all = index_all[order], pos_all[order], digests_all[order]
        return cls([ls.refs[i] for i in pos_all], ls.labels[pos_all], [Path(p) for p, *_ in parts], index_all, pos_all,
                   digests_all, resize_size, interpolation, owned)  # fmt: skip

    def disown(self) -> tuple[Path, ...]:
        """Hand this object's files to another (see `join`): they are no longer removed with it."""
        for fin in self._finalizers:
            fin.detach()
        self._finalizers, owned, self._owned = [], self._owned, ()
        return owned

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}
        for fin in self._finalizers:
            fin()


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def decode_split(
    ls: LabelledSet,
    spec: PreprocessSpec,
    crop_scale: float | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    name: str = "images",
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    path: str | os.PathLike[str] | None = None,
) -> tuple[DecodedImages, list[dict[str, str]]]:
    """Decode every image once into a disk cache; return the good ones and a record of those that failed.

    `crop_scale` given (training images): images are kept large enough for that random crop
    (see `stored_size`). The cache file goes in `cache_dir` (default: the temp folder)."""
    keep_size = stored_size(spec, crop_scale)

    def work(ref: ImageRef) -> tuple[np.ndarray, bytes] | str:
        try:
            img, digest = ref.load_with_digest()  # hashed from the decode's own read: no second read of any file
            # Keep the resized image only when it is smaller than the original; small originals (IDX)
            # stay small and are resized on access, which gives the same pixels.
            if min(img.size) > keep_size:
                img = resize_shorter(img, keep_size, spec.interpolation)
            return np.asarray(img, dtype=np.uint8), digest
        except Exception as exc:  # PIL raises many types for bad data; each becomes a skip record
            return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]

    folder = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir())
    if path is None:
        fd, tmp = tempfile.mkstemp(prefix=f"{CACHE_PREFIX}{name}-", suffix=".tmp", dir=folder)
    else:  # a name peers can find (several processes decoding shares of one split)
        tmp = str(path)
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        except OSError as exc:
            raise EdgetlError(f"cannot write the decoded-image cache {tmp}: {exc.strerror or exc}") from None
    good: list[int] = []
    index = np.zeros((len(ls), 4), dtype=np.int64)
    digests = np.zeros((len(ls), DIGEST_BYTES), dtype=np.uint8)
    failed: list[dict[str, str]] = []
    offset = 0
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as out:
            for i, outcome in _bounded_map(work, ls.refs, workers or min(8, (os.cpu_count() or 2) * 2)):
                if progress:
                    progress(1)
                if isinstance(outcome, str):
                    failed.append({"file": ls.refs[i].key, "reason": outcome})
                    continue
                result, digest = outcome
                if result.ndim != 3 or result.shape[2] != 3:
                    failed.append({"file": ls.refs[i].key, "reason": f"unexpected decoded shape {result.shape}"})
                    continue
                out.write(result.tobytes())
                index[len(good)] = (0, offset, result.shape[0], result.shape[1])
                digests[len(good)] = np.frombuffer(digest, dtype=np.uint8)
                offset += result.nbytes
                good.append(i)
    except OSError as exc:
        _unlink(tmp)
        raise EdgetlError(f"cannot write the decoded-image cache in {folder}: {exc.strerror or exc} "
                          f"({offset / 2**30:.1f} GiB written so far; free some disk or set TMPDIR)") from None  # fmt: skip
    except BaseException:
        _unlink(tmp)
        raise
    kept = np.asarray(good, dtype=np.int64)
    images = DecodedImages([ls.refs[i] for i in kept], ls.labels[kept], [Path(tmp)], index[: len(good)].copy(), kept,
                           digests[: len(good)].copy(), spec.resize_size, spec.interpolation, owned=(Path(tmp),))  # fmt: skip
    return images, failed


def _bounded_map(fn: Callable[[Any], Any], items: list[Any], workers: int) -> Iterator[tuple[int, Any]]:
    """(i, fn(items[i])) in order, with at most 4 x `workers` results waiting: `Executor.map` submits
    everything at once, and finished images queue up in memory behind a slow one."""
    window = 4 * workers
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[Any]] = deque()
        next_i = 0
        while next_i < len(items) or pending:
            while next_i < len(items) and len(pending) < window:
                pending.append(pool.submit(fn, items[next_i]))
                next_i += 1
            i = next_i - len(pending)
            yield i, pending.popleft().result()


def decode_for_scoring(
    ls: LabelledSet, spec: PreprocessSpec, reporter: Reporter, source: str
) -> tuple[DecodedImages, list[dict[str, str]]]:
    """Decode images to score a model on: unreadable ones are left out with a warning, none readable is an error."""
    with reporter.task(f"decoding {len(ls)} images from {source}", len(ls)) as advance:
        images, failed = decode_split(ls, spec, name="scoring", progress=advance)
    if failed:
        reporter.warn(f"{len(failed)} unreadable image(s) left out, e.g. {failed[0]['file']} ({failed[0]['reason']})")
    if len(images) == 0:
        raise EdgetlError(f"no readable images in {source}")
    return images, failed
