"""Decoded images of one split in an on-disk cache, so memory does not grow with the dataset.

Every image is decoded once (threads: Pillow releases the GIL while decoding), resized, and appended
as raw uint8 RGB to one flat file. What stays in memory is a per-image index of 3 int64 (offset,
height, width: 24 bytes an image, 2.4 MB for 100k images). Reads are `os.pread` calls, so the
pixels pass through the kernel's page cache (shared, reclaimable, not this process's resident
memory) rather than through a growing Python list; a warm cache reads a 256 px image in ~50 us,
faster than decoding its JPEG again. The cost is disk: about 200 KB an image at 256 px
(20 GB for 100k photos), in the run folder (or the temp folder) and removed when the run ends.

DataLoader workers receive the index and the file's path (not the file handle), and open the file
themselves, so this works with any multiprocessing start method.

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

from edgetl.data import ImageRef, LabelledSet
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
    `get_stored(i)` at the (possibly larger) size it was cached at, for training crops."""

    def __init__(self, refs: list[ImageRef], labels: np.ndarray, path: Path, index: np.ndarray,
                 resize_size: int, interpolation: str, owner: bool = True) -> None:  # fmt: skip
        self.refs, self.labels, self.path, self.index = refs, labels, path, index
        self.resize_size, self.interpolation = resize_size, interpolation
        self._fd: int | None = None
        self._pid = -1
        # The file goes when the last owner copy is garbage collected or the process exits normally.
        self._finalizer = weakref.finalize(self, _unlink, str(path)) if owner else None

    def __len__(self) -> int:
        return len(self.refs)

    def __getstate__(self) -> dict[str, Any]:
        # A worker process gets the index and the path; it opens its own handle and never deletes the file.
        state = {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_finalizer")}
        return {**state, "_fd": None, "_pid": -1, "_finalizer": None}

    def _handle(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def get_stored(self, i: int) -> Image.Image:
        offset, height, width = (int(v) for v in self.index[i])
        data = os.pread(self._handle(), height * width * 3, offset)
        return Image.fromarray(np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3), "RGB")

    def get(self, i: int) -> Image.Image:
        return resize_shorter(self.get_stored(i), self.resize_size, self.interpolation)

    def subset(self, indices: np.ndarray) -> DecodedImages:
        """A view of some images (same file, not an owner: the file lives as long as this object's source)."""
        view = DecodedImages([self.refs[i] for i in indices], self.labels[indices], self.path, self.index[indices],
                             self.resize_size, self.interpolation, owner=False)  # fmt: skip
        view._source = self  # type: ignore[attr-defined]  # keeps the owner (and so the file) alive
        return view

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
        if self._finalizer is not None:
            self._finalizer()


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
) -> tuple[DecodedImages, list[dict[str, str]]]:
    """Decode every image once into a disk cache; return the good ones and a record of those that failed.

    `crop_scale` given (training images): images are kept large enough for that random crop
    (see `stored_size`). The cache file goes in `cache_dir` (default: the temp folder)."""
    keep_size = stored_size(spec, crop_scale)

    def work(ref: ImageRef) -> np.ndarray | str:
        try:
            img = ref.load()
            # Keep the resized image only when it is smaller than the original; small originals (IDX)
            # stay small and are resized on access, which gives the same pixels.
            if min(img.size) > keep_size:
                img = resize_shorter(img, keep_size, spec.interpolation)
            return np.asarray(img, dtype=np.uint8)
        except Exception as exc:  # PIL raises many types for bad data; each becomes a skip record
            return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]

    folder = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir())
    fd, tmp = tempfile.mkstemp(prefix=f"{CACHE_PREFIX}{name}-", suffix=".tmp", dir=folder)
    path = Path(tmp)
    good: list[int] = []
    index = np.zeros((len(ls), 3), dtype=np.int64)
    failed: list[dict[str, str]] = []
    offset = 0
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as out:
            for i, result in _bounded_map(work, ls.refs, workers or min(8, (os.cpu_count() or 2) * 2)):
                if progress:
                    progress(1)
                if isinstance(result, str):
                    failed.append({"file": ls.refs[i].key, "reason": result})
                    continue
                if result.ndim != 3 or result.shape[2] != 3:
                    failed.append({"file": ls.refs[i].key, "reason": f"unexpected decoded shape {result.shape}"})
                    continue
                out.write(result.tobytes())
                index[len(good)] = (offset, result.shape[0], result.shape[1])
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
    images = DecodedImages([ls.refs[i] for i in kept], ls.labels[kept] if len(kept) else np.zeros(0, np.int64), path,
                           index[: len(good)].copy(), spec.resize_size, spec.interpolation)  # fmt: skip
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
        reporter.log(f"[yellow]warning:[/] {len(failed)} unreadable image(s) left out, e.g. {failed[0]['file']} ({failed[0]['reason']})")
    if len(images) == 0:
        raise EdgetlError(f"no readable images in {source}")
    return images, failed
