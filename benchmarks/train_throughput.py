"""Fine-tune (stage 2) training throughput: edgetl's speed options against plain fp32 eager.

    python benchmarks/train_throughput.py [--rounds 3] [--seconds 25]

Each configuration runs in its own process (the malloc setting is process-wide), alternating
A, B, A, B, ... so drift on this shared machine hits both alike; the ratio of medians is reported.
  plain:  fp32, eager, contiguous (NCHW) tensors, glibc malloc defaults
  edgetl: channels_last + malloc tuning (+ bf16 autocast where the CPU has native bf16; not on AVX2-only)
The step is the real one: efficientnet_lite0, top 3 blocks + head trainable, BatchNorm frozen, AdamW,
batch 32, with augmentation from decoded clothing-small images.
Writes benchmarks/results/train_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import save, spread

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared/datasets/clothing-small"


def worker(config: str, seconds: float) -> None:
    import time

    import torch

    sys.path.insert(0, str(HERE.parent))
    from edgetl.backbones import load_pretrained, preprocess_spec
    from edgetl.data import load_dataset
    from edgetl.decoded import decode_split
    from edgetl.hostinfo import has_bf16
    from edgetl.malloc_tuning import tune_malloc
    from edgetl.model import build_classifier, param_groups, set_train_mode, unfreeze_top
    from edgetl.train import AugmentedImages, train_transform

    fast = config == "edgetl"
    if fast:
        tune_malloc()
    torch.manual_seed(0)
    spec = preprocess_spec("efficientnet_lite0")
    ds = load_dataset(DATA, limit_train=320)
    images, _ = decode_split(ds.train, spec)
    model = build_classifier("efficientnet_lite0", len(ds.classes))
    load_pretrained(model.backbone, "efficientnet_lite0", None, lambda _m: None)
    unfreeze_top(model, 3)
    bf16 = fast and has_bf16()
    if fast:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4)
    loader = torch.utils.data.DataLoader(AugmentedImages(images, spec, train_transform(spec, "light")), batch_size=32, shuffle=True,
                                         drop_last=True)  # fmt: skip
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    set_train_mode(model)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        if fast:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = crit(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    it = iter(loader)
    for _ in range(2):  # warm-up
        step(*next(it))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        step(x, y)
        n += len(y)
    print(json.dumps({"config": config, "images_per_second": n / (time.perf_counter() - t0), "bf16": bf16}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=25)
    ap.add_argument("--worker", default=None)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.seconds)
        return
    results: dict[str, list[float]] = {"plain": [], "edgetl": []}
    bf16 = False
    for _ in range(args.rounds):
        for config in results:
            env = {**os.environ, "EDGETL_NO_MALLOC_TUNING": "1" if config == "plain" else ""}
            cmd = [sys.executable, __file__, "--worker", config, "--seconds", str(args.seconds)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            results[config].append(rec["images_per_second"])
            bf16 = bf16 or rec["bf16"]
            print(rec, flush=True)
    stats = {k: spread(v) for k, v in results.items()}
    ratio = stats["edgetl"]["median"] / stats["plain"]["median"]
    payload = {"rounds": args.rounds, "seconds_per_run": args.seconds, "raw": results, "stats": stats, "speedup": ratio, "bf16_used": bf16}
    md = (
        "# Fine-tune throughput: edgetl speed options vs plain fp32 eager (efficientnet_lite0, top 3 blocks, batch 32)\n\n"
        "| config | median images/s | min | max |\n|---|---|---|---|\n"
        + "".join(f"| {k} | {v['median']:.1f} | {v['min']:.1f} | {v['max']:.1f} |\n" for k, v in stats.items())
        + f"\nRatio (median edgetl / median plain, interleaved runs): **{ratio:.2f}x**. "
        f"bf16 autocast {'used' if bf16 else 'not used: this CPU has no native bf16 (AVX2 only)'}.\n"
    )
    save("train_throughput", payload, md)


if __name__ == "__main__":
    main()
