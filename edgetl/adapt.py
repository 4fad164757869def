"""`edgetl adapt`: domain adaptation of a trained run to unlabelled images of the domain it is deployed in.

Methods (all start from the trained model; see edgetl.bnalign for why statistics are *aligned* to the
training images' rather than replaced; `shot` is the default, see DEFAULT_METHOD):
- `adabn`: BatchNorm statistics re-estimated on the target images (Li et al. 2016, AdaBN).
- `tent`: AdaBN, plus entropy minimisation of the BatchNorm scale and shift on target batches
  normalised with their own statistics (Wang et al. 2021, Tent).
- `im`: as tent with SHOT's information-maximisation loss (Liang et al. 2020): entropy of each
  prediction minus entropy of the mean prediction, which resists collapsing onto one class.
- `shot`: as im, plus cross-entropy on SHOT's feature-centroid pseudo-labels, recomputed every pass.
- `bn-replace`: AdaBN done literally (target statistics replace the model's), for comparison only.
Tent, im and shot learn the BatchNorm scale and shift (`--train affine`), or with `--train extractor`
every weight of the feature extractor with the head frozen, as the SHOT paper does.
Only the first `--bn-depth` share of the BatchNorm layers (from the input) is aligned; the deeper
ones keep the statistics they were trained with (see AdaptOptions.bn_depth). Tent and IM stop early
and go back one pass when the predicted classes collapse (the entropy of the share of images per
class falls below `COLLAPSE_GUARD` of where it started).

A shift gate comes first (edgetl.shift.shift_gate, `--gate`): target images no further from the
training images than same-size sets of validation images are not adapted to (the new run holds the
model as trained, and says so), since adapting on images that show no shift only adds noise.

With labelled target images (`--labelled`), the adapted model's BatchNorm affine parameters and head
are then fine-tuned on them with cross-entropy (statistics fixed, as deployed).

The result is a new run folder: checkpoint, the parent's recorded splits (for export's parity check,
eval and quantize's validation), the target images used (`target.json`, which int8 calibrates on),
the shift report (metrics.json, shift.png) and the lineage (parent run, parent checkpoint hash).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from edgetl import __version__, checkpoint
from edgetl.bnalign import BatchAlignment, LayerStats, affine_parameters, batchnorm_layers, fold, measuring
from edgetl.data import LabelledSet, relabel, scoring_set, stratified_sample
from edgetl.decoded import DecodedImages, decode_for_scoring, decode_split
from edgetl.errors import EdgetlError
from edgetl.fileio import write_json
from edgetl.hostinfo import host_record
from edgetl.preprocess import PreprocessSpec
from edgetl.progress import Reporter
from edgetl.run import RUN_FORMAT, TARGET, RunFolder, check_new_run_folder, locked
from edgetl.shift import GATE_THRESHOLD, FeatureReference, Outputs, describe, run_model, shift_gate
from edgetl.target import check_shape, list_target_images, require_enough, target_record

METHODS = ("adabn", "tent", "im", "shot", "bn-replace")
TRAINED_METHODS = ("tent", "im", "shot")
# What tent, im and shot learn: the BatchNorm scale and shift (Tent's choice), or the whole feature
# extractor with the head frozen (SHOT's: the head is the source hypothesis the features are pulled to).
# On a few hundred target images the extractor did worse on the validation corruptions (clean -2.2
# points, speckle noise 3 82.8% vs 87.6%; benchmarks/results/adapt_validation_sweep.md): affine is the default.
TRAIN_SCOPES = ("affine", "extractor")
# Under --train extractor, the convolution and other non-BatchNorm weights learn at this share of --lr:
# Adam moves every weight by about lr per step whatever its scale, and a convolution weight is
# typically ~0.05 against a BatchNorm scale's ~1 (SHOT likewise trains its backbone at 0.1x its lr).
EXTRACTOR_LR_SCALE = 0.1
# SHOT (Liang et al. 2020): weight of the cross-entropy on the centroid pseudo-labels beside information maximisation.
SHOT_BETA = 0.3
# Chosen by benchmarks/adapt_corruptions.py on the measure, the mean share of the lost accuracy
# won back over the corruptions that cost accuracy at severity 3: over three seeds shot 44%, tent 39%
# (adabn 33% over two; benchmarks/results/adapt_methods_seeds.md). shot wins on the blurs and pixelation,
# tent on some noises. Both cost about 2.7x adabn's time.
DEFAULT_METHOD = "shot"
SHIFT_PLOT = "shift.png"
COLLAPSE_GUARD = 0.8


@dataclass(frozen=True)
class AdaptOptions:
    method: str = DEFAULT_METHOD
    out: str | None = None
    labelled: str | None = None  # class folders of labelled target images: fine-tune on them after adapting
    evaluate: str | None = None  # class folders of labelled target images to score before/after (never adapted on)
    batch_size: int = 32
    lr: float = 1e-3  # Adam, for tent / im / the labelled fine-tune
    epochs: int = 1  # passes over the target images for tent / im
    train: str = "affine"  # what tent / im / shot learn: one of TRAIN_SCOPES
    # Share of the BatchNorm layers, from the input, that are aligned. Not all: corruptions (noise, blur,
    # contrast, fog, compression) shift low-level statistics, while those of the deep layers depend on which
    # classes the target images show and, measured on a few hundred images, mostly add noise. On
    # clothing-small, aligning every layer cost 2.7 points on clean images (benchmarks/adapt_corruptions.py).
    bn_depth: float = 0.5
    # >0: the entropy term counts only target images whose prediction entropy is below this share of ln(classes)
    # (EATA, Niu et al. ICML 2022, and SAR, ICLR 2023, use 0.4): high-entropy images carry unreliable gradients,
    # which on heavy noise pull the features towards whatever the model half-guesses. 0: every image counts.
    # Off by default: with shot at 0.4 on the validation corruptions it won back less on noise (speckle 3: 85.5 vs
    # 86.0%, speckle 5: 76.3 vs 78.5%) and on heavy blur (70.4 vs 73.1%) (benchmarks/results/adapt_validation_sweep.md).
    reliable_entropy: float = 0.0
    # shot: cluster the mean features and probabilities of each image and its mirror image, so a pseudo-label
    # does not hang on one view (garments, products and most scenes read the same mirrored). Off by default: on the
    # validation corruptions it matched the default on four of six and won back less on heavy speckle noise
    # (77.4 vs 78.5%; benchmarks/results/adapt_validation_sweep.md): noise moves both views alike.
    pseudo_flip: bool = False
    labelled_steps: int = 100
    source_images: int = 512  # training images the source statistics are measured on
    # Adapt only when the target's feature shift exceeds same-size validation images' by at least this many
    # times the in-domain shift (edgetl.shift.shift_gate); 0 adapts always.
    gate: float = GATE_THRESHOLD
    seed: int = 0
    device: str = "auto"
    allow_shape_change: bool = False
    allow_data_change: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise EdgetlError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.train not in TRAIN_SCOPES:
            raise EdgetlError(f"--train must be one of {', '.join(TRAIN_SCOPES)}, got {self.train!r}")
        if self.train != "affine" and self.method not in TRAINED_METHODS:
            raise EdgetlError(f"--train {self.train} applies to {', '.join(TRAINED_METHODS)}; {self.method} learns no weights")
        if self.batch_size < 16:
            raise EdgetlError("--batch-size must be at least 16: batch statistics of fewer images are too noisy to adapt on")
        if not 0 <= self.reliable_entropy <= 1:
            raise EdgetlError(f"--reliable-entropy is a share of ln(classes), in [0, 1] (0: off), got {self.reliable_entropy}")
        if self.pseudo_flip and self.method != "shot":
            raise EdgetlError(f"--pseudo-flip applies to shot's pseudo-labels; {self.method} makes none")
        if not 0 < self.bn_depth <= 1:
            raise EdgetlError(f"--bn-depth is a share of the BatchNorm layers, in (0, 1], got {self.bn_depth}")
        if not self.gate >= 0:  # also refuses nan, which would shut the gate on everything
            raise EdgetlError(f"--gate is the excess feature shift that opens the shift gate, >= 0 (0: always adapt); got {self.gate}")
        for name in ("lr", "epochs", "labelled_steps", "source_images"):
            if not getattr(self, name) > 0:  # also refuses nan
                raise EdgetlError(f"--{name.replace('_', '-')} must be positive")
        if not math.isfinite(self.lr):
            raise EdgetlError(f"--lr must be finite, got {self.lr}")


@dataclass
class Source:
    """What the trained model saw on its training images: BatchNorm input statistics, pooled
    features, and the class prior."""

    stats: LayerStats
    features: FeatureReference
    prior: np.ndarray


def measure_source(model: nn.Module, images: DecodedImages, spec: PreprocessSpec, device: torch.device,
                   prior: np.ndarray, batch_size: int = 64) -> Source:  # fmt: skip
    with measuring(model) as acc:
        out = run_model(model, images, spec, device, batch_size)
    return Source(LayerStats.of(acc), FeatureReference.of(out.features), prior)


# ----------------------------------------------------------------------------- methods


def _batches(n: int, batch_size: int, rng: np.random.Generator | None = None) -> list[list[int]]:
    """Index batches of near-equal size (no runt last batch: its statistics would be noise), shuffled with `rng`."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [chunk.tolist() for chunk in np.array_split(order, max(1, round(n / batch_size)))]


