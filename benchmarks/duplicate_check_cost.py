"""What finding byte-identical images costs `edgetl train` (edgetl.duplicates), before and after the
digests moved into the decode's own read.

    python benchmarks/duplicate_check_cost.py                     # clothing-small and 20,000 generated JPEGs
    python benchmarks/duplicate_check_cost.py --sizes 20000 100000 --repeats 5

Per dataset, rounds in alternation, each pipeline timed as train runs it (the training and validation
splits, Lite0's cache sizes):
- before: the check as train ran it until this change, before decoding (every image whose byte count
  another image shares is read and hashed: `old_check`), then the decode as it was (Pillow
  opening each file by its path, no digest).
- after: the decode that hashes each image's bytes from its own read; nothing else is read.
Both with a warm page cache and with a cold one (the kernel's caches dropped before the pipeline,
as root; a first training run on images not read since boot, or on a network disk, pays that read).

Writes benchmarks/results/duplicate_check_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import result_name, save, spread
from scale_memory import generate

from edgetl.backbones import preprocess_spec
from edgetl.data import ImageRef, load_dataset
from edgetl.decoded import decode_split
from edgetl.duplicates import _digest_of
from edgetl.preprocess import decode_image

CLOTHING = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-small"


def old_check(named: list[tuple[str, Any]]) -> list[list[Any]]:
    """The check as train ran it before this change (kept here, where it is measured): group every image by
    byte count, then read and hash each one whose byte count another shares."""
    by_size: dict[int | None, list[Any]] = defaultdict(list)
    for name, ls in named:
        for ref in ls.refs:
            by_size[ref.size_on_disk()].append((name, ref))
    by_digest: dict[bytes, list[Any]] = defaultdict(list)
    for size, group in by_size.items():
        if len(group) < 2 and size is not None:
            continue
        for name, ref in group:
            digest = _digest_of(ref)
            if digest is not None:
                by_digest[digest].append((name, ref))
    return [g for g in by_digest.values() if len(g) > 1]


def drop_caches() -> bool:
    """Empty the kernel's page cache (needs root); False where this host does not allow it."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def decode_without_digest() -> Iterator[None]:
    """The decode as it was before this change: Pillow reads the file by its path; no digest."""
    real = ImageRef.load_with_digest

    def old(ref: ImageRef) -> tuple[Any, bytes]:
        if ref.path is not None and ref.length < 0:
            return decode_image(ref.path), bytes(16)
        return ref.load(), bytes(16)

    ImageRef.load_with_digest = old  # type: ignore[method-assign]
    try:
        yield
    finally:
        ImageRef.load_with_digest = real  # type: ignore[method-assign]


def decode_both(ds: Any, spec: Any) -> None:
    for ls, crop in ((ds.train, 0.35), (ds.val, None)):  # training images kept large enough for 0.35 crops, as train does
        images, _ = decode_split(ls, spec, crop_scale=crop)
        images.close()


def before(ds: Any, spec: Any) -> tuple[float, float]:
    """(seconds of the check, seconds of check + decode)."""
    start = time.perf_counter()
    old_check([("train", ds.train), ("val", ds.val)])
    check = time.perf_counter() - start
    with decode_without_digest():
        decode_both(ds, spec)
    return check, time.perf_counter() - start


def after(ds: Any, spec: Any) -> float:
    start = time.perf_counter()
    decode_both(ds, spec)
    return time.perf_counter() - start


def measure(name: str, root: Path, repeats: int, cold: bool) -> dict[str, Any]:
    ds = load_dataset(root)
    spec = preprocess_spec("efficientnet_lite0")
    refs = ds.train.refs + ds.val.refs
    sizes: dict[int | None, int] = {}
    for ref in refs:
        sizes[ref.size_on_disk()] = sizes.get(ref.size_on_disk(), 0) + 1
    print(f"{name}: {len(refs)} images, {'cold' if cold else 'warm'} cache", flush=True)
    if not cold:
        after(ds, spec)  # warm the page cache
    checks, totals_before, totals_after = [], [], []
    for _ in range(repeats):
        if cold:
            drop_caches()
        check, total = before(ds, spec)
        checks.append(check)
        totals_before.append(total)
        if cold:
            drop_caches()
        totals_after.append(after(ds, spec))
    return {"dataset": name, "cache": "cold" if cold else "warm", "images": len(refs),
            "files_read_by_check": sum(n for s, n in sizes.items() if n > 1 or s is None),
            "mb_read_by_check": sum(s * n for s, n in sizes.items() if s is not None and n > 1) / 1e6,
            "mb_total": sum(s * n for s, n in sizes.items() if s is not None) / 1e6,
            "check_s": spread(checks), "before_s": spread(totals_before), "after_s": spread(totals_after)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[20000], help="generated JPEG folders (scale_memory.py's)")
    ap.add_argument("--no-clothing", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    sets = [] if args.no_clothing else [("clothing-small", CLOTHING)]
    sets += [(f"generated-{n}", generate(n)) for n in args.sizes]
    can_drop = drop_caches()
    rows = [measure(name, root, args.repeats, cold) for name, root in sets for cold in ([False, True] if can_drop else [False])]
    lines = ["# The duplicate check's cost in `edgetl train`: a read before the decode vs a digest in the decode's read", "",
             f"Medians of {args.repeats} rounds, before and after in alternation. **before**: the check as train ran it "
             "until this change (read and hash every image whose byte count another image shares), then the decode "
             "without digests. **after**: the decode hashing each image from its own read; nothing else read. Cold: "
             "the page cache dropped before each pipeline." + ("" if can_drop else " (This host did not allow dropping "
             "the page cache: warm only.)"), "",
             "| dataset | cache | images | check read: files | MB | check (s) | before: check + decode (s) | after: decode "
             "with digests (s) | after / before |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        c, b, a = (r[k]["median"] for k in ("check_s", "before_s", "after_s"))
        lines.append(f"| {r['dataset']} | {r['cache']} | {r['images']} | {r['files_read_by_check']} | "
                     f"{r['mb_read_by_check']:.1f} of {r['mb_total']:.1f} | {c:.2f} | {b:.2f} | {a:.2f} | {a / b:.3f} |")  # fmt: skip
    save(result_name("duplicate_check_cost", args.tag), {"args": vars(args), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
