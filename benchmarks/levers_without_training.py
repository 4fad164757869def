"""Issue 15's levers that need no training, measured on runs already trained: a uniform weight soup of
the runs (Wortsman et al., 2022: average the weights of fine-tunes of one pretrained model) and the
test-time resolution (Touvron et al., 2019, "FixRes": a model trained on random-resized crops often
scores better on larger centre crops), the centre crop's share of the resized image at the trained size
(`--crop-ratios`: 1.0 keeps the whole shorter side, at no latency cost; most photos are portrait, so
the default 224/256 cuts the top and bottom of a garment), and test-time augmentation by horizontal flip
at the trained size (the logits of the image and of its mirror image averaged: twice the latency). All
are chosen on validation only; test is reported beside.

    python benchmarks/levers_without_training.py RUN RUN [RUN ...] [--sizes 224 240 256 272 288]
        [--crop-ratios 0.75 0.8 0.875 0.95 1.0] [--out NAME]

Every run must share its backbone, labels and preprocessing (fine-tunes of one recipe, different seeds).
Each (size, split) is decoded once and scored by every model. Writes benchmarks/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from common import save, spread

DATA = "/work/shared/datasets/clothing-small"


def soup(state_dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of every float tensor; integer buffers (BatchNorm's step counts) from the first."""
    return {k: (sum(sd[k] for sd in state_dicts) / len(state_dicts)) if v.is_floating_point() else v for k, v in state_dicts[0].items()}


def flip_averaged(model: Any) -> Any:
    """`model` scoring each image and its mirror image, logits averaged (test-time augmentation)."""
    import torch

    class FlipAveraged(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.model(x) + self.model(torch.flip(x, dims=[-1]))) / 2

    return FlipAveraged().eval()