def _loader(images: DecodedImages, spec: PreprocessSpec, batches: list[list[int]]) -> DataLoader:
    from edgetl.train import EvalImages

    return DataLoader(EvalImages(images, spec), batch_sampler=batches)


@torch.no_grad()
def _aligned_pass(model: nn.Module, align: BatchAlignment, images: DecodedImages, spec: PreprocessSpec,
                  device: torch.device, batch_size: int) -> np.ndarray:  # fmt: skip
    """One pass over the target images with batch alignment on; returns the predicted classes."""
    align.reset()
    align.recording = True
    preds = [model(x.to(device)).argmax(1).cpu().numpy() for x, _ in _loader(images, spec, _batches(len(images), batch_size))]
    return np.concatenate(preds)


@torch.no_grad()
def shot_pseudo_labels(model: nn.Module, align: BatchAlignment, images: DecodedImages, spec: PreprocessSpec,
                       device: torch.device, batch_size: int, flip: bool = False) -> np.ndarray:  # fmt: skip
    """SHOT's self-supervised pseudo-labels (Liang et al. 2020, eq. 4-6), from one aligned pass: class
    centroids of the L2-normalised pooled features weighted by the predicted probabilities, each image
    labelled by its nearest centroid (cosine), then the centroids of those labels and the nearest once
    more. Clusters in feature space correct confident mistakes that entropy minimisation would reinforce.
    With `flip`, each image's features and probabilities are the mean over it and its mirror image."""
    align.reset()
    align.recording = True
    feats, probs = [], []
    for x, _ in _loader(images, spec, _batches(len(images), batch_size)):
        x = x.to(device)
        f = model.backbone(x)
        p = torch.softmax(model.head(f).float(), 1)
        if flip:
            align.recording = False  # the mirrored batch is aligned like any batch, but measured once is enough
            f_m = model.backbone(x.flip(-1))
            align.recording = True
            f, p = (f + f_m) / 2, (p + torch.softmax(model.head(f_m).float(), 1)) / 2
        probs.append(p.cpu())
        feats.append(f.float().cpu())
    return centroid_labels(torch.cat(feats), torch.cat(probs))


