"""What `edgetl eval` finds, and what it costs, when it looks for look-alikes of the run's training images
among the images it scores (edgetl.duplicates.recorded_lookalikes): from the 8x8 thumbnails the run
recorded, reading only the nearest training images to confirm.

    python benchmarks/eval_lookalikes.py RUN DATA [RUN DATA ...] [--repeats 3]

Per run: eval's decode of the scored split (the test split, else validation), then the byte-identical check
(`recorded_copies`) and the look-alike check, each timed `--repeats` times (median), with what they found.
The runs need splits.json format 4 (trained by edgetl with recorded thumbnails; any backbone: the
thumbnails are of the decoded images, not of the model). Writes benchmarks/results/eval_lookalikes.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import save, spread

from edgetl import checkpoint
from edgetl.data import relabel, scoring_set
from edgetl.decoded import decode_for_scoring
from edgetl.duplicates import recorded_copies, recorded_lookalikes
from edgetl.progress import Reporter
from edgetl.run import RunFolder


def measure(run: Path, data: Path, repeats: int) -> dict:
    folder = RunFolder.open(run)
    ckpt = folder.checkpoint()
    spec = checkpoint.spec_of(ckpt)
    ls, classes, source, split = scoring_set(data, None)
    ls = relabel(ls, classes, list(ckpt["config"]["labels"]), str(data))
    started = time.perf_counter()
    images, _ = decode_for_scoring(ls, spec, Reporter(quiet=True), source)
    decode_s = time.perf_counter() - started
    record = folder.split_record()
    copies_s, alike_s = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        copies = recorded_copies(images, record)
        copies_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        alike = recorded_lookalikes(images, record, folder.path)
        alike_s.append(time.perf_counter() - t)
    images.close()
    return {"run": str(run), "data": source, "split": split, "scored": len(images),
            "training_images": len(record["splits"]["train"]), "decode_s": decode_s, "copies_s": spread(copies_s),
            "lookalikes_s": spread(alike_s), "copies": copies, "lookalikes": alike}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", help="RUN DATA [RUN DATA ...]")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if len(args.pairs) % 2:
        ap.error("give RUN DATA pairs")
    rows = [measure(Path(r), Path(d), args.repeats) for r, d in zip(args.pairs[::2], args.pairs[1::2], strict=True)]
    lines = ["# Look-alikes of training images in `edgetl eval` (edgetl.duplicates.recorded_lookalikes)", "",
             "Scored images that look the same as a training image without being byte-identical, found from the run's recorded "
             "8x8 thumbnails (64 bytes a training image) and confirmed on 32x32 colour thumbnails of only the nearest training "
             "images, read for it. Times: median of the repeats, beside eval's own decode of the scored images.", "",
             "| data (split) | scored | training images | byte-identical | look-alikes | unconfirmed | decode s | copies check s "
             "| look-alike check s | examples |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        a, c = r["lookalikes"], r["copies"]
        examples = "; ".join(f"{x} ~ {y}" for x, y in a["examples"][:3])
        lines.append(f"| {r['data']} | {r['scored']} | {r['training_images']} | {c['count']} | {a['count']} | {a['unconfirmed']} | "
                     f"{r['decode_s']:.1f} | {r['copies_s']['median']:.2f} | {r['lookalikes_s']['median']:.2f} | {examples} |")  # fmt: skip
    save("eval_lookalikes", {"results": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