def main() -> None:
    import torch

    from edgetl import checkpoint
    from edgetl.data import relabel, scoring_set
    from edgetl.decoded import decode_for_scoring
    from edgetl.progress import Reporter
    from edgetl.train import predict_logits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 240, 256, 272, 288])
    parser.add_argument(
        "--crop-ratios",
        nargs="*",
        type=float,
        default=[],
        help="centre-crop ratios (input/resize) to score at the trained size, beside the run's own",
    )
    parser.add_argument("--out", default="levers_without_training_clothing")
    args = parser.parse_args()

    ckpts = [checkpoint.read(r) for r in args.runs]
    base, labels = checkpoint.spec_of(ckpts[0]), list(ckpts[0]["config"]["labels"])
    backbone = ckpts[0]["config"]["backbone"]
    for c in ckpts[1:]:
        if checkpoint.spec_of(c) != base or list(c["config"]["labels"]) != labels or c["config"]["backbone"] != backbone:
            raise SystemExit(f"{c['path']}: another backbone, labels or preprocessing than {ckpts[0]['path']}")
    models = {str(r): checkpoint.build_model(c) for r, c in zip(args.runs, ckpts, strict=True)}
    souped = checkpoint.build_model(ckpts[0])
    souped.load_state_dict(soup([c["state_dict"] for c in ckpts]))
    models["soup"] = souped.eval()
    quiet, cpu = Reporter(quiet=True), torch.device("cpu")

    def scores(spec: Any, flip: bool = False) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
        """Each model's top-1 on val and test decoded with `spec`, and with flip test-time augmentation if `flip`."""
        plain: dict[str, dict[str, float]] = {name: {} for name in models}
        flips: dict[str, dict[str, float]] = {name: {} for name in models}
        for split in ("val", "test"):
            ls, classes, source, _ = scoring_set(args.data, split)
            images, failed = decode_for_scoring(relabel(ls, classes, labels, args.data), spec, quiet, source)
            if failed:
                raise SystemExit(f"{len(failed)} image(s) of {source} could not be read")
            truth = np.asarray(images.labels)
            for name, model in models.items():
                plain[name][split] = float((predict_logits(model, images, spec, cpu).argmax(1) == truth).mean() * 100)
                if flip:
                    flips[name][split] = float((predict_logits(flip_averaged(model), images, spec, cpu).argmax(1) == truth).mean() * 100)
        return plain, flips

    sizes = sorted({*args.sizes, base.input_size})  # the trained size is every comparison's baseline
    top1: dict[str, dict[int, dict[str, float]]] = {name: {} for name in models}
    flipped: dict[str, dict[str, float]] = {}  # at the trained size
    for size in sizes:
        spec = dataclasses.replace(base, input_size=size, resize_size=round(size * base.resize_size / base.input_size))
        plain, flips = scores(spec, flip=size == base.input_size)
        for name in models:
            top1[name][size] = plain[name]
        if size == base.input_size:
            flipped = flips
        print(f"{size} px", {n: {k: round(v, 2) for k, v in t.items()} for n, t in plain.items()}, flush=True)

    # The crop ratio at the trained size: same input (latency), another share of the image in view.
    own_ratio = base.input_size / base.resize_size
    ratios = sorted({*args.crop_ratios, own_ratio}) if args.crop_ratios else []
    by_ratio: dict[str, dict[float, dict[str, float]]] = {name: {} for name in models}
    for ratio in ratios:
        if ratio == own_ratio:  # the run's own view, scored above
            plain = {name: top1[name][base.input_size] for name in models}
        else:
            plain = scores(dataclasses.replace(base, resize_size=max(base.input_size, int(base.input_size / ratio))))[0]
        for name in models:
            by_ratio[name][ratio] = plain[name]
        print(f"crop {ratio:.3f}", {n: {k: round(v, 2) for k, v in t.items()} for n, t in plain.items()}, flush=True)

    trained = base.input_size
    runs = [str(r) for r in args.runs]
    # Per run: the size validation picks (ties: the smaller, faster one), and its test top-1 against the trained size.
    picked = {}
    for name in [*runs, "soup"]:
        size = max(sizes, key=lambda s: (top1[name][s]["val"], -s))
        picked[name] = {"size": size, "val": top1[name][size]["val"], "test": top1[name][size]["test"],
                        "test_at_trained_size": top1[name][trained]["test"]}  # fmt: skip
    summary = {
        "runs_at_trained_size_test": spread([top1[r][trained]["test"] for r in runs]),
        "runs_at_val_picked_size_test": spread([picked[r]["test"] for r in runs]),
        "soup_at_trained_size": top1["soup"][trained],
        "runs_flip_tta_test": spread([flipped[r]["test"] for r in runs]),
        "runs_flip_tta_val": spread([flipped[r]["val"] for r in runs]),
        "runs_at_trained_size_val": spread([top1[r][trained]["val"] for r in runs]),
    }
    rows = ["| model | " + " | ".join(f"{s} px val / test" for s in sizes) + f" | {trained} px + flip val / test | val picks |"]
    rows.append("|---|" + "---|" * (len(sizes) + 2))
    for name in [*runs, "soup"]:
        cells = " | ".join(f"{top1[name][s]['val']:.2f} / {top1[name][s]['test']:.2f}" for s in sizes)
        label = Path(name).name if name != "soup" else "uniform soup of the runs"
        rows.append(f"| {label} | {cells} | {flipped[name]['val']:.2f} / {flipped[name]['test']:.2f} | {picked[name]['size']} px |")
    ratio_lines: list[str] = []
    if ratios:
        # Ties go to the run's own ratio: a change has to earn its place on validation.
        ratio_picked = {name: max(ratios, key=lambda r, n=name: (by_ratio[n][r]["val"], r == own_ratio)) for name in runs}
        summary["runs_at_val_picked_crop_ratio_test"] = spread([by_ratio[r][ratio_picked[r]]["test"] for r in runs])
        summary["runs_at_val_picked_crop_ratio_val"] = spread([by_ratio[r][ratio_picked[r]]["val"] for r in runs])
        rr = summary["runs_at_val_picked_crop_ratio_test"]
        ratio_lines = ["", f"Centre-crop ratio at {trained} px (input / resized shorter side; the run's own is {own_ratio:.3f}):", "",
                       "| model | " + " | ".join(f"{r:.3f} val / test" for r in ratios) + " | val picks |",
                       "|---|" + "---|" * (len(ratios) + 1)]  # fmt: skip
        for name in runs:
            cells = " | ".join(f"{by_ratio[name][r]['val']:.2f} / {by_ratio[name][r]['test']:.2f}" for r in ratios)
            ratio_lines.append(f"| {Path(name).name} | {cells} | {ratio_picked[name]:.3f} |")
        ratio_lines += ["", f"- Runs at the crop ratio validation picks: test {rr['mean']:.2f}% mean ({rr['min']:.2f}-{rr['max']:.2f}) "
                        f"against {summary['runs_at_trained_size_test']['mean']:.2f}% at the run's own (same latency)."]  # fmt: skip
    s0, s1, sp = summary["runs_at_trained_size_test"], summary["runs_at_val_picked_size_test"], summary["soup_at_trained_size"]
    ft, fv, v0 = summary["runs_flip_tta_test"], summary["runs_flip_tta_val"], summary["runs_at_trained_size_val"]
    markdown = "\n".join([
        f"# Levers without training: weight soup, test-time resolution{', centre-crop ratio' if ratios else ''} and flip "
        f"({ckpts[0]['config']['backbone']}, "
        f"trained at {trained} px)",
        "", "Top-1 (%) on the dataset's val and test folders; each size keeps the run's resize/crop ratio "
        f"({base.resize_size}/{base.input_size}). Selection on validation only.", "", *rows, "",
        f"- Runs at the trained size: test {s0['mean']:.2f}% mean ({s0['min']:.2f}-{s0['max']:.2f}).",
        f"- Runs at the size validation picks: test {s1['mean']:.2f}% mean ({s1['min']:.2f}-{s1['max']:.2f}); "
        "a larger crop costs latency ((size/224)^2 the multiply-adds).",
        f"- Uniform soup at the trained size: val {sp['val']:.2f}%, test {sp['test']:.2f}% "
        "(one model from all the runs, so one figure, not a mean over seeds).",
        f"- Flip test-time augmentation at the trained size (twice the latency): val {fv['mean']:.2f}% mean against "
        f"{v0['mean']:.2f}%, test {ft['mean']:.2f}% mean ({ft['min']:.2f}-{ft['max']:.2f}) against {s0['mean']:.2f}%.",
        *ratio_lines,
    ])  # fmt: skip
    save(args.out, {"runs": runs, "data": args.data, "sizes": sizes, "trained_size": trained, "top1": top1, "picked": picked,
                    "flip_tta_at_trained_size": flipped, "crop_ratios": ratios,
                    "top1_by_crop_ratio": {n: {f"{r:.4f}": v for r, v in t.items()} for n, t in by_ratio.items()},
                    "summary": summary}, markdown)  # fmt: skip


if __name__ == "__main__":
    main()