def centroid_labels(features: torch.Tensor, probs: torch.Tensor) -> np.ndarray:
    """SHOT's two clustering steps on (N, D) features and (N, C) predicted probabilities."""
    f = torch.nn.functional.normalize(torch.cat([features, torch.ones(len(features), 1)], 1), dim=1)  # SHOT appends a 1
    p = probs
    centroids = (p.T @ f) / p.sum(0)[:, None].clamp_min(1e-8)
    labels = (f @ torch.nn.functional.normalize(centroids, dim=1).T).argmax(1)
    onehot = torch.nn.functional.one_hot(labels, p.shape[1]).float()
    centroids = (onehot.T @ f) / onehot.sum(0)[:, None].clamp_min(1e-8)
    return (f @ torch.nn.functional.normalize(centroids, dim=1).T).argmax(1).numpy()


def _share_entropy(pred: np.ndarray, num_classes: int) -> float:
    p = np.bincount(pred, minlength=num_classes) / max(len(pred), 1)
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


def mean_entropy(probs: torch.Tensor, reliable_share: float = 0.0) -> torch.Tensor:
    """Mean prediction entropy of a batch; with `reliable_share` > 0, over the images whose entropy is below
    that share of ln(classes) only (0 when none is), as EATA and SAR filter their entropy loss."""
    per_image = -(probs * torch.log(probs.clamp_min(1e-12))).sum(1)
    if reliable_share <= 0:
        return per_image.mean()
    reliable = per_image.detach() < reliable_share * float(np.log(probs.shape[1]))
    return (per_image * reliable).sum() / reliable.sum().clamp_min(1)


