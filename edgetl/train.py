"""Two-stage transfer learning.

Stage 1 trains a new head on a frozen ImageNet backbone. The frozen base gives the same features
every epoch, so by default it runs once over the data and the head trains on cached features:
one forward pass over the data instead of one per epoch.
Stage 2 unfreezes the top blocks and fine-tunes them with the head at a lower learning rate, with
augmentation, BatchNorm statistics kept, warm-up + cosine decay and early stopping on validation
loss. The best checkpoint (lowest validation loss over both stages) is what the run keeps.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from edgetl import __version__, checkpoint
from edgetl.backbones import get_entry, load_pretrained, preprocess_spec
from edgetl.config import TrainConfig
from edgetl.data import DecodedImages, check_after_skips, decode_split, load_dataset
from edgetl.errors import EdgetlError, TrainingInterrupted
from edgetl.fileio import write_csv, write_json
from edgetl.hostinfo import has_bf16, host_record
from edgetl.malloc_tuning import tune_malloc
from edgetl.metrics import classification_metrics
from edgetl.model import (
    HeadConfig,
    build_classifier,
    feature_dim,
    freeze_backbone,
    param_groups,
    set_train_mode,
    trainable_parameters,
    unfreeze_top,
)
from edgetl.preprocess import PreprocessSpec, preprocess
from edgetl.progress import Reporter

FEATURE_CACHE_IN_MEMORY_LIMIT = 2 << 30  # larger feature caches go to a memory-mapped file in the run folder


# ----------------------------------------------------------------------------- datasets for torch


class EvalImages(Dataset):
    """Decoded images through the model's evaluation preprocessing (the one export and runtime use)."""

    def __init__(self, images: DecodedImages, spec: PreprocessSpec) -> None:
        self.images, self.spec = images, spec

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(preprocess(self.images.get(i), self.spec)), int(self.images.labels[i])


class AugmentedImages(EvalImages):
    def __init__(self, images: DecodedImages, spec: PreprocessSpec, transform: Any) -> None:
        super().__init__(images, spec)
        self.transform = transform

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images.get(i)), int(self.images.labels[i])


def train_transform(spec: PreprocessSpec, policy: str, crop_scale: float = 0.35) -> Any:
    """Training augmentation with torchvision.transforms.v2; `none` is the evaluation preprocessing."""
    from torchvision.transforms import InterpolationMode, v2

    if policy == "none":
        return lambda img: torch.from_numpy(preprocess(img, spec))
    interp = InterpolationMode(spec.interpolation)
    steps: list[Any] = [
        # Milder than ImageNet's (0.08, 1) by default: with a few hundred images, crops must still show the object.
        v2.RandomResizedCrop(spec.input_size, scale=(crop_scale, 1.0), interpolation=interp, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if policy == "light":
        steps.append(v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2))
    elif policy == "trivial":
        steps.append(v2.TrivialAugmentWide(interpolation=interp))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]
    return v2.Compose(steps)


# ----------------------------------------------------------------------------- devices and precision


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EdgetlError("--device cuda asked for, but no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast when asked, or on `auto` where the hardware has native bf16 arithmetic."""
    if precision == "fp32":
        return False
    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else has_bf16()
    if precision == "bf16" and not supported:
        raise EdgetlError(f"--precision bf16: this {device.type.upper()} has no native bf16 support; use fp32 or auto")
    return supported


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def default_workers() -> int:
    # On 2 cores, data-loading workers would fight the math kernels for the same cores.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 2 else min(8, cores // 2)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: DecodedImages,
    spec: PreprocessSpec,
    device: torch.device,
    batch_size: int = 32,
    workers: int = 0,
    channels_last: bool = False,
    reporter: Reporter | None = None,
    description: str = "evaluating",
) -> np.ndarray:
    """fp32 logits of `model` on every image, with the evaluation preprocessing."""
    model.eval()
    loader = DataLoader(EvalImages(images, spec), batch_size=batch_size, shuffle=False, num_workers=workers)
    out = []
    with (reporter or Reporter(quiet=True)).task(description, len(images)) as advance:
        for x, _ in loader:
            x = x.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(model(x).float().cpu().numpy())
            advance(len(x))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


