"""What an app pays for decoding and preprocessing, and whether the app path agrees with training.

    python benchmarks/runtime_throughput.py RUN

RUN holds model.onnx (edgetl export) trained on clothing-small. Measures, on the validation photos:
- edgetl.runtime.Classifier.predict on file paths (decode + resize + crop + normalise + inference),
  batch 1 and batch 32, images/s;
- bare onnxruntime inference on already-preprocessed arrays (what `edgetl bench` times), same batches;
- top-1 agreement of the runtime with the PyTorch evaluation pipeline on every validation image.
Writes results/runtime_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import save, spread

from edgetl.run import RunFolder
from edgetl.runtime import Classifier


def rate(fn, n_images: int, seconds: float = 8.0) -> dict[str, float]:
    fn()
    rates, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(rates) < 3:
        t = time.perf_counter()
        fn()
        rates.append(n_images / (time.perf_counter() - t))
    return spread(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    args = ap.parse_args()
    run = Path(args.run)
    ds = RunFolder.open(run).dataset()  # the recorded validation list, not a re-drawn one
    paths = [r.path for r in ds.val.refs]
    clf = Classifier(run / "model.onnx", threads=2)
    arrays = np.stack([clf.prepare(p) for p in paths[:32]])
    results = {}
    for b in (1, 32):
        batch_paths = paths[:b]
        results[f"runtime_b{b}"] = rate(lambda bp=batch_paths: clf.predict(list(bp)), b)
        results[f"bare_b{b}"] = rate(lambda x=arrays[:b]: clf.logits(x), b)

    # Agreement with the PyTorch evaluation pipeline (torch imported only here, for the reference).
    import torch

    from edgetl import checkpoint
    from edgetl.decoded import decode_split
    from edgetl.train import predict_logits

    model, ckpt = checkpoint.load_model(run)
    images, _ = decode_split(ds.val, checkpoint.spec_of(ckpt))
    ref = predict_logits(model, images, checkpoint.spec_of(ckpt), torch.device("cpu")).argmax(1)
    preds = clf.predict(paths)
    ours = np.asarray([clf.labels.index(p.label) for p in preds])  # type: ignore[union-attr]
    agreement = float((ours == ref).mean())
    payload = {"run": str(run), "n_val": len(paths), "throughput": results, "top1_agreement_with_pytorch": agreement}
    md = (
        "# edgetl.runtime: throughput with decoding + preprocessing vs bare inference (efficientnet_lite0, clothing-small photos)\n\n"
        "| batch | runtime from JPEG paths, img/s | bare onnxruntime on arrays, img/s | share of time outside inference |\n"
        "|---|---|---|---|\n"
        + "".join(
            f"| {b} | {results[f'runtime_b{b}']['median']:.1f} | {results[f'bare_b{b}']['median']:.1f} | "
            f"{1 - results[f'runtime_b{b}']['median'] / results[f'bare_b{b}']['median']:.0%} |\n"
            for b in (1, 32)
        )
        + f"\nTop-1 agreement of the runtime (Pillow + numpy + onnxruntime) with the PyTorch evaluation pipeline on all "
        f"{len(paths)} validation photos: **{agreement:.2%}** (target >= 99.5%). Medians of repeated calls, 2 threads.\n"
    )
    save("runtime_throughput", payload, md)


if __name__ == "__main__":
    main()
