"""A smaller copy of an image folder tree, for machines it must be sent to (the GPU machine takes 64 MiB a call):
every image resized to a shorter side of `--size` px with the backbone's interpolation and saved as WebP.

    python benchmarks/shrink_dataset.py ../shared/datasets/clothing-small .gpudata/clothing --size 256 --quality 75

At 256 px (clothing-small's evaluation resize, and the size `--crop-source resized` cuts its training crops from)
the pixels edgetl sees change only by the WebP encoding: 109 MB of JPEGs became 30 MB. Accuracy measured on such a
copy is not the original dataset's; results say which they used.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image

from edgetl.fileio import write_with
from edgetl.preprocess import IMAGE_EXTENSIONS, decode_image, resize_shorter


def _shrink(job: tuple[Path, Path, int, int, str]) -> int:
    """The copy's size in bytes; -1 for an image Pillow cannot read (edgetl's loader skips those too)."""
    src, dst, size, quality, interpolation = job
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        # edgetl's own decoder: EXIF orientation applied, transparency on white, 16-bit scaled - the pixels
        # training would see, which a plain convert("RGB") is not (the WebP keeps no EXIF to rotate by later).
        small = resize_shorter(decode_image(src), size, interpolation)
    except (OSError, ValueError, Image.DecompressionBombError):
        return -1
    # whole or not at all: an interrupted run leaves no truncated image for a later copy to trip on
    write_with(dst, lambda tmp: small.save(tmp, "WEBP", quality=quality, method=6))
    return dst.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--size", type=int, default=256, help="shorter side, px")
    ap.add_argument("--quality", type=int, default=75, help="WebP quality")
    ap.add_argument("--interpolation", default="bilinear", help="as the backbone's preprocessing (Lite0: bilinear)")
    args = ap.parse_args()
    if not args.src.is_dir():
        raise SystemExit(f"error: {args.src} is not a folder")
    if args.dst.exists():
        raise SystemExit(f"error: {args.dst} exists; give a new folder")
    files = sorted(p for p in args.src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    jobs = [(f, (args.dst / f.relative_to(args.src)).with_suffix(".webp"), args.size, args.quality, args.interpolation)
            for f in files]  # fmt: skip
    with ProcessPoolExecutor() as pool:
        sizes = list(pool.map(_shrink, jobs, chunksize=64))
    unreadable = [str(f) for f, n in zip(files, sizes, strict=True) if n < 0]
    if unreadable:
        print(f"skipped {len(unreadable)} unreadable image(s), as edgetl would: {', '.join(unreadable[:5])}")
    total, source = sum(n for n in sizes if n > 0), sum(f.stat().st_size for f in files)
    print(f"{len(files) - len(unreadable)} images, {source / 1e6:.1f} MB -> {total / 1e6:.1f} MB in {args.dst}")


if __name__ == "__main__":
    main()
