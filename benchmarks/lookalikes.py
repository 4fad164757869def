"""Validation images that look the same as training images without being byte-identical (edgetl.duplicates:
nearest neighbours on 8x8 grey vectors, confirmed on 32x32 colour thumbnails, LOOKS_SAME_MAD): what it finds, what it costs, what it misses.

    python benchmarks/lookalikes.py

- found: on clothing-small and Fashion-MNIST (64 px, as the Fashion-MNIST preset trains), each decoded as
  train decodes them; the time of the check beside the decode's; a picture of example pairs (results/lookalikes_*.png).
- recall: 150 of clothing-small's validation photos copied as a training set after a JPEG re-encode (quality
  75), a resize to 75%, and both; the share of copies found, and their thumbnail differences.
- false alarms on the recall set: the other validation photos (without copies) scored against the copies.

Writes benchmarks/results/lookalikes.{json,md} and the example pictures.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, save, spread
from PIL import Image

from edgetl import duplicates
from edgetl.backbones import preprocess_spec
from edgetl.data import ImageRef, LabelledSet, load_dataset
from edgetl.decoded import DecodedImages, decode_split

CLOTHING = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-small"
FASHION = Path("/usr/share/datasets/fashion-mnist")


def thumb_mad(a: DecodedImages, i: int, b: DecodedImages, j: int) -> float:
    def thumb(images: DecodedImages, k: int) -> np.ndarray:
        return np.asarray(duplicates._thumbnail(images, k), dtype=np.float32)

    return float(np.abs(thumb(a, i) - thumb(b, j)).mean())


def pairs_picture(val: DecodedImages, train: DecodedImages, examples: list[tuple[str, str]], target: Path) -> None:
    """Each example pair side by side (validation left), 96 px tall, for a person to judge."""
    index_v, index_t = {r.key: i for i, r in enumerate(val.refs)}, {r.key: j for j, r in enumerate(train.refs)}
    rows = []
    for v, t in examples:
        a, b = (img.convert("RGB").resize((96, 96)) for img in (val.get_stored(index_v[v]), train.get_stored(index_t[t])))
        row = Image.new("RGB", (200, 100), (255, 255, 255))
        row.paste(a, (2, 2))
        row.paste(b, (102, 2))
        rows.append(row)
    sheet = Image.new("RGB", (200, 100 * max(1, len(rows))), (255, 255, 255))
    for k, row in enumerate(rows):
        sheet.paste(row, (0, 100 * k))
    sheet.save(target)


def found_in(name: str, root: Path, size: int | None) -> dict[str, Any]:
    ds = load_dataset(root)
    spec = preprocess_spec("efficientnet_lite0", size)
    start = time.perf_counter()
    train, _ = decode_split(ds.train, spec, crop_scale=0.35)
    val, _ = decode_split(ds.val, spec)
    decode_s = time.perf_counter() - start
    duplicates.EXAMPLES, before = 12, duplicates.EXAMPLES
    start = time.perf_counter()
    count, examples = duplicates._lookalikes(train, val)
    check_s = time.perf_counter() - start
    duplicates.EXAMPLES = before
    index_v, index_t = {r.key: i for i, r in enumerate(val.refs)}, {r.key: j for j, r in enumerate(train.refs)}
    mads = [thumb_mad(val, index_v[v], train, index_t[t]) for v, t in examples]
    picture = RESULTS / f"lookalikes_{name}.png"
    pairs_picture(val, train, examples, picture)
    return {"dataset": name, "train": len(train), "val": len(val), "found": count, "decode_s": decode_s, "check_s": check_s,
            "examples": [list(e) for e in examples], "example_mads": mads, "picture": picture.name}  # fmt: skip


def recall() -> dict[str, Any]:
    ds = load_dataset(CLOTHING)
    rng = np.random.default_rng(0)
    chosen = sorted(rng.choice(len(ds.val), 150, replace=False).tolist())
    rest = [i for i in range(len(ds.val)) if i not in set(chosen)]
    spec = preprocess_spec("efficientnet_lite0")
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("jpeg75", "resize75", "both"):
            refs = []
            for i in chosen:
                img = ds.val.refs[i].load()
                if kind in ("resize75", "both"):
                    img = img.resize((round(img.width * 0.75), round(img.height * 0.75)), Image.Resampling.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=75 if kind != "resize75" else 95)
                path = Path(tmp) / f"{kind}-{i}.jpg"
                path.write_bytes(buf.getvalue())
                refs.append(ImageRef(key=path.name, path=path))
            copies, _ = decode_split(LabelledSet(refs, np.zeros(len(refs), dtype=np.int64)), spec, crop_scale=0.35)
            originals, _ = decode_split(ds.val.subset(chosen), spec)
            others, _ = decode_split(ds.val.subset(rest), spec)
            duplicates.EXAMPLES, before = 10**6, duplicates.EXAMPLES
            hits, pairs = duplicates._lookalikes(copies, originals)
            false_alarms, _ = duplicates._lookalikes(copies, others)
            duplicates.EXAMPLES = before
            wrong = sum(1 for v, t in pairs if t.split("-", 1)[1].split(".")[0] != str(chosen[[r.key for r in originals.refs].index(v)]))
            mads = [thumb_mad(originals, k, copies, k) for k in range(len(chosen))]
            out[kind] = {"copies": len(chosen), "found": hits, "paired_wrongly": wrong, "false_alarms_among_others": false_alarms,
                         "others": len(rest), "copy_mad": spread(mads)}  # fmt: skip
    return out


def main() -> None:
    rows = [found_in("clothing-small", CLOTHING, None), found_in("fashion-mnist", FASHION, 64)]
    rec = recall()
    lines = ["# Validation images that look the same as training images (not byte-identical)", "",
             f"Candidates (each validation image's 8 nearest training images on 8x8 grey vectors) confirmed on 32x32 colour "
             f"thumbnails: mean absolute difference <= {duplicates.LOOKS_SAME_MAD} "
             "(of 255). Each set decoded as `edgetl train` decodes it.", "",
             "| dataset | train | val | val images that look like a training image | check (s) | decode (s) | example pairs |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['train']} | {r['val']} | {r['found']} | {r['check_s']:.1f} | {r['decode_s']:.1f} | "
                     f"`{r['picture']}` (differences {', '.join(f'{m:.1f}' for m in r['example_mads'])}) |")  # fmt: skip
    lines += ["", "Recall on made copies: 150 clothing-small validation photos, copied into a training set; false alarms: "
              "the other validation photos against those copies.", "",
              "| copy | found | paired wrongly | false alarms | copy's difference, median (max) |", "|---|---|---|---|---|"]  # fmt: skip
    for kind, r in rec.items():
        lines.append(f"| {kind} | {r['found']} of {r['copies']} | {r['paired_wrongly']} | {r['false_alarms_among_others']} of "
                     f"{r['others']} | {r['copy_mad']['median']:.2f} ({r['copy_mad']['max']:.2f}) |")  # fmt: skip
    save("lookalikes", {"found": rows, "recall": rec, "threshold": duplicates.LOOKS_SAME_MAD}, "\n".join(lines))


if __name__ == "__main__":
    main()