# ----------------------------------------------------------------------------- the run folder


def new_run_dir(out: str | None, name: str | None, dataset_name: str, backbone: str) -> Path:
    if out is not None:
        run = Path(out)
        if (run / checkpoint.BEST_NAME).exists() or (run / checkpoint.LAST_NAME).exists():
            raise EdgetlError(f"{run} already holds a run: use --resume {run} to continue it, or another --out")
        return run
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", name or f"{dataset_name}-{backbone}").strip("-") or "run"
    run = Path("models") / base
    i = 2
    while run.exists() and any(run.iterdir()):
        run = Path("models") / f"{base}-{i}"
        i += 1
    return run


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]


# ----------------------------------------------------------------------------- training


class Trainer:
    def __init__(self, cfg: TrainConfig, data: str, run_dir: Path, reporter: Reporter) -> None:
        self.cfg, self.data_path, self.run_dir, self.r = cfg, data, run_dir, reporter
        self.device = pick_device(cfg.device)
        self.bf16 = use_bf16(cfg.precision, self.device)
        self.workers = cfg.workers if cfg.workers is not None else default_workers()
        self.history: list[dict[str, Any]] = []
        self.timings: dict[str, dict[str, float]] = {}
        self.best_val_loss = math.inf
        self.best: dict[str, Any] = {}
        self.skipped: list[dict[str, str]] = []

    # -- set-up -------------------------------------------------------------------------------

    def prepare(self, weights_source: str | None = None) -> None:
        """Read and decode the data and build the model. `weights_source` given (a resume): the weights
        come from a checkpoint right after, so the ImageNet file is neither read nor required."""
        cfg, r = self.cfg, self.r
        get_entry(cfg.backbone)  # unknown names fail before any data is read
        self.dataset = load_dataset(self.data_path, cfg.val_fraction, cfg.seed, cfg.limit_train, cfg.limit_val)
        ds = self.dataset
        self.classes = ds.classes
        self.spec = preprocess_spec(cfg.backbone, cfg.input_size)
        r.log(
            f"data: {ds.root} ({ds.kind}), {len(ds.classes)} classes, train {len(ds.train)}, val {len(ds.val)}"
            f"{f', test {len(ds.test)} (not used for training)' if ds.test is not None else ''}; {ds.split_note}"
        )
        decoded = {}
        for split, ls in (("train", ds.train), ("val", ds.val)):
            with r.task(f"decoding {split}", len(ls)) as advance:
                decoded[split], failed = decode_split(ls, self.spec, progress=advance)
            for f in failed:
                f["split"] = split
            self.skipped += failed
        if self.skipped:
            listing = "; ".join(f"{f['file']} ({f['reason']})" for f in self.skipped[:5])
            more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            if self.cfg.strict:
                raise EdgetlError(f"{len(self.skipped)} unreadable image(s) and --strict: {listing}{more}")
            r.log(f"[yellow]warning:[/] skipped {len(self.skipped)} unreadable image(s): {listing}{more} (listed in manifest.json)")
        for split in ("train", "val"):
            check_after_skips(self.classes, split, decoded[split].labels)
        self.train_images, self.val_images = decoded["train"], decoded["val"]
        seed_everything(cfg.seed)
        self.model = build_classifier(cfg.backbone, len(self.classes), cfg.hidden, cfg.dropout)
        if weights_source is not None:
            self.weights_source = weights_source
        elif cfg.pretrained:
            self.weights_source = load_pretrained(self.model.backbone, cfg.backbone, cfg.weights, r.log)
        else:
            self.weights_source = "none (--no-pretrained: random initialisation)"
            r.log("[yellow]warning:[/] --no-pretrained: the backbone starts from random weights")
        r.log(f"backbone: {cfg.backbone}, weights from {self.weights_source}")
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        counts = np.bincount(self.train_images.labels, minlength=len(self.classes)).astype(np.float64)
        weights = counts.sum() / (len(counts) * np.maximum(counts, 1)) if cfg.balance else np.ones_like(counts)
        self.class_weights = torch.tensor(weights, dtype=torch.float32, device=self.device)

    def criterion(self, smoothing: bool = True) -> nn.Module:
        return nn.CrossEntropyLoss(
            weight=self.class_weights, label_smoothing=self.cfg.label_smoothing if smoothing else 0.0
        )

    def val_loss(self, logits: np.ndarray) -> float:
        """Validation loss for model selection: cross-entropy without label smoothing (class-weighted
        with --balance), so both stages are compared on the same scale."""
        with torch.no_grad():
            return float(self.criterion(smoothing=False)(torch.from_numpy(logits).to(self.device),
                                                         torch.from_numpy(self.val_images.labels).to(self.device)))

    # -- checkpoints -------------------------------------------------------------------------

    def resolved_config(self) -> dict[str, Any]:
        entry = get_entry(self.cfg.backbone)
        return {
            "backbone": self.cfg.backbone,
            "timm_id": entry.timm_id,
            "preprocess": self.spec.to_dict(),
            "labels": list(self.classes),
            "head": HeadConfig(feature_dim(self.model.backbone), len(self.classes), self.cfg.hidden, self.cfg.dropout).to_dict(),
            "train": self.cfg.to_dict(),
            "data": str(Path(self.data_path).resolve()),
            "weights_source": self.weights_source,
            "edgetl_version": __version__,
        }

    def save_best(self, stage: str, epoch: int, val_loss: float, val_logits: np.ndarray, model: nn.Module | None = None) -> None:
        """Keep `model` (default: the one being trained; with --ema-decay, its weight average) as the best."""
        self.best_val_loss = val_loss
        self.best = {"stage": stage, "epoch": epoch, "val_loss": val_loss, "val_logits": val_logits}
        state = {k: v.detach().cpu().clone() for k, v in (model or self.model).state_dict().items()}
        checkpoint.save(
            self.run_dir / checkpoint.BEST_NAME,
            {"state_dict": state, "config": self.resolved_config(), "stage": stage, "epoch": epoch, "val_loss": val_loss},
        )

    def save_last(self, stage: str, epoch: int, extra: dict[str, Any]) -> None:
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        checkpoint.save(
            self.run_dir / checkpoint.LAST_NAME,
            {
                "state_dict": state, "config": self.resolved_config(), "stage": stage, "epoch": epoch,
                "history": self.history, "best_val_loss": self.best_val_loss,
                "best_stage": self.best.get("stage"), "best_epoch": self.best.get("epoch"), **extra,
            },
        )  # fmt: skip

    def record(self, row: dict[str, Any]) -> None:
        row["global_epoch"] = len(self.history) + 1
        self.history.append(row)
        write_csv(self.run_dir / "history.csv", self.history)
        r = row
        self.r.log(
            f"{r['stage']:>8} epoch {r['epoch']:>3}: train loss {r['train_loss']:.4f}  val loss {r['val_loss']:.4f}  "
            f"val top-1 {r['val_top1']:.2%}  lr {r['lr']:.2e}  {r['seconds']:.1f}s{'  *best' if r.get('best') else ''}"
        )

    # -- stage 1 -----------------------------------------------------------------------------

    @torch.no_grad()
    def extract_features(self, images: DecodedImages, views: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Backbone features of every image: view 0 with evaluation preprocessing, the others augmented."""
        n, dim = len(images), feature_dim(self.model.backbone)
        shape = (n * views, dim)
        if np.prod(shape) * 4 > FEATURE_CACHE_IN_MEMORY_LIMIT:
            feats = np.lib.format.open_memmap(self.run_dir / f"features-{split}.npy", mode="w+", dtype=np.float32, shape=shape)
        else:
            feats = np.empty(shape, dtype=np.float32)
        labels = np.tile(images.labels, views)
        self.model.eval()
        aug = train_transform(self.spec, self.cfg.augment if self.cfg.augment != "none" else "light", self.cfg.crop_scale)
        with self.r.task(f"caching {split} features" + (f" ({views} views)" if views > 1 else ""), n * views) as advance:
            for v in range(views):
                ds = EvalImages(images, self.spec) if v == 0 else AugmentedImages(images, self.spec, aug)
                loader = DataLoader(ds, batch_size=32, shuffle=False, num_workers=self.workers)
                pos = v * n
                for x, _ in loader:
                    x = self._to_device(x)
                    feats[pos : pos + len(x)] = self.model.backbone(x).float().cpu().numpy()
                    pos += len(x)
                    advance(len(x))
        return feats, labels

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def stage_head(self) -> None:
        cfg, _r = self.cfg, self.r
        freeze_backbone(self.model)
        # The frozen base runs in eval mode throughout: BatchNorm uses and keeps its ImageNet statistics.
        self.model.backbone.eval()
        head = self.model.head
        opt = torch.optim.AdamW(param_groups(head, cfg.weight_decay), lr=cfg.lr_head)
        t0 = time.perf_counter()
        if cfg.cache_features:
            xtr, ytr = self.extract_features(self.train_images, cfg.cache_views, "train")
            xva, _ = self.extract_features(self.val_images, 1, "val")
            xtr_t, ytr_t = torch.from_numpy(np.asarray(xtr)).to(self.device), torch.from_numpy(ytr).to(self.device)
            xva_t = torch.from_numpy(np.asarray(xva)).to(self.device)
            steps = math.ceil(len(ytr) / cfg.head_batch_size)
        else:
            loader = self._train_loader(cfg.head_batch_size, drop_last=False)
            steps = len(loader)
        cache_seconds = time.perf_counter() - t0
        sched = _warmup_cosine(opt, steps * cfg.epochs_head, warmup_steps=steps)  # one epoch of warm-up
        crit = self.criterion()
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        images_seen = 0
        for epoch in range(1, cfg.epochs_head + 1):
            t_ep = time.perf_counter()
            head.train()
            total, count, correct = 0.0, 0, 0
            if cfg.cache_features:
                order = torch.randperm(len(ytr_t), generator=gen).to(self.device)
                batches = ((xtr_t[idx], ytr_t[idx]) for idx in order.split(cfg.head_batch_size))
            else:
                batches = self._backbone_batches(loader)
            for feats, y in batches:
                logits = head(feats)
                loss = crit(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(y)
                count += len(y)
                correct += int((logits.argmax(1) == y).sum())
            images_seen += count
            head.eval()
            with torch.no_grad():
                if cfg.cache_features:
                    val_logits = head(xva_t).float().cpu().numpy()
                else:
                    val_logits = predict_logits(self.model, self.val_images, self.spec, self.device, workers=self.workers,
                                                channels_last=cfg.channels_last)  # fmt: skip
            val_loss = self.val_loss(val_logits)
            is_best = val_loss < self.best_val_loss
            if is_best:
                self.save_best("head", epoch, val_loss, val_logits)
            self.record({
                "stage": "head", "epoch": epoch, "train_loss": total / count, "train_top1": correct / count,
                "val_loss": val_loss, "val_top1": float((val_logits.argmax(1) == self.val_images.labels).mean()),
                "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - t_ep, "best": is_best,
            })  # fmt: skip
        seconds = time.perf_counter() - t0
        self.timings["head"] = {
            "seconds": seconds, "feature_cache_seconds": cache_seconds if cfg.cache_features else 0.0,
            "images_per_second": (len(self.train_images) * cfg.epochs_head) / seconds,
            "feature_cache": cfg.cache_features, "cache_views": cfg.cache_views if cfg.cache_features else 0,
        }  # fmt: skip
        self.save_last("head", cfg.epochs_head, {})

    def _train_loader(self, batch_size: int, drop_last: bool = True) -> DataLoader:
        ds = AugmentedImages(self.train_images, self.spec, train_transform(self.spec, self.cfg.augment, self.cfg.crop_scale))
        # Fine-tuning drops a ragged last batch (tiny batches give noisy steps); stage 1 without the
        # cache keeps it, so it sees exactly the images the cached path does.
        return DataLoader(
            ds, batch_size=batch_size, shuffle=True, num_workers=self.workers, drop_last=drop_last and len(ds) > batch_size,
            generator=torch.Generator().manual_seed(self.cfg.seed + len(self.history)),
            persistent_workers=False,
        )  # fmt: skip

    def _backbone_batches(self, loader: DataLoader):
        """Stage 1 without the cache: the frozen base runs on every batch of every epoch."""
        for x, y in loader:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                feats = self.model.backbone(self._to_device(x)).float()
            yield feats, y.to(self.device)

    # -- stage 2 -----------------------------------------------------------------------------

    def stage_finetune(self, resume_state: dict[str, Any] | None = None) -> None:
        cfg, r = self.cfg, self.r
        unfrozen = unfreeze_top(self.model, cfg.unfreeze_blocks)
        n_train = sum(p.numel() for p in trainable_parameters(self.model))
        r.log(f"fine-tuning {', '.join(unfrozen)} + head ({n_train / 1e6:.2f}M parameters) at lr {cfg.finetune_lr:.1e}"
              f"{', bf16 autocast' if self.bf16 else ''}{', channels_last' if cfg.channels_last else ''}")  # fmt: skip
        opt = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.finetune_lr)
        loader = self._train_loader(cfg.batch_size)
        steps = len(loader)
        sched = _warmup_cosine(opt, steps * cfg.epochs_finetune, warmup_steps=int(cfg.warmup_epochs * steps))
        start, bad_epochs = 1, 0
        ema = self._weight_average()
        if resume_state is not None:
            opt.load_state_dict(resume_state["optimizer"])
            sched.load_state_dict(resume_state["scheduler"])
            start, bad_epochs = resume_state["epoch"] + 1, resume_state["bad_epochs"]
            if ema is not None and resume_state.get("ema_state_dict") is not None:
                ema.module.load_state_dict(resume_state["ema_state_dict"])
        # Validation scores (and the best checkpoint keeps) the weight average when there is one.
        scored = ema.module if ema is not None else self.model
        crit = self.criterion()
        t0, images, train_seconds = time.perf_counter(), 0, 0.0
        for epoch in range(start, cfg.epochs_finetune + 1):
            if bad_epochs >= cfg.patience > 0:
                break
            loader = self._train_loader(cfg.batch_size)
            set_train_mode(self.model)
            t_ep = time.perf_counter()
            total, count, correct = 0.0, 0, 0
            with r.task(f"fine-tune epoch {epoch}/{cfg.epochs_finetune}", len(loader.dataset)) as advance:  # type: ignore[arg-type]
                for x, y in loader:
                    x, y = self._to_device(x), y.to(self.device)
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                        logits = self.model(x)
                    loss = crit(logits.float(), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    if ema is not None:
                        ema.update(self.model, step=sched.last_epoch)
                    total += loss.item() * len(y)
                    count += len(y)
                    correct += int((logits.argmax(1) == y).sum())
                    advance(len(y))
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            epoch_train_seconds = time.perf_counter() - t_ep
            train_seconds += epoch_train_seconds
            images += count
            val_logits = predict_logits(scored, self.val_images, self.spec, self.device, workers=self.workers,
                                        channels_last=cfg.channels_last)  # fmt: skip
            val_loss = self.val_loss(val_logits)
            is_best = val_loss < self.best_val_loss
            if is_best:
                self.save_best("finetune", epoch, val_loss, val_logits, scored)
                bad_epochs = 0
            else:
                bad_epochs += 1
            self.record({
                "stage": "finetune", "epoch": epoch, "train_loss": total / count, "train_top1": correct / count,
                "val_loss": val_loss, "val_top1": float((val_logits.argmax(1) == self.val_images.labels).mean()),
                "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - t_ep, "best": is_best,
                "train_images_per_second": count / epoch_train_seconds,
            })  # fmt: skip
            self.save_last("finetune", epoch, {
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "bad_epochs": bad_epochs,
                "ema_state_dict": {k: v.detach().cpu() for k, v in ema.module.state_dict().items()} if ema is not None else None,
            })  # fmt: skip
            if bad_epochs >= cfg.patience > 0:
                r.log(f"early stop: validation loss has not improved for {bad_epochs} epochs")
        if images:
            self.timings["finetune"] = {
                "seconds": time.perf_counter() - t0, "train_seconds": train_seconds,
                "images_per_second": images / train_seconds, "bf16": self.bf16, "channels_last": cfg.channels_last,
            }  # fmt: skip

    def _weight_average(self) -> Any:
        """timm's EMA of the fine-tuned weights, or None when --ema-decay is 0."""
        if self.cfg.ema_decay <= 0:
            return None
        from timm.utils import ModelEmaV3

        # Decay warm-up (1 - (1 + step)^-3/4, capped at --ema-decay): the average starts as the model and
        # widens with training, so a few hundred steps are enough; BatchNorm buffers are frozen and copied as is.
        return ModelEmaV3(self.model, decay=self.cfg.ema_decay, use_warmup=True, warmup_power=3 / 4)

    # -- results -----------------------------------------------------------------------------

    def finish(self, interrupted: bool = False) -> dict[str, Any]:
        metrics: dict[str, Any] = {"split": "val", "stages": {}}
        for stage in ("head", "finetune"):
            rows = [h for h in self.history if h["stage"] == stage]
            if rows:
                best_row = min(rows, key=lambda h: h["val_loss"])
                metrics["stages"][stage] = {
                    "epochs_run": len(rows), "best_epoch": best_row["epoch"], "best_val_loss": best_row["val_loss"],
                    "best_val_top1": max(h["val_top1"] for h in rows), **self.timings.get(stage, {}),
                }  # fmt: skip
        if self.best:
            m = classification_metrics(self.best["val_logits"], self.val_images.labels, self.classes)
            metrics["best"] = {"stage": self.best["stage"], "epoch": self.best["epoch"], "val_loss": self.best["val_loss"], **m}
            from edgetl.plots import plot_confusion, plot_curves

            plot_curves(self.history, self.run_dir / "curves.png")
            plot_confusion(m["confusion_matrix"], self.classes, self.run_dir / "confusion.png",
                           f"validation, {self.cfg.backbone} ({self.best['stage']} epoch {self.best['epoch']})")  # fmt: skip
        metrics["interrupted"] = interrupted
        write_json(self.run_dir / "metrics.json", metrics)
        ds = self.dataset
        write_json(self.run_dir / "splits.json", ds.split_record())
        write_json(self.run_dir / "manifest.json", {
            "edgetl_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "seed": self.cfg.seed,
            "config": self.cfg.to_dict(),
            "device": str(self.device), "bf16_autocast": self.bf16, "workers": self.workers,
            "dataset": {
                "root": str(ds.root.resolve()), "kind": ds.kind, "fingerprint": ds.fingerprint(),
                "classes": ds.classes, "split_note": ds.split_note,
                "counts": {s: ls.class_counts(len(ds.classes)) for s, ls in ds.splits().items()},
            },
            "skipped_files": self.skipped,
            "weights_source": self.weights_source,
            "timings": self.timings,
            "host": host_record(),
        })  # fmt: skip
        return metrics


def _warmup_cosine(opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train(
    data: str | os.PathLike[str],
    cfg: TrainConfig,
    out: str | None = None,
    name: str | None = None,
    reporter: Reporter | None = None,
) -> TrainResult:
    """Train a classifier on the images at `data`; return the run folder and its metrics."""
    tune_malloc()
    reporter = reporter or Reporter()
    data = str(data)
    # Fail on bad data before a run folder is created.
    if not Path(data).exists():
        raise EdgetlError(f"data path does not exist: {data}")
    ds_name = Path(data).resolve().name
    run_dir = new_run_dir(out, name, ds_name, cfg.backbone)
    trainer = Trainer(cfg, data, run_dir, reporter)
    trainer.prepare()
    run_dir.mkdir(parents=True, exist_ok=True)
    reporter.log(f"run folder: {run_dir}")
    return _run_stages(trainer, resume_state=None)


def resume(run: str | os.PathLike[str], reporter: Reporter | None = None, epochs_finetune: int | None = None) -> TrainResult:
    """Continue an interrupted run from its last completed epoch."""
    tune_malloc()
    reporter = reporter or Reporter()
    last = checkpoint.read(run, checkpoint.LAST_NAME)
    cfg = TrainConfig.from_dict(last["config"]["train"])
    if epochs_finetune is not None:
        cfg = replace(cfg, epochs_finetune=epochs_finetune)
    trainer = Trainer(cfg, last["config"]["data"], Path(run), reporter)
    trainer.prepare(weights_source=_first_weights_source(Path(run)))
    if last["config"]["labels"] != trainer.classes:
        raise EdgetlError(f"the data at {last['config']['data']} no longer has the classes this run was trained on")
    trainer.history = list(last.get("history", []))
    trainer.best_val_loss = float(last.get("best_val_loss", math.inf))
    trainer.model.load_state_dict(last["state_dict"])
    if last.get("best_stage"):
        best = checkpoint.read(run)
        # Validation logits of the best model are needed for the final metrics; recompute them (fp32).
        model = build_classifier(cfg.backbone, len(trainer.classes), cfg.hidden, cfg.dropout)
        model.load_state_dict(best["state_dict"])
        logits = predict_logits(model.to(trainer.device), trainer.val_images, trainer.spec, trainer.device)
        trainer.best = {"stage": best["stage"], "epoch": best["epoch"], "val_loss": best["val_loss"], "val_logits": logits}
    if last["stage"] == "finetune":
        reporter.log(f"resuming {run} at fine-tune epoch {last['epoch'] + 1}")
        state = {"optimizer": last["optimizer"], "scheduler": last["scheduler"], "epoch": last["epoch"], "bad_epochs": last["bad_epochs"],
                 "ema_state_dict": last.get("ema_state_dict")}  # fmt: skip
        return _run_stages(trainer, resume_state=state, skip_head=True)
    reporter.log(f"resuming {run}: stage 1 completed, starting fine-tuning")
    return _run_stages(trainer, resume_state=None, skip_head=True)


def _first_weights_source(run: Path) -> str:
    """Where the interrupted run's ImageNet weights came from, as its manifest recorded it."""
    try:
        source = json.loads((run / "manifest.json").read_text()).get("weights_source")
    except (OSError, ValueError, AttributeError):
        source = None
    return source or f"resumed from {checkpoint.LAST_NAME}"


def _run_stages(trainer: Trainer, resume_state: dict[str, Any] | None, skip_head: bool = False) -> TrainResult:
    cfg = trainer.cfg
    try:
        if not skip_head:
            trainer.stage_head()
        if cfg.epochs_finetune > 0:
            trainer.stage_finetune(resume_state)
    except KeyboardInterrupt:
        # Whatever was saved at the end of the last completed epoch is good; finish the reports with it.
        if trainer.history:
            trainer.finish(interrupted=True)
        raise TrainingInterrupted(str(trainer.run_dir)) from None
    metrics = trainer.finish()
    best = metrics.get("best", {})
    if best:
        trainer.r.log(
            f"best: {best['stage']} epoch {best['epoch']}, val top-1 {best['top1']:.2%}, top-5 {best['top5']:.2%}, "
            f"macro-F1 {best['macro_f1']:.3f} -> {trainer.run_dir / checkpoint.BEST_NAME}"
        )
    return TrainResult(trainer.run_dir, metrics)