def trained_parameter_groups(model: nn.Module, scope: str, lr: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups for `scope` (see TRAIN_SCOPES); the head is never trained here."""
    affine = list(affine_parameters(model))
    groups: list[dict[str, Any]] = [{"params": affine, "lr": lr}]
    if scope == "extractor":
        seen = {id(p) for p in affine}
        rest = [p for p in model.backbone.parameters() if id(p) not in seen]
        groups.append({"params": rest, "lr": lr * EXTRACTOR_LR_SCALE})
    return groups


def _entropy_training(model: nn.Module, align: BatchAlignment, images: DecodedImages, spec: PreprocessSpec,
                      device: torch.device, opts: AdaptOptions, num_classes: int, reporter: Reporter) -> dict[str, Any]:  # fmt: skip
    """Tent, IM or SHOT's objective on target batches, learning the BatchNorm affine parameters or the
    whole feature extractor (`opts.train`); go back one pass on collapse."""
    groups = trained_parameter_groups(model, opts.train, opts.lr)
    params = [p for g in groups for p in g["params"]]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    rng = np.random.default_rng(opts.seed)
    start = _share_entropy(_aligned_pass(model, align, images, spec, device, opts.batch_size), num_classes)
    saved = [p.detach().clone() for p in params]
    log: list[dict[str, float]] = []
    stopped = None
    steps = 0
    with reporter.task(f"{opts.method}: {opts.epochs} pass(es) over {len(images)} target images", opts.epochs * len(images)) as advance:
        for epoch in range(1, opts.epochs + 1):
            losses = []
            pseudo = None
            if opts.method == "shot":  # recomputed at the start of every pass, as in the paper
                pseudo = torch.from_numpy(shot_pseudo_labels(model, align, images, spec, device, opts.batch_size, opts.pseudo_flip))
            align.recording = False
            batches = _batches(len(images), opts.batch_size, rng)
            for idx, (x, _) in zip(batches, _loader(images, spec, batches), strict=True):
                logits = model(x.to(device))
                p = torch.softmax(logits, 1)
                loss = entropy = mean_entropy(p, opts.reliable_entropy)
                if opts.method in ("im", "shot"):
                    mean_p = p.mean(0)
                    loss = entropy + (mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
                if pseudo is not None:
                    loss = loss + SHOT_BETA * torch.nn.functional.cross_entropy(logits, pseudo[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                steps += 1
                advance(len(x))
            diversity = _share_entropy(_aligned_pass(model, align, images, spec, device, opts.batch_size), num_classes)
            log.append({"epoch": epoch, "loss": float(np.mean(losses)), "class_share_entropy": diversity})
            if diversity < COLLAPSE_GUARD * start:
                with torch.no_grad():
                    for p, s in zip(params, saved, strict=True):
                        p.copy_(s)
                stopped = (f"pass {epoch}: the predicted classes were collapsing (share entropy {diversity:.2f} < "
                           f"{COLLAPSE_GUARD} x {start:.2f}); kept the parameters of the pass before")  # fmt: skip
                reporter.warn(stopped, label=opts.method)
                break
            saved = [p.detach().clone() for p in params]
    model.requires_grad_(False)
    return {"optimizer": "Adam", "lr": opts.lr, "trained": opts.train, "parameters": sum(p.numel() for p in params),
            "batch_size": opts.batch_size, "reliable_entropy": opts.reliable_entropy, "pseudo_flip": opts.pseudo_flip,
            "passes": log, "steps": steps,
            "start_class_share_entropy": start, "stopped": stopped}  # fmt: skip


@torch.no_grad()
def _replace_statistics(model: nn.Module, images: DecodedImages, spec: PreprocessSpec, device: torch.device, batch_size: int) -> None:
    """Literal AdaBN: each BatchNorm's running statistics become the target's (cumulative average over batches)."""
    layers = list(batchnorm_layers(model).values())
    momenta = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for x, _ in _loader(images, spec, _batches(len(images), batch_size)):
        model(x.to(device))
    for bn, momentum in zip(layers, momenta, strict=True):
        bn.momentum = momentum
    model.eval()


def adapt_model(model: nn.Module, source: Source, target: DecodedImages, spec: PreprocessSpec, device: torch.device,
                opts: AdaptOptions, reporter: Reporter | None = None) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """A copy of `model` adapted to the target images by `opts.method`; returns it and what was done."""
    reporter = reporter or Reporter(quiet=True)
    model = copy.deepcopy(model).to(device).eval()
    record: dict[str, Any] = {"method": opts.method, "target_images": len(target)}
    torch.manual_seed(opts.seed)
    if opts.method == "bn-replace":
        _replace_statistics(model, target, spec, device, opts.batch_size)
        return model, record
    align = BatchAlignment(model, source.stats, opts.bn_depth)
    with align:
        if opts.method in TRAINED_METHODS:
            record["training"] = _entropy_training(model, align, target, spec, device, opts, len(source.prior), reporter)
        # The statistics the model keeps are those of a pass with its final parameters: tent's last collapse
        # check was that pass, unless it undid the pass (then the parameters are the ones before it).
        if opts.method not in TRAINED_METHODS or record["training"]["stopped"]:
            _aligned_pass(model, align, target, spec, device, opts.batch_size)
    record["channels_aligned"] = fold(model, source.stats, align.target_stats())
    return model.eval(), record


def gated_adapt(model: nn.Module, source: Source, target: DecodedImages, target_features: np.ndarray, in_domain_features: np.ndarray,
                spec: PreprocessSpec, device: torch.device, opts: AdaptOptions,
                reporter: Reporter | None = None) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """adapt_model behind the shift gate: when the target images are no further from the training images
    than same-size sets of in-domain (validation) images, a copy of the model as trained, and the record says why."""
    gate = shift_gate(source.features, target_features, in_domain_features, opts.gate, opts.seed)
    if gate["open"]:
        adapted, record = adapt_model(model, source, target, spec, device, opts, reporter)
        return adapted, {**record, "adapted": True, "gate": gate}
    return copy.deepcopy(model).to(device).eval(), {"method": opts.method, "target_images": len(target), "adapted": False, "gate": gate}


def finetune_labelled(model: nn.Module, images: DecodedImages, spec: PreprocessSpec, device: torch.device,
                      opts: AdaptOptions, reporter: Reporter | None = None) -> dict[str, Any]:  # fmt: skip
    """Cross-entropy on labelled target images, in place: BatchNorm affine parameters and the head learn,
    statistics stay as adapted (what is trained is what is deployed). Light augmentation; no
    validation split exists at a few images per class, so a fixed number of steps."""
    from edgetl.model import set_train_mode
    from edgetl.train import AugmentedImages, train_transform

    reporter = reporter or Reporter(quiet=True)
    params = [*affine_parameters(model), *model.head.parameters()]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=1e-4)
    data = AugmentedImages(images, spec, train_transform(spec, "light", 0.5))
    gen = torch.Generator().manual_seed(opts.seed)
    loader = DataLoader(data, batch_size=min(opts.batch_size, len(data)), shuffle=True, generator=gen)
    set_train_mode(model)
    step, losses = 0, []
    with reporter.task(f"fine-tuning on {len(images)} labelled target images", opts.labelled_steps) as advance:
        while step < opts.labelled_steps:
            for x, y in loader:
                loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device), label_smoothing=0.1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                step += 1
                advance(1)
                if step >= opts.labelled_steps:
                    break
    model.requires_grad_(False)
    model.eval()
    return {"images": len(images), "steps": step, "lr": opts.lr, "final_loss": float(np.mean(losses[-10:]))}


# ----------------------------------------------------------------------------- the command


@dataclass
class _Sets:
    """Decoded images the command scores or adapts on."""

    source: DecodedImages
    val: DecodedImages
    target: DecodedImages
    evaluate: DecodedImages | None = None
    labelled: DecodedImages | None = None
    skipped: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def close(self) -> None:
        for images in (self.source, self.val, self.target, self.evaluate, self.labelled):
            if images is not None:
                images.close()


def default_out(parent: Path, method: str) -> Path:
    base = parent.parent / f"{parent.name}-{method}"
    out, n = base, 2
    while out.exists():
        out, n = base.with_name(f"{base.name}-{n}"), n + 1
    return out


def _labelled_set(folder: str, labels: list[str], what: str) -> tuple[LabelledSet, str]:
    ls, classes, source, _ = scoring_set(folder)
    return relabel(ls, classes, labels, f"{what} {folder}"), source


def _load_sets(parent: RunFolder, target_ls: LabelledSet, target_root: Path, labels: list[str], spec: PreprocessSpec,
               opts: AdaptOptions, reporter: Reporter) -> tuple[_Sets, np.ndarray]:  # fmt: skip
    ds = parent.dataset(allow_changed=opts.allow_data_change, reporter=reporter)
    train = relabel(ds.train, ds.classes, labels, "recorded training split")
    prior = np.bincount(train.labels, minlength=len(labels)) / max(len(train), 1)
    rng = np.random.default_rng(opts.seed)
    if not opts.allow_shape_change:
        check_shape(target_ls, train, target_root)
    source_ls = train.subset(stratified_sample(train.labels, min(opts.source_images, len(train)), rng))
    val_ls = relabel(ds.val, ds.classes, labels, "recorded validation split")
    if len(val_ls) > 1000:
        val_ls = val_ls.subset(stratified_sample(val_ls.labels, 1000, rng))
    decoded: list[DecodedImages] = []
    skipped: dict[str, list[dict[str, str]]] = {}

    def decode(name: str, ls: LabelledSet, source: str, crop_scale: float | None = None) -> DecodedImages:
        if crop_scale is None:
            images, failed = decode_for_scoring(ls, spec, reporter, source)
        else:  # training images: kept large enough for random crops
            with reporter.task(f"decoding {len(ls)} images from {source}", len(ls)) as advance:
                images, failed = decode_split(ls, spec, crop_scale=crop_scale, name=name, progress=advance)
        decoded.append(images)
        if len(images) == 0:
            raise EdgetlError(f"no readable images in {source}")
        skipped[name] = failed
        return images

    try:
        src = decode("source", source_ls, f"{ds.root} (recorded training split)")
        val = decode("val", val_ls, f"{ds.root} (recorded validation split)")
        target = decode("target", target_ls, str(target_root))
        require_enough(len(target), target_root)
        evaluate = labelled = None
        if opts.evaluate:
            evaluate = decode("evaluate", *_labelled_set(opts.evaluate, labels, "--evaluate"))
        if opts.labelled:
            labelled = decode("labelled", *_labelled_set(opts.labelled, labels, "--labelled"), crop_scale=0.5)
    except BaseException:
        for images in decoded:
            images.close()
        raise
    return _Sets(src, val, target, evaluate, labelled, skipped), prior


def adapt_run(run: str | os.PathLike[str], target_dir: str | os.PathLike[str], opts: AdaptOptions,
              reporter: Reporter | None = None) -> dict[str, Any]:  # fmt: skip
    """Adapt `run` to the images in `target_dir`; write and return the new run's metrics (with its path)."""
    from edgetl.train import pick_device

    reporter = reporter or Reporter()
    started = time.perf_counter()
    parent = RunFolder.open(run)
    ckpt = parent.checkpoint()
    parent_sha = parent.checkpoint_sha256
    labels, spec = list(ckpt["config"]["labels"]), checkpoint.spec_of(ckpt)
    target_root = Path(target_dir)
    target_ls, nested = list_target_images(target_root)
    require_enough(len(target_ls), target_root)
    if nested:
        reporter.log(f"{target_root} has subfolders: all {len(target_ls)} images are used, their folder names (labels) are not")
    out = Path(opts.out) if opts.out else default_out(parent.path, opts.method)
    if out.resolve() == parent.path.resolve():
        raise EdgetlError("--out is the run being adapted: an adapted model is a new run; choose another folder")
    created = not out.exists()
    check_new_run_folder(out)
    try:
        with locked(out, "adapt"):
            sets, prior = _load_sets(parent, target_ls, target_root, labels, spec, opts, reporter)
            try:
                metrics, model, source = _adapt(parent, ckpt, sets, prior, labels, spec, pick_device(opts.device), opts, reporter)
            finally:
                sets.close()
            metrics["seconds"] = time.perf_counter() - started
            _write_run(out, parent, parent_sha, ckpt, model, source.stats, metrics, sets, target_root, labels, opts)
    except BaseException:
        if created:  # nothing half-made is left behind: the folder was ours and holds no finished run
            shutil.rmtree(out, ignore_errors=True)
        raise
    return {**metrics, "run_dir": str(out)}


def _adapt(parent: RunFolder, ckpt: dict[str, Any], sets: _Sets, prior: np.ndarray, labels: list[str],
           spec: PreprocessSpec, device: torch.device, opts: AdaptOptions,
           reporter: Reporter) -> tuple[dict[str, Any], nn.Module, Source]:  # fmt: skip
    model = checkpoint.build_model(ckpt).to(device)
    reporter.log(f"measuring the trained model on {len(sets.source)} training images")
    source = measure_source(model, sets.source, spec, device, prior)
    scored = {"val": (sets.val, sets.val.labels), "target": (sets.target, None)}
    if sets.evaluate is not None:
        scored["evaluate"] = (sets.evaluate, sets.evaluate.labels)
    before_out = {k: run_model(model, imgs, spec, device) for k, (imgs, _) in scored.items()}
    before = {k: describe(before_out[k], source.features, prior, scored[k][1]) for k in scored}
    reporter.log(f"adapting with {opts.method} on {len(sets.target)} target images")
    adapted, record = gated_adapt(model, source, sets.target, before_out["target"].features, before_out["val"].features,
                                  spec, device, opts, reporter)  # fmt: skip
    if not record["adapted"]:
        kept = "then fine-tuned on the labelled images" if sets.labelled is not None else "holds the model as trained"
        reporter.warn(f"{record['gate']['reason']} - the target images look like the training domain, where "
                      f"adapting only adds noise; the new run {kept} (--gate 0 adapts anyway)", label="not adapted")  # fmt: skip
    elif record["gate"]["excess"] is None:
        reporter.warn(record["gate"]["reason"], label="shift gate")
    if sets.labelled is not None:
        record["labelled"] = finetune_labelled(adapted, sets.labelled, spec, device, opts, reporter)
    after_out: dict[str, Outputs] = before_out  # the gate kept the model as trained: its outputs are known
    if record["adapted"] or sets.labelled is not None:
        after_out = {k: run_model(adapted, imgs, spec, device) for k, (imgs, _) in scored.items()}
    after = {k: describe(after_out[k], source.features, prior, scored[k][1]) for k in scored}
    from edgetl.metrics import classification_metrics, cross_entropy

    val_logits = after_out["val"].logits
    shift = {"prior": prior.round(4).tolist(), "before": before["target"], "after": after["target"],
             "in_domain_feature_shift": before["val"]["feature_shift"]}  # fmt: skip
    if "evaluate" in before:
        shift["before"]["top1"], shift["after"]["top1"] = before["evaluate"]["top1"], after["evaluate"]["top1"]
    metrics: dict[str, Any] = {
        "split": "val",
        "adaptation": record,
        "shift": shift,
        "source_val": {"before_top1": before["val"]["top1"], "after_top1": after["val"]["top1"]},
        "best": {"stage": "adapt", "epoch": 0, "val_loss": cross_entropy(val_logits, sets.val.labels),
                 **classification_metrics(val_logits, sets.val.labels, labels)},
    }  # fmt: skip
    if sets.evaluate is not None:
        metrics["evaluate"] = {"data": opts.evaluate, "images": len(sets.evaluate), "before_top1": before["evaluate"]["top1"],
                               "after_top1": after["evaluate"]["top1"]}  # fmt: skip
    return metrics, adapted.cpu(), source


def _write_run(out: Path, parent: RunFolder, parent_sha: str, ckpt: dict[str, Any], model: nn.Module, source_stats: LayerStats,
               metrics: dict[str, Any], sets: _Sets, target_root: Path, labels: list[str], opts: AdaptOptions) -> None:  # fmt: skip
    from edgetl.plots import plot_shift
    from edgetl.run import CHECKPOINT, MANIFEST, METRICS, SPLITS

    lineage = {"parent_run": str(parent.path.resolve()), "parent_checkpoint_sha256": parent_sha, "method": opts.method,
               "adapted": metrics["adaptation"]["adapted"],
               "target": {"root": str(target_root.resolve()), "images": len(sets.target)},
               "labelled": opts.labelled and {"root": str(Path(opts.labelled).resolve()), "images": len(sets.labelled or [])}}  # fmt: skip
    best = metrics["best"]
    checkpoint.save(out / CHECKPOINT, {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "config": ckpt["config"],
        "stage": "adapt", "epoch": 0, "val_loss": best["val_loss"], "val_top1": best["top1"], "lineage": lineage,
        "source_bn_stats": source_stats.state(),
    })  # fmt: skip
    vectors = parent.split_record().get("train_vectors")
    if vectors is not None:  # the same training images: their recorded thumbnails come along (edgetl eval reads them)
        shutil.copyfile(parent.path / vectors["file"], out / vectors["file"])
    write_json(out / SPLITS, parent.split_record())
    target = target_record(target_root, LabelledSet(sets.target.refs, sets.target.labels), sets.skipped.get("target", []))
    write_json(out / TARGET, target)
    lineage["target"]["fingerprint"] = target["fingerprint"]
    write_json(out / METRICS, metrics)
    plot_shift(metrics["shift"], labels, out / SHIFT_PLOT)
    man = parent.manifest
    write_json(out / MANIFEST, {
        "format": RUN_FORMAT, "edgetl_version": __version__, "status": "finished",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "seed": opts.seed, "config": man.get("config"), "dataset": man.get("dataset"), "weights_source": man.get("weights_source"),
        "lineage": lineage, "adapt_options": asdict(opts),
        "skipped_files": [s for v in sets.skipped.values() for s in v],
        "timings": {"adapt_seconds": metrics["seconds"]}, "host": host_record(),
    })  # fmt: skip
