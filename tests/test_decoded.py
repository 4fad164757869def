"""The on-disk decode cache: exact pixels, bounded memory, large-enough training crops, no litter."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from edgetl.data import ImageRef, LabelledSet
from edgetl.decoded import decode_split, stored_size
from edgetl.preprocess import PreprocessSpec, decode_image, resize_shorter

SPEC = PreprocessSpec(224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3)


def _photos(folder: Path, n: int, size: tuple[int, int] = (640, 480)) -> LabelledSet:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for i in range(n):
        p = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        refs.append(ImageRef(key=p.name, path=p))
    return LabelledSet(refs, np.arange(n, dtype=np.int64) % 2)


def test_cached_images_are_the_evaluation_resize_exactly(tmp_path: Path) -> None:
    ls = _photos(tmp_path / "img", 3)
    images, failed = decode_split(ls, SPEC, cache_dir=tmp_path)
    assert failed == [] and len(images) == 3
    for i, ref in enumerate(ls.refs):
        expected = resize_shorter(decode_image(ref.path), SPEC.resize_size, SPEC.interpolation)
        assert np.array_equal(np.asarray(images.get(i)), np.asarray(expected))
    assert images.labels.tolist() == [0, 1, 0]


def test_training_images_are_kept_large_enough_for_the_smallest_crop(tmp_path: Path) -> None:
    assert stored_size(SPEC, None) == 256
    assert stored_size(SPEC, 0.35) == 379  # 224 / sqrt(0.35): the smallest crop still has 224 px across
    assert stored_size(SPEC, 1.0) == 256
    ls = _photos(tmp_path / "img", 2)
    images, _ = decode_split(ls, SPEC, crop_scale=0.35, cache_dir=tmp_path)
    assert min(images.get_stored(0).size) == 379
    # Evaluation views of the same images are still at the evaluation size.
    assert min(images.get(0).size) == 256
    small = _photos(tmp_path / "small", 1, size=(120, 100))  # never upsampled in the cache
    images, _ = decode_split(small, SPEC, crop_scale=0.35, cache_dir=tmp_path)
    assert images.get_stored(0).size == (120, 100)


def test_cache_file_is_removed_with_its_images_and_workers_reopen_it(tmp_path: Path) -> None:
    ls = _photos(tmp_path / "img", 2)
    (tmp_path / "cache").mkdir()
    images, _ = decode_split(ls, SPEC, cache_dir=tmp_path / "cache")
    path = images.paths[0]
    assert path.is_file() and path.parent == tmp_path / "cache" and path.name.endswith(".tmp")
    # A pickled copy (what a DataLoader worker gets) reads the same pixels and does not own the file.
    copy = pickle.loads(pickle.dumps(images))
    assert np.array_equal(np.asarray(copy.get(1)), np.asarray(images.get(1)))
    del copy
    assert path.is_file()
    images.close()
    assert not path.exists()


def test_peak_memory_of_decoding_does_not_grow_with_the_images(tmp_path: Path) -> None:
    """3,000 photos at 256 px would be 590 MB as a list of decoded images; the cache keeps the process
    far below that (peak RSS measured in a fresh interpreter, minus its size after imports)."""
    n, size = 3000, (300, 256)
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    for i in range(n):  # JPEG: small files, a real decode per image
        Image.fromarray(np.roll(base, i, axis=1)).save(folder / f"{i:05d}.jpg", quality=90)
    list_bytes = n * size[0] * size[1] * 3
    script = textwrap.dedent(f"""
        import resource, sys
        from pathlib import Path
        import numpy as np
        from edgetl.data import ImageRef, LabelledSet
        from edgetl.decoded import decode_split
        from edgetl.preprocess import PreprocessSpec
        spec = PreprocessSpec(224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3)
        refs = [ImageRef(key=p.name, path=p) for p in sorted(Path({str(folder)!r}).iterdir())]
        ls = LabelledSet(refs, np.zeros(len(refs), dtype=np.int64))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        images, failed = decode_split(ls, spec, cache_dir={str(tmp_path)!r})
        assert len(images) == {n} and not failed
        # Read every image back, as an epoch does.
        total = sum(images.get(i).size[0] for i in range(len(images)))
        print(before * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, total)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    before, peak = int(out[0]), int(out[1])
    grown = peak - before
    assert grown < list_bytes / 4, f"decoding {n} images grew the process by {grown / 2**20:.0f} MB"
