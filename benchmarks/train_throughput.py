"""Fine-tune (stage 2) training throughput: edgetl's speed options against plain fp32 eager, and the
options a library offers that edgetl does not use by default.

    python benchmarks/train_throughput.py [--rounds 3] [--seconds 25] [--unfreeze all] [--input-size 224]
        [--configs plain edgetl compile workers1] [--tag TAG]

Each configuration runs in its own process (the malloc setting is process-wide), alternating
A, B, C, A, B, C, ... so drift on this shared machine hits all alike; ratios of medians are reported.
  plain:    fp32, eager, contiguous (NCHW) tensors, glibc malloc defaults
  edgetl:   channels_last + malloc tuning + whatever `--precision auto` picks (fp32 on every CPU now): what `edgetl train` does
  compile:  edgetl + torch.compile of the model (inductor; its compile time is reported apart, not in images/s)
  workers1: edgetl + one DataLoader worker process decoding and augmenting beside the training steps
  bf16:     edgetl with bf16 autocast wherever the CPU has bf16 instructions (`--precision bf16`): what bf16 brings here
  fp32:     edgetl with autocast off whatever `auto` picks (`--precision fp32`): the side of a bf16 comparison
The step is the real one: efficientnet_lite0, the top blocks (or all) + head trainable, BatchNorm frozen,
AdamW, batch 32 (or --batch-size), with augmentation from decoded clothing-small images.
Writes benchmarks/results/train_throughput[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import save, spread

from edgetl.hostinfo import has_amx_bf16, has_bf16

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared/datasets/clothing-small"


CONFIGS = ("plain", "edgetl", "compile", "workers1", "bf16", "fp32")


def worker(config: str, seconds: float, unfreeze: str, input_size: int | None, batch_size: int) -> None:
    import time

    import torch

    sys.path.insert(0, str(HERE.parent))
    from edgetl.backbones import load_pretrained, preprocess_spec
    from edgetl.data import load_dataset
    from edgetl.decoded import decode_split
    from edgetl.malloc_tuning import tune_malloc
    from edgetl.model import build_classifier, param_groups, set_train_mode, unfreeze_top
    from edgetl.train import AugmentedImages, train_transform, use_bf16

    fast = config != "plain"
    if fast:
        tune_malloc()
    torch.manual_seed(0)
    spec = preprocess_spec("efficientnet_lite0", input_size)
    ds = load_dataset(DATA, limit_train=max(320, 4 * batch_size))
    images, _ = decode_split(ds.train, spec)
    model = build_classifier("efficientnet_lite0", len(ds.classes))
    load_pretrained(model.backbone, "efficientnet_lite0", None, lambda _m: None)
    unfreeze_top(model, None if unfreeze == "all" else int(unfreeze))
    bf16 = {"bf16": has_bf16(), "fp32": False}.get(config, fast and use_bf16("auto", torch.device("cpu")))
    if fast:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4)
    loader = torch.utils.data.DataLoader(AugmentedImages(images, spec, train_transform(spec, "light")), batch_size=batch_size,
                                         shuffle=True,
                                         drop_last=True, num_workers=1 if config == "workers1" else 0,
                                         persistent_workers=config == "workers1")  # fmt: skip
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    set_train_mode(model)
    forward = torch.compile(model) if config == "compile" else model

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        if fast:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = crit(forward(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    it = iter(loader)
    t_warm = time.perf_counter()
    for _ in range(2):  # warm-up (and torch.compile's compilation)
        step(*next(it))
    warmup_seconds = time.perf_counter() - t_warm
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        step(x, y)
        n += len(y)
    print(json.dumps({"config": config, "images_per_second": n / (time.perf_counter() - t0), "bf16": bf16,
                      "warmup_seconds": warmup_seconds}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=25)
    ap.add_argument("--unfreeze", default="3", help="top blocks trainable, or all")
    ap.add_argument("--input-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=["plain", "edgetl"])
    ap.add_argument("--tag", default="")
    ap.add_argument("--worker", default=None)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.seconds, args.unfreeze, args.input_size, args.batch_size)
        return
    results: dict[str, list[float]] = {c: [] for c in args.configs}
    warmups: dict[str, list[float]] = {c: [] for c in args.configs}
    bf16: dict[str, bool] = {}
    for _ in range(args.rounds):
        for config in results:
            env = {**os.environ, "EDGETL_NO_MALLOC_TUNING": "1" if config == "plain" else ""}
            cmd = [sys.executable, __file__, "--worker", config, "--seconds", str(args.seconds), "--unfreeze", args.unfreeze,
                   "--batch-size", str(args.batch_size)]
            if args.input_size:
                cmd += ["--input-size", str(args.input_size)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            results[config].append(rec["images_per_second"])
            warmups[config].append(rec["warmup_seconds"])
            bf16[config] = rec["bf16"]
            print(rec, flush=True)
    stats = {k: spread(v) for k, v in results.items()}
    base = "plain" if "plain" in stats else args.configs[0]
    ratios = {k: v["median"] / stats[base]["median"] for k, v in stats.items()}
    size = args.input_size or 224
    where = "all blocks" if args.unfreeze == "all" else f"top {args.unfreeze} blocks"
    payload = {"rounds": args.rounds, "seconds_per_run": args.seconds, "unfreeze": args.unfreeze, "input_size": size,
               "batch_size": args.batch_size,
               "raw": results, "warmup_seconds": warmups, "stats": stats, "ratio_to": base, "ratios": ratios,
               "speedup": ratios.get("edgetl"), "bf16_used": bf16}  # fmt: skip
    md = (
        f"# Fine-tune throughput (efficientnet_lite0 at {size} px, {where} + head, batch {args.batch_size})\n\n"
        f"| config | median images/s | min | max | / {base} | warm-up s (2 steps; compile included) |\n|---|---|---|---|---|---|\n"
        + "".join(f"| {k} | {v['median']:.1f} | {v['min']:.1f} | {v['max']:.1f} | {ratios[k]:.2f}x | "
                  f"{statistics.median(warmups[k]):.1f} |\n" for k, v in stats.items())
        + f"\n{args.rounds} interleaved rounds of {args.seconds:g} s per config, each in its own process. "
        f"bf16 autocast in: {', '.join(k for k, v in bf16.items() if v) or 'none'} (the CPU has bf16 instructions: {has_bf16()}; "
        f"AMX: {has_amx_bf16()}).\n"
    )  # fmt: skip
    save(f"train_throughput{'_' + args.tag if args.tag else ''}", payload, md)


if __name__ == "__main__":
    main()
