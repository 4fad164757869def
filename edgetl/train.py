"""Two-stage transfer learning.

Stage 1 trains a new head on a frozen ImageNet backbone. The frozen base gives the same features
every epoch, so by default it runs once over the data and the head trains on cached features:
one forward pass over the data instead of one per epoch.
Stage 2 unfreezes the top blocks and fine-tunes them with the head at a lower learning rate, with
augmentation, BatchNorm statistics kept, warm-up + cosine decay and early stopping on validation
loss. The best checkpoint (lowest validation loss over both stages) is what the run keeps.

Both stages run the same epoch loop (`_fit_epoch`) and the same end-of-epoch bookkeeping
(`_end_epoch`: validate, keep the best, record, save `last.pt`). The run folder is checked and
locked before any image is decoded, the file lists are recorded first, and `last.pt` exists from
before the first epoch, so Ctrl-C at any point leaves a run that `--resume` continues.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from edgetl import __version__, checkpoint
from edgetl import run as layout
from edgetl.backbones import get_entry, load_pretrained, preprocess_spec
from edgetl.config import TrainConfig
from edgetl.data import Dataset as ImageDataset
from edgetl.data import LabelledSet, check_after_skips, check_run_outside_data, dataset_from_record, load_dataset
from edgetl.decoded import CACHE_PREFIX, DecodedImages, decode_split
from edgetl.distributed import Dist, lost_peer
from edgetl.duplicates import find_duplicates, record_digests, write_train_vectors
from edgetl.errors import EdgetlError, TrainingInterrupted
from edgetl.fileio import write_csv, write_json
from edgetl.hostinfo import has_bf16, host_record
from edgetl.l2sp import StartingPointPull, backbone_anchor
from edgetl.malloc_tuning import tune_malloc
from edgetl.metrics import classification_metrics
from edgetl.model import (
    HeadConfig,
    build_classifier,
    feature_dim,
    freeze_backbone,
    layerwise_param_groups,
    param_groups,
    set_train_mode,
    trainable_parameters,
    unfreeze_top,
)
from edgetl.preprocess import PreprocessSpec, preprocess
from edgetl.progress import Reporter
from edgetl.recipes import TRIAL_IMAGES, FinetuneRecipe, Score, candidates, choose
from edgetl.run import RUN_FORMAT, RunFolder, check_new_run_folder, is_run, locked
from edgetl.shards import is_shard_pattern
from edgetl.tensorboard_log import TrainLog

# Larger feature caches go to a memory-mapped file in the run folder (Lite0: 5 KB an image, so from ~50k images).
FEATURE_CACHE_IN_MEMORY_LIMIT = 256 << 20
FEATURE_CACHE_GLOB = "features-*.npy"


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
    def __init__(self, images: DecodedImages, spec: PreprocessSpec, transform: Any, with_index: bool = False) -> None:
        super().__init__(images, spec)
        self.transform, self.with_index = transform, with_index

    def __getitem__(self, i: int) -> Any:
        # Crops are cut from the image as cached for training (large enough for the smallest crop).
        item = self.transform(self.images.get_stored(i)), int(self.images.labels[i])
        # The index finds the image's cached teacher logits when distilling.
        return (*item, i) if self.with_index else item


def train_transform(spec: PreprocessSpec, policy: str, crop_scale: float = 0.35, erase: float = 0.0) -> Any:
    """Training augmentation with torchvision.transforms.v2; `none` is the evaluation preprocessing.

    `erase` > 0 ends with random erasing at that probability; the erased pixels are 0 after normalisation,
    which is the dataset mean, so the network sees an occluder, not a black (or white) patch."""
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
    if erase > 0:
        steps.append(v2.RandomErasing(p=erase, value=0.0))
    return v2.Compose(steps)


# ----------------------------------------------------------------------------- devices and precision


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EdgetlError("--device cuda asked for, but no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def rank_device(device: torch.device, dist: Dist) -> torch.device:
    """This process's device: under torchrun on CUDA, GPU `local_rank` of its node."""
    if device.type != "cuda" or not dist.active:
        return device
    check_process_split(None, dist.world_size, dist.local_world_size, device)
    return torch.device("cuda", dist.local_rank)


def check_process_split(cfg: TrainConfig | None, world_size: int, local_world_size: int, device: torch.device) -> None:
    """What must fit the process count, refused in one line: by `--nproc-per-node` before any process starts,
    and in every process under a plain torchrun. NCCL runs one process per GPU (more would fail later in
    `model.to()` with an invalid device ordinal); the global batch is split evenly; mixup pairs the images
    of each process's batch."""
    if device.type == "cuda" and local_world_size > (gpus := torch.cuda.device_count()):
        raise EdgetlError(f"{local_world_size} training processes on this machine but {gpus} CUDA device(s): NCCL needs "
                          f"one GPU per process; use --nproc-per-node {gpus}, or --device cpu for processes on the CPU")  # fmt: skip
    if cfg is None or world_size == 1:
        return
    if cfg.batch_size % world_size:
        raise EdgetlError(f"--batch-size {cfg.batch_size} is the global batch: it must divide evenly over {world_size} processes")
    if cfg.mixes and (cfg.batch_size // world_size) % 2:
        raise EdgetlError(f"--mixup/--cutmix need an even batch in each process: {cfg.batch_size} over "
                          f"{world_size} processes is {cfg.batch_size // world_size}")  # fmt: skip


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training steps: bf16 when asked (`use_bf16`: `auto` is fp32, measured faster);
    fp16 (with loss scaling) only when asked, and only on CUDA; None for fp32."""
    if precision == "fp16":
        if device.type != "cuda":
            raise EdgetlError("--precision fp16 needs a CUDA device (CPUs train in fp32 or bf16)")
        return torch.float16
    return torch.bfloat16 if use_bf16(precision, device) else None


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast only when asked: on every device measured, `auto` trains faster in fp32.

    A CPU with AVX-512 bf16 instructions but no AMX tiles trains Lite0's fine-tune step at 14.9 images/s with
    bf16 autocast against 29.2 in fp32 (benchmarks/results/train_throughput_bf16.md). A CPU *with* AMX tiles
    is slower in bf16 too: 20.8 against 27.5 images/s for all blocks, 38.4 against 49.9 for the top 3 (a 2-core
    Xeon with amx_bf16; train_throughput_amx-all.md, _amx-top3.md). A one-off torch profile of that step (not
    kept) says why: the convolutions' backward pass takes 1.4x longer in bf16, more than bf16 saves on the
    memory-bound batch-norm and activation passes, which edgetl's malloc tuning already makes cheap in fp32
    (without it bf16 would win, 20.3 against 15.9 images/s). An H100 ran Lite0's stage 2 (all blocks, batch 32) at 489
    and 288 images/s with bf16 autocast against 682 and 618 in fp32 (two pairs, both orders;
    benchmarks/results/gpu_h100/README.md), likely launch-bound small kernels plus autocast's casts, with fp32
    convolutions already on TF32 tensor cores.
    So `auto` is fp32 everywhere; `--precision bf16` is on request (refused without native bf16)."""
    if precision in ("fp32", "fp16", "auto"):
        return False
    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else has_bf16()
    if not supported:
        raise EdgetlError(f"--precision bf16: this {device.type.upper()} has no native bf16 support; use fp32 or auto")
    return True


def check_cpu_compiler() -> None:
    """torch.compile on a CPU builds C++ kernels: without a compiler it would fail at the first step, after
    stage 1 has run. Fail now, in one line."""
    import shutil

    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        raise EdgetlError("--compile on a CPU needs a C++ compiler (g++ or clang++; e.g. apt install g++), or drop --compile")


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


def default_run_dir(name: str | None, dataset_name: str, backbone: str) -> Path:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", name or f"{dataset_name}-{backbone}").strip("-") or "run"
    run = Path("models") / base
    i = 2
    while run.exists() and any(run.iterdir()):
        run = Path("models") / f"{base}-{i}"
        i += 1
    return run


@dataclass
class _Finetune:
    """One stage-2 recipe in progress: its optimizer, schedule, weight average and (DDP) forward."""

    recipe: FinetuneRecipe
    opt: torch.optim.Optimizer
    sched: Any
    ema: Any
    forward: nn.Module  # the model, or its DistributedDataParallel wrapper
    model: nn.Module
    description: str
    pull: StartingPointPull | None = None  # --l2sp: after each step, toward the pretrained backbone

    @property
    def scored(self) -> nn.Module:
        """What validation scores and the best checkpoint keeps: the weight average when there is one."""
        return self.ema.module if self.ema is not None else self.model


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]


# ----------------------------------------------------------------------------- training


class Trainer:
    """One run's training: set-up (`build_model`, `decode`), the two stages, and the records.

    Everything `--resume` needs goes into `last.pt` at the end of every epoch of either stage (and
    once before the first): weights, optimizer and scheduler state, early-stopping count, weight
    average, history and which epoch is the best so far."""

    def __init__(self, cfg: TrainConfig, dataset: ImageDataset, run_dir: Path, reporter: Reporter,
                 keep_feature_cache: bool = False, dist: Dist | None = None, record: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.cfg, self.dataset, self.run_dir, self.r = cfg, dataset, run_dir, reporter
        # The dataset's split record as the caller already made it (every file's size is a stat: not twice).
        self.base_record = record
        # Under torchrun: rank 0 writes the run folder and reports; every rank trains on its shard.
        self.dist = dist or Dist()
        self.data_path = str(dataset.root)
        self.classes = dataset.classes
        self.spec = preprocess_spec(cfg.backbone, cfg.input_size)
        self.keep_feature_cache = keep_feature_cache
        self.device = rank_device(pick_device(cfg.device), self.dist)
        if self.dist.active:
            check_process_split(cfg, self.dist.world_size, self.dist.local_world_size, self.device)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self.bf16 = self.amp_dtype == torch.bfloat16
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        if cfg.compile and self.device.type == "cpu":
            check_cpu_compiler()
        # Built (and an odd batch per process refused) now, not after stage 1; None without --mixup/--cutmix.
        self.mixer = self._make_mixer()
        self.tb: Any = None
        self.workers = cfg.workers if cfg.workers is not None else default_workers()
        self.history: list[dict[str, Any]] = []
        self.timings: dict[str, dict[str, float]] = {}
        self.best_score: Score | None = None
        self.best: dict[str, Any] = {}
        self.best_state: dict[str, torch.Tensor] | None = None  # CPU copy of the best model, on every process
        self.recipe_record: dict[str, Any] | None = None  # what stage 2 tried and chose, and why
        self.teacher_logits: torch.Tensor | None = None  # --teacher: its logits on the training images
        self.teacher_model: nn.Module | None = None  # --distill-mode consistent: the teacher itself, for stage 2
        self.teacher_size = 0
        self.l2sp_anchor: dict[str, torch.Tensor] | None = None  # --l2sp: the backbone's weights before stage 2
        self.teacher_record: dict[str, Any] | None = None
        self.skipped: list[dict[str, str]] = []
        self.duplicates: dict[str, Any] | None = None  # byte-identical images in train and val (edgetl.duplicates)
        self.split_record: dict[str, Any] = {}  # the dataset's split record with the decoded images' digests (decode)
        self.train_vectors: np.ndarray | None = None  # the training images' 8x8 grey thumbnails (main process, decode)
        self.manifest_base: dict[str, Any] = {}

    # -- set-up -------------------------------------------------------------------------------

    def build_model(self, weights_source: str | None = None) -> None:
        """Build the model and load its ImageNet weights, before any image is decoded (a bad --weights
        file fails in a second, not after minutes of decoding). `weights_source` given (a resume):
        the weights come from a checkpoint right after, so the ImageNet file is neither read nor required."""
        cfg, r = self.cfg, self.r
        seed_everything(cfg.seed)
        self.model = build_classifier(cfg.backbone, len(self.classes), cfg.hidden, cfg.dropout)
        if weights_source is not None:
            self.weights_source = weights_source
        elif cfg.pretrained:
            self.weights_source = load_pretrained(self.model.backbone, cfg.backbone, cfg.weights, r.log)
        else:
            self.weights_source = "none (--no-pretrained: random initialisation)"
            r.warn("--no-pretrained: the backbone starts from random weights")
        r.log(f"backbone: {cfg.backbone}, weights from {self.weights_source}")
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def decode(self) -> None:
        """Decode the training and validation images once; unreadable ones are skipped and recorded."""
        cfg, r, ds = self.cfg, self.r, self.dataset
        r.log(
            f"data: {ds.root} ({ds.kind}), {len(ds.classes)} classes, train {len(ds.train)}, val {len(ds.val)}"
            f"{f', test {len(ds.test)} (not used for training)' if ds.test is not None else ''}; {ds.split_note}"
        )
        decoded = {}
        # Training images are kept large enough for the smallest random crop unless --crop-source resized.
        train_crop = cfg.crop_scale if cfg.augment != "none" and cfg.crop_source == "full" else None
        for split, ls, crop in (("train", ds.train, train_crop), ("val", ds.val, None)):
            with r.task(f"decoding {split}", len(ls)) as advance:
                decoded[split], failed = self._decode(ls, crop, split, advance)
            for f in failed:
                f["split"] = split
            self.skipped += failed
        if self.dist.is_main:  # from the digests the decode took: nothing is read again
            found = find_duplicates(decoded["train"], decoded["val"], ds.classes)
            self.duplicates, self.train_vectors = found.to_dict(), found.train_vectors
            for warning in found.warnings():
                r.warn(f"{warning} (listed in manifest.json)")
        if self.skipped:
            listing = "; ".join(f"{f['file']} ({f['reason']})" for f in self.skipped[:5])
            more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            if cfg.strict:
                raise EdgetlError(f"{len(self.skipped)} unreadable image(s) and --strict: {listing}{more}")
            r.warn(f"skipped {len(self.skipped)} unreadable image(s): {listing}{more} (listed in manifest.json)")
        for split in ("train", "val"):
            check_after_skips(self.classes, split, decoded[split].labels)
        self.train_images, self.val_images = decoded["train"], decoded["val"]
        # The split record with each image's digest (from the decode's own read): written as splits.json by a new
        # run, and the distillation leak check compares contents with it.
        self.split_record = record_digests(self.base_record or ds.split_record(), decoded)
        counts = np.bincount(self.train_images.labels, minlength=len(self.classes)).astype(np.float64)
        weights = counts.sum() / (len(counts) * np.maximum(counts, 1)) if cfg.balance else np.ones_like(counts)
        self.class_weights = torch.tensor(weights, dtype=torch.float32, device=self.device)

    def prepare_teacher(self) -> None:
        """--teacher: check each teacher run against this one, then run it once over the training images
        (decoded at its own size) and keep its logits, so distillation costs a lookup per step. One teacher
        scores every training image; cross-fitted teachers (several, each trained with --hold-out-fold) score
        only the images they did not train on, averaged where more than one did not see an image; an ensemble
        (several that each trained on every image) scores every image, averaged (edgetl.distill.teacher_coverage)."""
        runs = self.cfg.teachers
        if not runs:
            return
        from edgetl.distill import load_teacher, teacher_coverage

        record = self.split_record  # with this run's digests the leak check also compares contents (edgetl.distill._check_no_leak)
        ls = self.dataset.train.subset(self.train_images.positions)  # exactly the student's training images, in order
        d = self.dist
        n = len(ls)
        cover, combined = (teacher_coverage(runs, record, [ref.key for ref in ls.refs]) if len(runs) > 1
                           else (np.ones((1, n), dtype=bool), "single"))  # fmt: skip
        # Under torchrun each process decodes and scores only its share (the logits are gathered after).
        mine = d.shard(n) if d.active else np.arange(n)
        total = np.zeros((len(mine), len(self.classes)), dtype=np.float64)
        scored = np.zeros(len(mine), dtype=np.int64)
        infos = []
        for t, run in enumerate(runs):
            model, spec, info = load_teacher(run, self.classes, self.spec, record)
            rows = np.flatnonzero(cover[t, mine])
            total[rows] += self._teacher_scores(model, spec, info, ls.subset(mine[rows]), name=f"teacher{t}-{d.rank}")
            scored[rows] += 1
            infos.append({**info, "images_scored": int(d.sum_all([float(len(rows))])[0])})
        logits = (total / np.maximum(scored, 1)[:, None]).astype(np.float32)
        if d.active:
            logits = d.gather_rows(logits, n)
        self.teacher_logits = torch.from_numpy(np.ascontiguousarray(logits)).to(self.device)
        if self.cfg.distill_mode == "consistent":  # one teacher (TrainConfig refuses several here)
            # Kept for stage 2, where it scores each augmented batch; stage 1 (whole images) uses the logits above.
            model.requires_grad_(False)
            self.teacher_model = model.to(self.device, memory_format=torch.channels_last if self.cfg.channels_last
                                          else torch.contiguous_format).eval()  # fmt: skip
            self.teacher_size = spec.input_size
        agree = float((logits.argmax(1) == self.train_images.labels).mean())
        settings = {"train_top1": agree, "alpha": self.cfg.distill_alpha, "temperature": self.cfg.distill_temperature,
                    "mode": self.cfg.distill_mode}  # fmt: skip
        if len(runs) == 1:
            self.teacher_record = {**infos[0], **settings}
        else:
            self.teacher_record = {"combined": combined, "teachers": infos, **settings}
        for info in infos:
            self.r.log(f"teacher: {info['backbone']} from {info['run']} (scores {info['images_scored']} training images); "
                       f"leak check {info['leak_check']}")  # fmt: skip
        what = {"cross-fitted": "held-out top-1", "ensemble": "ensemble top-1"}.get(combined, "top-1")
        self.r.log(f"teacher logits: {agree:.2%} {what} on the training images; alpha {self.cfg.distill_alpha:g}, "
                   f"temperature {self.cfg.distill_temperature:g}")  # fmt: skip

    def _teacher_scores(self, model: nn.Module, spec: PreprocessSpec, info: dict[str, Any], ls: LabelledSet, name: str) -> np.ndarray:
        """One teacher's logits of `ls` (this process's share), decoded at the teacher's own size."""
        d = self.dist
        with self.r.task("decoding train for the teacher", len(ls)) as advance:
            images, failed = decode_split(ls, spec, None, cache_dir=self.run_dir, name=name, progress=advance)
        try:
            # Agreed before any gather: one process raising alone would leave the others waiting in it.
            if d.agree(bool(failed) or len(images) != len(ls)):
                raise EdgetlError("--teacher: training image(s) could not be read again for the teacher"
                                  + (f", e.g. {failed[0]['file']}" if failed else ""))  # fmt: skip
            if not len(ls):
                return np.zeros((0, len(self.classes)), dtype=np.float64)
            return predict_logits(model.to(self.device), images, spec, self.device, workers=self.workers, reporter=self.r,
                                  description=f"teacher logits ({info['backbone']})").astype(np.float64)  # fmt: skip
        finally:
            images.close()

    def _decode(self, ls: Any, crop: float | None, split: str, advance: Any) -> tuple[DecodedImages, list[dict[str, str]]]:
        """One process: decode `ls` into a cache in the run folder. Under torchrun: the processes of each
        node decode every L-th image (L = processes on the node) into their own file, and all of them
        read all of the node's files, so a node decodes each image once whatever its process count."""
        d = self.dist
        if not d.active:
            return decode_split(ls, self.spec, crop, cache_dir=self.run_dir, name=split, progress=advance)
        self.run_dir.mkdir(parents=True, exist_ok=True)  # on another node's disk it holds only these caches
        mine = np.arange(d.local_rank, len(ls), d.local_world_size)
        path = self.run_dir / f"{CACHE_PREFIX}{split}-node{d.node_rank}-part{d.local_rank}.tmp"
        part, failed = decode_split(ls.subset(mine), self.spec, crop, progress=advance, path=path)
        owned = part.disown()
        everyone = d.gather_objects((d.node_rank, d.local_rank, str(path), part.index, mine[part.positions], part.digests, failed))
        peers = sorted((e for e in everyone if e[0] == d.node_rank), key=lambda e: e[1])
        joined = DecodedImages.join(ls, [(e[2], e[3], e[4], e[5]) for e in peers], self.spec.resize_size,
                                    self.spec.interpolation, owned)  # fmt: skip
        d.barrier()  # every peer's file is complete before anyone reads it
        joined.open_all()
        return joined, [f for e in peers for f in e[6]]

    def criterion(self, smoothing: bool = True) -> nn.Module:
        return nn.CrossEntropyLoss(
            weight=self.class_weights, label_smoothing=self.cfg.label_smoothing if smoothing else 0.0
        )

    def train_loss(self, on_images: bool = False) -> Any:
        """loss(logits, labels, indices, inputs): label-smoothed cross-entropy, mixed with the teacher's soft
        labels when distilling: looked up by training-image index, or (`on_images`, the batches are the
        student's augmented images, --distill-mode consistent) the teacher's logits of those very inputs."""
        hard = self.criterion()
        teacher = self.teacher_logits
        if teacher is None:
            return lambda logits, y, idx, x: hard(logits, y)
        from edgetl.distill import distillation_loss

        n, alpha, temperature = len(teacher), self.cfg.distill_alpha, self.cfg.distill_temperature
        if on_images and self.teacher_model is not None:
            return lambda logits, y, idx, x: distillation_loss(logits, y, self._teacher_logits_of(x), hard, alpha, temperature)
        return lambda logits, y, idx, x: distillation_loss(logits, y, teacher[idx.to(teacher.device) % n], hard, alpha, temperature)

    def _teacher_logits_of(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits of the student's (augmented, perhaps mixed) batch, resized to the teacher's
        input size; under the student's autocast, without gradients."""
        assert self.teacher_model is not None
        with torch.no_grad():
            if x.shape[-1] != self.teacher_size or x.shape[-2] != self.teacher_size:
                # The crop is the same scene at another resolution; antialias when shrinking, as a resize would.
                x = F.interpolate(x, size=(self.teacher_size, self.teacher_size), mode="bilinear", align_corners=False,
                                  antialias=self.teacher_size < x.shape[-1])  # fmt: skip
            amp = self.amp_dtype
            with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                return self.teacher_model(x).float()

    def val_score(self, logits: np.ndarray) -> Score:
        """What model selection compares (see edgetl.recipes): validation top-1, then cross-entropy."""
        loss = self.val_loss(logits)
        # A diverged model (NaN logits) must lose every comparison, and NaN compares false with everything.
        return Score(float((logits.argmax(1) == self.val_images.labels).mean()), loss if math.isfinite(loss) else math.inf)

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

    def save_best(self, stage: str, epoch: int, score: Score, val_logits: np.ndarray, model: nn.Module | None = None) -> None:
        """Keep `model` (default: the one being trained; with --ema-decay, its weight average) as the best."""
        self.best_score = score
        self.best = {"stage": stage, "epoch": epoch, "val_loss": score.loss, "val_top1": score.top1, "val_logits": val_logits}
        self.best_state = {k: v.detach().cpu().clone() for k, v in (model or self.model).state_dict().items()}
        if not self.dist.is_main:
            return
        checkpoint.save(
            self.run_dir / checkpoint.BEST_NAME,
            {"state_dict": self.best_state, "config": self.resolved_config(), "stage": stage, "epoch": epoch,
             "val_loss": score.loss, "val_top1": score.top1},
        )  # fmt: skip

    def save_last(self, stage: str, epoch: int, opt: torch.optim.Optimizer | None = None, sched: Any = None,
                  bad_epochs: int = 0, ema: Any = None) -> None:  # fmt: skip
        """The training state after `epoch` of `stage` (epoch 0: before the first), for --resume."""
        if not self.dist.is_main:
            return
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        checkpoint.save(
            self.run_dir / checkpoint.LAST_NAME,
            {
                "state_dict": state, "config": self.resolved_config(), "stage": stage, "epoch": epoch,
                "history": self.history, "recipe": self.recipe_record,
                "best_stage": self.best.get("stage"), "best_epoch": self.best.get("epoch"),
                "optimizer": opt.state_dict() if opt is not None else None,
                "scheduler": sched.state_dict() if sched is not None else None, "bad_epochs": bad_epochs,
                "ema_state_dict": {k: v.detach().cpu() for k, v in ema.module.state_dict().items()} if ema is not None else None,
                "l2sp_anchor": {k: v.cpu() for k, v in self.l2sp_anchor.items()} if self.l2sp_anchor is not None else None,
                # The stage times up to this epoch, over every session: a session killed outright (SIGKILL, power
                # loss) never writes its manifest, and its completed epochs' time would otherwise be lost.
                "timings": self.run_timings(),
            },
        )  # fmt: skip

    def record(self, row: dict[str, Any]) -> None:
        row["global_epoch"] = len(self.history) + 1
        self.history.append(row)
        if not self.dist.is_main:
            return
        write_csv(self.run_dir / layout.HISTORY, self.history)
        if self.tb is not None:
            self.tb.epoch(row)
        r = row
        self.r.log(
            f"{r['stage']:>8} epoch {r['epoch']:>3}: train loss {r['train_loss']:.4f}  val loss {r['val_loss']:.4f}  "
            f"val top-1 {r['val_top1']:.2%}  lr {r['lr']:.2e}  {r['seconds']:.1f}s{'  *best' if r.get('best') else ''}"
        )

    # -- the epoch loop both stages share ------------------------------------------------------

    def _fit_epoch(self, batches: Any, forward: Any, opt: torch.optim.Optimizer, sched: Any, crit: Any,
                   autocast: bool, ema: Any = None, advance: Any = None,
                   max_steps: int | None = None, mix: Any = None, after_step: Any = None) -> tuple[float, float, int]:  # fmt: skip
        """One pass of optimisation steps over `batches` (x, y[, training-image index]), or its first
        `max_steps`; returns (mean loss, top-1, images), over all processes under torchrun (a
        DistributedDataParallel `forward` averages the gradients). `mix` (timm's Mixup) turns each batch
        into mixed images and soft targets; top-1 is then against each image's own (dominant) label.
        `after_step` (--l2sp's pull) runs after each optimizer step, before the weight average sees the weights."""
        total, count, correct = 0.0, 0, 0
        dtype = self.amp_dtype if autocast and self.amp_dtype is not None else torch.float32
        scaler = self.scaler if dtype == torch.float16 else None
        for batch in itertools.islice(batches, max_steps):
            x, y = batch[0], batch[1]
            # Mixup's targets are class probabilities; CrossEntropyLoss takes them (and still applies
            # label smoothing and class weights), so one criterion serves both.
            x, target = mix(x, y) if mix is not None else (x, y)
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = forward(x)
            loss = crit(logits.float(), target, batch[2] if len(batch) > 2 else None, x)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            if after_step is not None:
                after_step()
            sched.step()
            if self.tb is not None:
                self.tb.step(self._stage, loss.item(), sched.get_last_lr()[0], sched.last_epoch)
            if ema is not None:
                ema.update(self.model, step=sched.last_epoch)
            total += loss.item() * len(y)
            count += len(y)
            correct += int((logits.argmax(1) == y).sum())
            if advance is not None:
                advance(len(y))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        total, correct, count = self.dist.sum_all([total, correct, count])
        return total / max(1, count), correct / max(1, count), int(count)

    def _end_epoch(self, stage: str, epoch: int, fit: tuple[float, float, int], val_logits: np.ndarray, scored: nn.Module | None,
                   lr: float, t_ep: float, extra: dict[str, Any] | None = None) -> bool:  # fmt: skip
        """Validate, keep the best of the run, record the epoch. Returns whether it is the best of its stage
        (what early stopping counts: each stage is judged against its own trajectory)."""
        score = self.val_score(val_logits)
        stage_best = self._stage_best(stage)
        is_best = score.better(self.best_score)
        if is_best:
            self.save_best(stage, epoch, score, val_logits, scored)
        self.record({
            "stage": stage, "epoch": epoch, "train_loss": fit[0], "train_top1": fit[1], "val_loss": score.loss,
            "val_top1": score.top1, "lr": lr, "seconds": time.perf_counter() - t_ep, "best": is_best, **(extra or {}),
        })  # fmt: skip
        return score.better(stage_best)

    def _stage_best(self, stage: str) -> Score | None:
        best = None
        for row in self.history:
            if row["stage"] == stage and Score(row["val_top1"], row["val_loss"]).better(best):
                best = Score(row["val_top1"], row["val_loss"])
        return best

    # -- stage 1 -----------------------------------------------------------------------------

    def feature_cache_file(self, split: str) -> Path:
        return self.run_dir / FEATURE_CACHE_GLOB.replace("*", split)

    def remove_feature_cache(self) -> None:
        if not self.keep_feature_cache:
            for p in self.run_dir.glob(FEATURE_CACHE_GLOB):
                p.unlink(missing_ok=True)

    @torch.no_grad()
    def extract_features(self, images: DecodedImages, views: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Backbone features of every image: view 0 with evaluation preprocessing, the others augmented."""
        n, dim = len(images), feature_dim(self.model.backbone)
        shape = (n * views, dim)
        if np.prod(shape) * 4 > FEATURE_CACHE_IN_MEMORY_LIMIT:
            # Removed at the end of the run (see remove_feature_cache) unless --keep-feature-cache.
            feats = np.lib.format.open_memmap(self.feature_cache_file(split), mode="w+", dtype=np.float32, shape=shape)
        else:
            feats = np.empty(shape, dtype=np.float32)
        labels = np.tile(images.labels, views)
        self.model.eval()
        aug = train_transform(self.spec, self.cfg.augment if self.cfg.augment != "none" else "light", self.cfg.crop_scale,
                              self.cfg.erase)
        # Under torchrun every process runs the base on its shard and all of them gather the rest.
        d = self.dist
        mine = images.subset(d.shard(n)) if d.active else images
        with self.r.task(f"caching {split} features" + (f" ({views} views)" if views > 1 else ""), len(mine) * views) as advance:
            for v in range(views):
                ds = EvalImages(mine, self.spec) if v == 0 else AugmentedImages(mine, self.spec, aug)
                loader = DataLoader(ds, batch_size=32, shuffle=False, num_workers=self.workers, pin_memory=self.device.type == "cuda")
                local = feats[v * n : (v + 1) * n] if not d.active else np.empty((len(mine), dim), dtype=np.float32)
                pos = 0
                for x, _ in loader:
                    x = self._to_device(x)
                    local[pos : pos + len(x)] = self.model.backbone(x).float().cpu().numpy()
                    pos += len(x)
                    advance(len(x))
                if d.active:
                    d.gather_rows(local, n, out=feats[v * n : (v + 1) * n])
        return feats, labels

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def stage_head(self, resume_state: dict[str, Any] | None = None) -> None:
        cfg = self.cfg
        freeze_backbone(self.model)
        # The frozen base runs in eval mode throughout: BatchNorm uses and keeps its ImageNet statistics.
        self.model.backbone.eval()
        head = self.model.head
        self._stage = "head"
        opt = torch.optim.AdamW(param_groups(head, cfg.weight_decay), lr=cfg.lr_head)
        t0 = time.perf_counter()
        if cfg.cache_features:
            xtr, ytr = self.extract_features(self.train_images, cfg.cache_views, "train")
            xva, _ = self.extract_features(self.val_images, 1, "val")
            xtr_t, ytr_t = torch.from_numpy(np.asarray(xtr)).to(self.device), torch.from_numpy(ytr).to(self.device)
            xva_t = torch.from_numpy(np.asarray(xva)).to(self.device)
            steps = math.ceil(len(ytr) / cfg.head_batch_size)
        else:
            steps = len(self._train_loader(cfg.head_batch_size, drop_last=False))
        cache_seconds = time.perf_counter() - t0
        sched = _warmup_cosine(opt, steps * cfg.epochs_head, warmup_steps=steps)  # one epoch of warm-up
        start, bad_epochs = 1, 0
        if resume_state is not None and resume_state.get("optimizer") is not None:
            opt.load_state_dict(resume_state["optimizer"])
            sched.load_state_dict(resume_state["scheduler"])
            start, bad_epochs = resume_state["epoch"] + 1, resume_state["bad_epochs"]
            self.r.log(f"resuming stage 1 at epoch {start}")
        crit = self.train_loss()
        images_seen = 0
        for epoch in range(start, cfg.epochs_head + 1):
            t_ep = time.perf_counter()
            head.train()
            if cfg.cache_features:
                # Seeded per epoch, so a resumed run draws the same batches as an uninterrupted one.
                gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + epoch)
                order = torch.randperm(len(ytr_t), generator=gen).to(self.device)
                batches: Any = ((xtr_t[idx], ytr_t[idx], idx) for idx in order.split(cfg.head_batch_size))
            else:
                batches = self._backbone_batches(self._train_loader(cfg.head_batch_size, drop_last=False))
            # On cached features every process trains the same head on the same batches (all have every
            # feature); without the cache each has its shard of images and DDP averages the gradients.
            fit = self._fit_epoch(batches, head if cfg.cache_features else self._ddp(head), opt, sched, crit, autocast=False)
            images_seen += fit[2]
            head.eval()
            with torch.no_grad():
                val_logits = head(xva_t).float().cpu().numpy() if cfg.cache_features else self._val_logits(self.model)
            improved = self._end_epoch("head", epoch, fit, val_logits, None, lr_of_last_step(sched), t_ep)
            bad_epochs = 0 if improved else bad_epochs + 1
            self._head_timing(time.perf_counter() - t0, cache_seconds, images_seen)  # an interruption keeps what ran
            self.save_last("head", epoch, opt, sched, bad_epochs)
            if bad_epochs >= cfg.patience_head > 0 and epoch < cfg.epochs_head:
                self.r.log(f"stage 1 stops after epoch {epoch}: no better head for {bad_epochs} epochs (--patience-head)")
                break
        self._head_timing(time.perf_counter() - t0, cache_seconds, images_seen)
        self.remove_feature_cache()

    def _head_timing(self, seconds: float, cache_seconds: float, images_seen: int) -> None:
        cfg = self.cfg
        self.timings["head"] = {
            "seconds": seconds, "feature_cache_seconds": cache_seconds if cfg.cache_features else 0.0,
            "images": images_seen, "images_per_second": images_seen / seconds if images_seen else 0.0,
            "feature_cache": cfg.cache_features, "cache_views": cfg.cache_views if cfg.cache_features else 0,
        }  # fmt: skip

    def _train_loader(self, batch_size: int, drop_last: bool = True) -> DataLoader:
        ds = AugmentedImages(self.train_images, self.spec, train_transform(self.spec, self.cfg.augment, self.cfg.crop_scale,
                                                                             self.cfg.erase),
                             with_index=self.teacher_logits is not None)  # fmt: skip
        d = self.dist
        if d.active:
            # One global batch whatever the process count: each process takes batch_size / N of it.
            if batch_size % d.world_size:
                raise EdgetlError(f"batch size {batch_size} must divide evenly over {d.world_size} processes")
            sampler = DistributedSampler(ds, num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=self.cfg.seed,
                                         drop_last=drop_last)  # fmt: skip
            sampler.set_epoch(len(self.history))  # a new order every epoch, the same on resume
            per_rank = batch_size // d.world_size
            return DataLoader(ds, batch_size=per_rank, sampler=sampler, num_workers=self.workers,
                              drop_last=drop_last and len(sampler) > per_rank, pin_memory=self.device.type == "cuda")  # fmt: skip
        # Fine-tuning drops a ragged last batch (tiny batches give noisy steps); stage 1 without the
        # cache keeps it, so it sees exactly the images the cached path does.
        return DataLoader(
            ds, batch_size=batch_size, shuffle=True, num_workers=self.workers, drop_last=drop_last and len(ds) > batch_size,
            generator=torch.Generator().manual_seed(self.cfg.seed + len(self.history)),
            persistent_workers=False, pin_memory=self.device.type == "cuda",
        )  # fmt: skip

    def _ddp(self, module: nn.Module) -> nn.Module:
        """`module` wrapped in DistributedDataParallel under torchrun (it averages gradients), else itself."""
        if not self.dist.active:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _val_logits(self, model: nn.Module) -> np.ndarray:
        """fp32 validation logits; under torchrun each process scores its shard and all gather the rest."""
        d = self.dist
        mine = self.val_images.subset(d.shard(len(self.val_images))) if d.active else self.val_images
        logits = predict_logits(model, mine, self.spec, self.device, workers=self.workers, channels_last=self.cfg.channels_last)
        if not d.active:
            return logits
        if len(mine) == 0:
            logits = np.zeros((0, len(self.classes)), dtype=np.float32)
        return d.gather_rows(logits.astype(np.float32), len(self.val_images))

    def _backbone_batches(self, loader: DataLoader):
        """Stage 1 without the cache: the frozen base runs on every batch of every epoch."""
        for x, y, *idx in loader:
            amp = self.amp_dtype
            with torch.no_grad(), torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                feats = self.model.backbone(self._to_device(x)).float()
            yield feats, y.to(self.device), *idx

    # -- stage 2 -----------------------------------------------------------------------------

    def _start_finetune(self, recipe: FinetuneRecipe, steps: int, first_epoch_steps: int) -> _Finetune:
        """Unfreeze for `recipe` and build its optimizer (layer-wise rates), schedule and weight average.
        The schedule runs `first_epoch_steps` (a trial's length) then whole epochs of `steps`."""
        cfg = self.cfg
        unfrozen = unfreeze_top(self.model, recipe.unfreeze_blocks)
        groups = layerwise_param_groups(self.model, recipe.lr, cfg.weight_decay, recipe.llrd, cfg.head_lr_scale, cfg.l2sp)
        for g in groups:
            g["base_lr"] = g["lr"]  # what an extended run's fresh schedule starts from
        opt = torch.optim.AdamW(groups, lr=recipe.lr)
        pull = None
        if cfg.l2sp > 0:
            if self.l2sp_anchor is None:
                raise EdgetlError("--l2sp: the backbone's starting point was not recorded before stage 2")
            pull = StartingPointPull(self.model, opt, self.l2sp_anchor)
        # A whole-epoch trial is epoch 1; a shorter one comes before epoch 1, as extra steps.
        total = cfg.epochs_finetune * steps + (first_epoch_steps if first_epoch_steps < steps else 0)
        # A trial ends at the top of the warm-up, so that it shows the recipe at its full learning rate.
        warmup = min(int(cfg.warmup_epochs * steps), first_epoch_steps)
        n_train = sum(p.numel() for p in trainable_parameters(self.model))
        description = (f"{', '.join(unfrozen)} + head ({n_train / 1e6:.2f}M parameters) at lr {recipe.lr:.1e}"
                       f"{f', layer decay {recipe.llrd:g}' if recipe.llrd != 1 else ''}"
                       f"{f', head x{cfg.head_lr_scale:g}' if cfg.head_lr_scale != 1 else ''}"
                       f"{f', L2-SP {cfg.l2sp:g}' if cfg.l2sp > 0 else ''}"
                       f"{f', mixup {cfg.mixup:g} / cutmix {cfg.cutmix:g}' if cfg.mixes else ''}")  # fmt: skip
        forward = self._ddp(self.model)
        if cfg.compile:
            # Compiled lazily at the first step; parameters are shared, so the optimizer, the weight average and
            # validation (eager, eval mode) all see the same weights.
            forward = torch.compile(forward)
        return _Finetune(recipe, opt, _warmup_cosine(opt, total, warmup), self._weight_average(), forward, self.model,
                         description, pull)  # fmt: skip

    def _finetune_pass(self, run: _Finetune, crit: Any, label: str, max_steps: int | None = None) -> tuple[tuple[float, float, int], float]:
        """Train `run` for an epoch (or its first `max_steps`); returns the fit and the seconds it took."""
        loader = self._train_loader(self.cfg.batch_size)
        set_train_mode(self.model)
        t = time.perf_counter()
        total = len(loader.dataset) if max_steps is None else min(len(loader.dataset), max_steps * self.cfg.batch_size)  # type: ignore[arg-type]
        with self.r.task(label, total) as advance:
            batches = ((self._to_device(b[0]), b[1].to(self.device), *b[2:]) for b in loader)
            fit = self._fit_epoch(batches, run.forward, run.opt, run.sched, crit, autocast=True, ema=run.ema,
                                  advance=advance, max_steps=max_steps, mix=self.mixer, after_step=run.pull)  # fmt: skip
        return fit, time.perf_counter() - t

    def _make_mixer(self) -> Any:
        """timm's Mixup for --mixup / --cutmix (None when both are 0). It draws from numpy's generator,
        which seed_everything seeds, so a mixed run repeats. Label smoothing stays in the criterion."""
        cfg = self.cfg
        if not cfg.mixes:
            return None  # an odd batch per process was refused by check_process_split, an odd batch by TrainConfig
        from timm.data import Mixup

        return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=0.0, num_classes=len(self.classes))

    def _choose_recipe(self, steps: int, crit: Any, t0: float) -> tuple[_Finetune | None, int, tuple[int, float]]:
        """Start stage 2 from the best stage-1 head (LP-FT) with the recipe the config asks for; with
        several candidates (--recipe auto), give each a short trial and continue with the best, or with
        none when every trial was a whole epoch and worse than the head. Returns the run (None: stage 2 ends here), the
        fine-tune epochs already done (1 when the winning trial was a whole first epoch, else 0), and the
        images and seconds of the winner's trial (training, not overhead)."""
        cfg, r = self.cfg, self.r
        if self.best_state is not None and self.best.get("stage") == "head":
            self.model.load_state_dict(self.best_state)
        if cfg.l2sp > 0:
            # Stage 1 trained the head on cached features: the backbone is still the pretrained one.
            self.l2sp_anchor = backbone_anchor(self.model)
        options = candidates(cfg.recipe, cfg.unfreeze, cfg.finetune_lr, cfg.recipe_candidates)
        if len(options) == 1:
            run = self._start_finetune(options[0], steps, steps)
            self.recipe_record = {"mode": cfg.recipe, "chosen": options[0].to_dict(), "trial_steps": steps, "trials": [],
                                  "why": f"--recipe {cfg.recipe}" + (" (one candidate)" if cfg.recipe == "auto" else "")}  # fmt: skip
            r.log(f"fine-tuning {run.description}{self._precision_note()}")
            return run, 0, (0, 0.0)
        head_score = self.best_score
        trial_steps = min(steps, max(1, math.ceil(TRIAL_IMAGES / cfg.batch_size)))
        start = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        trials: list[dict[str, Any]] = []
        scored: list[tuple[FinetuneRecipe, Score]] = []
        winner: dict[str, Any] | None = None
        assert head_score is not None  # stage 1 recorded at least one epoch
        r.log(f"--recipe auto: {len(options)} fine-tune trials of {trial_steps} steps from the best head "
              f"({head_score.top1:.2%} top-1, loss {head_score.loss:.4f} on validation)")  # fmt: skip
        for i, recipe in enumerate(options, 1):
            self.model.load_state_dict(start)
            run = self._start_finetune(recipe, steps, trial_steps)
            fit, seconds = self._finetune_pass(run, crit, f"trial {i}/{len(options)}: {recipe.name}", trial_steps)
            logits = self._val_logits(run.scored)
            score = self.val_score(logits)
            trials.append({"recipe": recipe.to_dict(), **score.to_dict(), "images": fit[2], "seconds": seconds})
            scored.append((recipe, score))
            r.log(f"  trial {i}: {run.description}: val top-1 {score.top1:.2%}, loss {score.loss:.4f} ({seconds:.0f}s)")
            # Only the best trial's state is kept (choose() picks the same one: the first of the best).
            if winner is None or score.better(winner["score"]):
                winner = {"score": score, "fit": fit, "logits": logits, "seconds": seconds,
                          "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                          "opt": run.opt.state_dict(), "sched": run.sched.state_dict(),
                          "ema": {k: v.detach().clone() for k, v in run.ema.module.state_dict().items()} if run.ema else None}  # fmt: skip
            del run
        assert winner is not None
        chosen, why = choose(head_score, scored, whole_epoch=trial_steps >= steps)
        self.recipe_record = {"mode": cfg.recipe, "chosen": chosen.to_dict() if chosen else None, "why": why,
                              "head": head_score.to_dict(), "trials": trials, "trial_steps": trial_steps}  # fmt: skip
        r.log(f"recipe: {why}")
        if chosen is None:
            self.model.load_state_dict(start)
            self._save_finetune(t0, 0.0, 0, 0)  # the trials' time, in last.pt too
            return None, 0, (0, 0.0)
        # The winner goes on from where its trial ended: its steps are the first of its schedule.
        self.model.load_state_dict(winner["model"])
        run = self._start_finetune(chosen, steps, trial_steps)
        run.sched.load_state_dict(winner["sched"])
        run.opt.load_state_dict(winner["opt"])
        if run.ema is not None:
            run.ema.module.load_state_dict(winner["ema"])
        counted = (winner["fit"][2], winner["seconds"])
        if trial_steps < steps:  # a partial first epoch: the next whole epoch is epoch 1
            return run, 0, counted
        fit = winner["fit"]
        improved = self._end_epoch("finetune", 1, fit, winner["logits"], run.scored, lr_of_last_step(run.sched),
                                   time.perf_counter() - winner["seconds"], self._finetune_extra(run, fit, winner["seconds"]))  # fmt: skip
        self._save_finetune(t0, winner["seconds"], fit[2], 1, run, 0 if improved else 1)
        return run, 1, counted

    def _precision_note(self) -> str:
        return (f"{f', {self.amp_dtype} autocast' if self.amp_dtype else ''}{', channels_last' if self.cfg.channels_last else ''}"
                f"{', torch.compile' if self.cfg.compile else ''}"
                f"{f', {self.dist.world_size} processes' if self.dist.active else ''}")  # fmt: skip

    def stage_finetune(self, resume_state: dict[str, Any] | None = None) -> None:
        """Fine-tune with the chosen recipe. `resume_state` continues an interrupted stage 2 where it stopped;
        with `restart_schedule` in it (an extended run), the remaining epochs get a fresh warm-up +
        cosine schedule from the recipe's learning rates, keeping the optimizer's moments."""
        cfg, r = self.cfg, self.r
        self._stage = "finetune"
        steps = len(self._train_loader(cfg.batch_size))
        crit = self.train_loss(on_images=True)
        t0 = time.perf_counter()
        images, train_seconds, bad_epochs = 0, 0.0, 0
        if resume_state is None:
            run, done, (images, train_seconds) = self._choose_recipe(steps, crit, t0)
            start = done + 1  # the winning trial's first epoch counts once, as a trial (trial_seconds)
        else:
            run, start, bad_epochs = self._resume_finetune(resume_state, steps)
        if run is not None:
            for epoch in range(start, cfg.epochs_finetune + 1):
                # Every process holds the same gathered validation logits, so the same count; agreeing on
                # the decision anyway keeps the processes in step should they ever differ.
                if self.dist.agree(self._stop_early(bad_epochs, epoch - 1)):
                    break
                t_ep = time.perf_counter()
                fit, seconds = self._finetune_pass(run, crit, f"fine-tune epoch {epoch}/{cfg.epochs_finetune}")
                train_seconds += seconds
                images += fit[2]
                improved = self._end_epoch("finetune", epoch, fit, self._val_logits(run.scored), run.scored,
                                           lr_of_last_step(run.sched), t_ep, self._finetune_extra(run, fit, seconds))  # fmt: skip
                bad_epochs = 0 if improved else bad_epochs + 1
                self._save_finetune(t0, train_seconds, images, epoch, run, bad_epochs)
                if self._stop_early(bad_epochs, epoch) and epoch < cfg.epochs_finetune:
                    r.log(f"early stop: no better checkpoint in stage 2 for {bad_epochs} epochs")
        self._finetune_timing(time.perf_counter() - t0, train_seconds, images)

    @staticmethod
    def _finetune_extra(run: _Finetune, fit: tuple[float, float, int], seconds: float) -> dict[str, float]:
        """A fine-tune epoch's speed and, with --l2sp, how far the backbone has moved from its start (L2 norm)."""
        extra = {"train_images_per_second": fit[2] / seconds}
        if run.pull is not None:
            extra["backbone_drift"] = run.pull.distance()
        return extra

    def _save_finetune(self, t0: float, train_seconds: float, images: int, epoch: int, run: _Finetune | None = None,
                       bad_epochs: int = 0) -> None:  # fmt: skip
        """Stage 2's time so far, then last.pt after `epoch`: an interruption from here on keeps both."""
        self._finetune_timing(time.perf_counter() - t0, train_seconds, images)
        if run is None:
            self.save_last("finetune", epoch)
        else:
            self.save_last("finetune", epoch, run.opt, run.sched, bad_epochs, run.ema)

    def _finetune_timing(self, seconds: float, train_seconds: float, images: int) -> None:
        cfg = self.cfg
        record = self.recipe_record or {}
        chosen = record.get("chosen")
        self.timings["finetune"] = {
            "seconds": seconds, "train_seconds": train_seconds,
            # Trials of the recipes not kept: what --recipe auto cost on top of the fine-tune itself.
            "trial_seconds": sum(t["seconds"] for t in record.get("trials", []) if t["recipe"] != chosen),
            "images": images, "images_per_second": images / train_seconds if train_seconds else None, "bf16": self.bf16,
            "channels_last": cfg.channels_last, "compiled": cfg.compile,
            "autocast": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else None,
            "processes": self.dist.world_size,
        }  # fmt: skip

    def _stop_early(self, bad_epochs: int, epochs_done: int) -> bool:
        return bad_epochs >= self.cfg.patience > 0 and epochs_done >= self.cfg.min_epochs_finetune

    def _resume_finetune(self, state: dict[str, Any], steps: int) -> tuple[_Finetune, int, int]:
        """The fine-tune run of an interrupted (or extended) stage 2, with its recipe, optimizer and schedule."""
        cfg, r = self.cfg, self.r
        record = state.get("recipe") or {  # runs from before recipes: --unfreeze at --lr-finetune
            "mode": "finetune", "chosen": FinetuneRecipe(cfg.unfreeze, cfg.finetune_lr).to_dict(), "trial_steps": steps,
            "trials": [], "why": "--recipe finetune"}  # fmt: skip
        self.recipe_record = record
        recipe = FinetuneRecipe.from_dict(record["chosen"])
        start = state["epoch"] + 1
        bad_epochs = 0
        if cfg.l2sp > 0:
            self.l2sp_anchor = state.get("l2sp_anchor")
            if self.l2sp_anchor is None:
                raise EdgetlError(f"--l2sp: {checkpoint.LAST_NAME} does not hold the backbone's starting point; "
                                  "this run cannot go on with L2-SP")
        if state.get("restart_schedule"):
            run = self._start_finetune(recipe, steps, steps)
            run.opt.load_state_dict(state["optimizer"])
            remaining = cfg.epochs_finetune - start + 1
            for g in run.opt.param_groups:
                g["initial_lr"] = g.get("base_lr", recipe.lr)
            run.sched = _warmup_cosine(run.opt, steps * remaining, warmup_steps=int(cfg.warmup_epochs * steps))
            r.log(f"extending fine-tuning ({recipe.name}): epochs {start}-{cfg.epochs_finetune} on a new warm-up + cosine "
                  "schedule (optimizer moments and the best checkpoint kept)")  # fmt: skip
        else:
            run = self._start_finetune(recipe, steps, int(record.get("trial_steps") or steps))
            run.sched.load_state_dict(state["scheduler"])
            run.opt.load_state_dict(state["optimizer"])  # the scheduler's construction reset the current lr
            bad_epochs = state["bad_epochs"]
            r.log(f"resuming fine-tuning ({recipe.name}) at epoch {start}")
        if run.ema is not None and state.get("ema_state_dict") is not None:
            run.ema.module.load_state_dict(state["ema_state_dict"])
        return run, start, bad_epochs

    def _weight_average(self) -> Any:
        """timm's EMA of the fine-tuned weights, or None when --ema-decay is 0."""
        if self.cfg.ema_decay <= 0:
            return None
        from timm.utils import ModelEmaV3

        # Decay warm-up (1 - (1 + step)^-3/4, capped at --ema-decay): the average starts as the model and
        # widens with training, so a few hundred steps are enough; BatchNorm buffers are frozen and copied as is.
        return ModelEmaV3(self.model, decay=self.cfg.ema_decay, use_warmup=True, warmup_power=3 / 4)

    # -- results -----------------------------------------------------------------------------

    def write_manifest(self, status: str) -> None:
        if not self.dist.is_main:
            return
        ds = self.dataset
        base = self.manifest_base
        write_json(self.run_dir / layout.MANIFEST, {
            "format": RUN_FORMAT,
            "edgetl_version": __version__,
            "status": status,  # training | interrupted | finished
            "created": base.get("created", time.strftime("%Y-%m-%dT%H:%M:%S%z")),
            "command": base.get("command", " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])),
            "resumed": base.get("resumed", []),
            "seed": self.cfg.seed,
            "config": self.cfg.to_dict(),
            "device": str(self.device), "bf16_autocast": self.bf16, "workers": self.workers,
            "processes": {"world_size": self.dist.world_size, "per_node": self.dist.local_world_size,
                          "backend": ("nccl" if self.device.type == "cuda" else "gloo") if self.dist.active else None},
            "dataset": {
                "root": str(ds.root.resolve()), "kind": ds.kind, "fingerprint": ds.fingerprint(),
                "classes": ds.classes, "split_note": ds.split_note,
                "counts": {s: ls.class_counts(len(ds.classes)) for s, ls in ds.splits().items()},
            },
            "skipped_files": self.skipped,
            "duplicates": self.duplicates,
            "weights_source": getattr(self, "weights_source", None),
            "teacher": self.teacher_record,
            "timings": self.run_timings(),
            "host": host_record(),
        })  # fmt: skip

    def run_timings(self) -> dict[str, dict[str, Any]]:
        """Each stage's wall time over every session of the run: a resumed or extended run adds this
        session's time to what the manifest recorded before, so metrics never show only the last part."""
        return combine_stage_timings(self.manifest_base.get("timings", {}), self.timings)

    def finish(self, interrupted: bool = False) -> dict[str, Any]:
        metrics: dict[str, Any] = {"split": "val", "stages": {}}
        timings = self.run_timings()
        for stage in ("head", "finetune"):
            rows = [h for h in self.history if h["stage"] == stage]
            if rows:
                best_row = rows[0]
                for h in rows[1:]:
                    if Score(h["val_top1"], h["val_loss"]).better(Score(best_row["val_top1"], best_row["val_loss"])):
                        best_row = h
                # The stage's best row is the one selection would keep: its accuracy, not the best accuracy of any epoch.
                metrics["stages"][stage] = {
                    "epochs_run": len(rows), "best_epoch": best_row["epoch"], "best_val_loss": best_row["val_loss"],
                    "best_val_top1": best_row["val_top1"], "max_val_top1": max(h["val_top1"] for h in rows),
                    **timings.get(stage, {}),
                }  # fmt: skip
        if self.best and self.dist.is_main:
            m = classification_metrics(self.best["val_logits"], self.val_images.labels, self.classes)
            metrics["best"] = {"stage": self.best["stage"], "epoch": self.best["epoch"], "val_loss": self.best["val_loss"], **m}
            from edgetl.plots import plot_confusion, plot_curves

            plot_curves(self.history, self.run_dir / "curves.png")
            plot_confusion(m["confusion_matrix"], self.classes, self.run_dir / "confusion.png",
                           f"validation, {self.cfg.backbone} ({self.best['stage']} epoch {self.best['epoch']})")  # fmt: skip
        if self.recipe_record is not None:
            metrics["recipe"] = self.recipe_record
        if self.teacher_record is not None:
            metrics["teacher"] = self.teacher_record
        metrics["selection"] = "highest validation top-1, then lowest validation cross-entropy"
        metrics["interrupted"] = interrupted
        if not self.dist.is_main:
            return metrics
        write_json(self.run_dir / layout.METRICS, metrics)
        self.write_manifest("interrupted" if interrupted else "finished")
        return metrics


def lr_of_last_step(sched: torch.optim.lr_scheduler.LambdaLR) -> float:
    """The learning rate the last optimizer step used (of the first parameter group), for the epoch's log line and
    history.csv. get_last_lr() is the rate of the next step: 0 after a cosine schedule's last step, which read as if
    the last epoch had not trained."""
    if sched.last_epoch <= 0:
        return float(sched.get_last_lr()[0])
    return float(sched.base_lrs[0] * sched.lr_lambdas[0](sched.last_epoch - 1))


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
    keep_feature_cache: bool = False,
    val_data: str | None = None,
) -> TrainResult:
    """Train a classifier on the images at `data` (a folder, IDX files, or a WebDataset shard pattern
    with `val_data` its validation shards); return the run folder and its metrics.

    Under torchrun, every process calls this: rank 0 checks the input, creates and locks the run
    folder and lists the data, and hands the file lists to the others (see edgetl.distributed)."""
    tune_malloc()
    d = Dist.from_env(cfg.device)
    reporter = (reporter or Reporter()) if d.is_main else Reporter(quiet=True)
    data = str(data)
    state: dict[str, Any] = {"run_dir": None, "made": [], "started": False}
    try:
        with contextlib.ExitStack() as stack:

            def prepare() -> tuple[tuple[str, dict[str, Any]], ImageDataset]:
                # Fail on bad input before a run folder is created or an image decoded.
                shards = is_shard_pattern(data)
                if not shards and not Path(data).exists():
                    raise EdgetlError(f"data path does not exist: {data}")
                get_entry(cfg.backbone)
                data_name = Path(data).resolve().parent.name if shards else Path(data).resolve().name
                run_dir = Path(out) if out is not None else default_run_dir(name, data_name, cfg.backbone)
                if not shards:
                    check_run_outside_data(run_dir, Path(data), given=out is not None)
                state["run_dir"], state["made"] = run_dir, check_new_run_folder(run_dir)  # a failure from here removes them
                stack.enter_context(locked(run_dir, "training"))
                if is_run(run_dir):  # another process finished a run here between our check and the lock
                    raise EdgetlError(f"{run_dir} already holds a run: use --resume {run_dir} to continue it, or another --out")
                ds = load_dataset(data, cfg.val_fraction, cfg.seed, cfg.limit_train, cfg.limit_val, val_data, cfg.hold_out_fold)
                return (str(run_dir), ds.split_record()), ds

            (run_dir_name, record), ds = d.main_first(prepare)
            run_dir = Path(run_dir_name)
            if ds is None:  # the other ranks train on the lists rank 0 made
                ds = dataset_from_record(record)
            trainer = Trainer(cfg, ds, run_dir, reporter, keep_feature_cache, d, record=record)
            trainer.build_model()
            trainer.decode()
            trainer.prepare_teacher()
            reporter.log(f"run folder: {run_dir}")
            # From here on the run is resumable: the file lists, the config and the starting weights are on disk.
            if d.is_main:
                # With the training images' thumbnails beside it, eval finds look-alikes of them among what it scores.
                vectors = write_train_vectors(run_dir, trainer.train_images, trainer.train_vectors)
                write_json(run_dir / layout.SPLITS, {**trainer.split_record, "train_vectors": vectors})
            trainer.write_manifest("training")
            trainer.save_last("head", 0)
            state["started"] = True
            return _run_stages(trainer, "head", None)
    except BaseException:
        if d.is_main and not state["started"] and state["run_dir"] is not None:
            _remove_unstarted_run(state["run_dir"], state["made"])
        raise
    finally:
        d.close()


def _remove_unstarted_run(run_dir: Path, made: Sequence[Path]) -> None:
    """A run that failed or was interrupted before its first record leaves no folder behind: neither its
    own nor the parents made for it (`made`, deepest first: `models/` of the default run folder), where
    they are still empty. A folder that was there already keeps everything but the run's records."""
    if made:
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in made[1:]:
            try:
                parent.rmdir()
            except OSError:  # not empty (another run's folder appeared in it), or gone
                break
    else:
        for name in (layout.SPLITS, layout.MANIFEST, layout.LAST, layout.LOCK):
            (run_dir / name).unlink(missing_ok=True)


def resume(
    run: str | os.PathLike[str],
    reporter: Reporter | None = None,
    epochs_finetune: int | None = None,
    allow_data_change: bool = False,
    keep_feature_cache: bool = False,
) -> TrainResult:
    """Continue an interrupted run from its last completed epoch, on the recorded file lists, with
    the same or a different number of processes (the global batch, so the schedule, does not change).

    `epochs_finetune` extends a finished or interrupted run to that many fine-tune epochs: the ones
    not yet run get a fresh warm-up + cosine schedule (see Trainer.stage_finetune)."""
    tune_malloc()
    d = Dist.from_env(_recorded_device(run))
    reporter = (reporter or Reporter()) if d.is_main else Reporter(quiet=True)
    try:
        with contextlib.ExitStack() as stack:

            def prepare() -> tuple[dict[str, Any], ImageDataset]:
                folder = RunFolder.open(run)
                stack.enter_context(locked(folder.path, "resume"))
                plan = _resume_plan(folder, epochs_finetune)
                ds = folder.dataset(allow_changed=allow_data_change, reporter=reporter)
                plan["record"] = ds.split_record()
                return plan, ds

            plan, ds = d.main_first(prepare)
            if ds is None:
                ds = dataset_from_record(plan["record"])
            return _resume_from_plan(plan, ds, reporter, keep_feature_cache, d)
    finally:
        d.close()


def _recorded_device(run: str | os.PathLike[str]) -> str:
    """The `--device` a run was trained with, read before the process group exists (so a CPU run does not
    open CUDA on a GPU machine); "auto" when it cannot be read here: rank 0 then reports the real problem."""
    try:
        return str(RunFolder.open(run).manifest["config"]["device"])
    except (EdgetlError, KeyError, TypeError):
        return "auto"


def _resume_plan(folder: RunFolder, epochs_finetune: int | None) -> dict[str, Any]:
    """What rank 0 reads from the run folder to continue it: the config, the last and best states."""
    manifest = folder.manifest
    if folder.lineage:
        raise EdgetlError(f"{folder.path} was made by `edgetl adapt` from {folder.lineage.get('parent_run')}: it has no "
                          "training to resume (adapt the parent again, or train a new run)")  # fmt: skip
    cfg = TrainConfig.from_dict(manifest["config"], f"{folder.path / 'manifest.json'}: config")
    last = checkpoint.read(folder.path, checkpoint.LAST_NAME) if (folder.path / checkpoint.LAST_NAME).is_file() else None
    stage, epoch = (last["stage"], int(last["epoch"])) if last else ("head", 0)
    bad_epochs = int(last.get("bad_epochs") or 0) if last else 0
    recipe = last.get("recipe") if last else None
    finished = _finished(cfg, stage, epoch, bad_epochs, recipe)
    restart = False
    if epochs_finetune is not None and epochs_finetune != cfg.epochs_finetune:
        if stage == "finetune" and recipe is not None and recipe.get("chosen") is None:
            raise EdgetlError(f"{folder.path}: --recipe auto kept the stage-1 head because every fine-tune trial was worse "
                              f"({recipe.get('why', '')}); to fine-tune anyway, train again with --recipe finetune")  # fmt: skip
        done = epoch if stage == "finetune" else 0
        if epochs_finetune <= done:
            raise EdgetlError(f"--epochs-finetune {epochs_finetune}: this run has already done {done} fine-tune epoch(s)")
        restart = stage == "finetune"
        cfg = replace(cfg, epochs_finetune=epochs_finetune)
    elif finished:
        raise EdgetlError(f"{folder.path} finished training: nothing to resume (extend it with --resume {folder.path} "
                          f"--epochs-finetune N)")  # fmt: skip
    best = checkpoint.read(folder.path) if last is not None and last.get("best_stage") else None
    return {"run_dir": str(folder.path), "manifest": manifest, "cfg": cfg.to_dict(), "last": last, "best": best,
            "restart": restart, "stage": stage, "epoch": epoch, "bad_epochs": bad_epochs}  # fmt: skip


def _resume_from_plan(plan: dict[str, Any], ds: ImageDataset, reporter: Reporter, keep_feature_cache: bool, d: Dist) -> TrainResult:
    run_dir, manifest, last, restart = Path(plan["run_dir"]), plan["manifest"], plan["last"], plan["restart"]
    cfg = TrainConfig.from_dict(plan["cfg"])
    stage, epoch, bad_epochs = plan["stage"], plan["epoch"], plan["bad_epochs"]
    trainer = Trainer(cfg, ds, run_dir, reporter, keep_feature_cache, d, record=plan["record"])
    trainer.manifest_base = {**manifest, "resumed": [*manifest.get("resumed", []), time.strftime("%Y-%m-%dT%H:%M:%S%z")]}
    if last is not None and "timings" in last:
        # last.pt's times run up to its epoch, the manifest's only to the last session that ended in order.
        trainer.manifest_base["timings"] = last["timings"]
    # With last.pt the weights come from it (the ImageNet file need not be here any more); without, from ImageNet.
    weights_source = (manifest.get("weights_source") or f"resumed from {checkpoint.LAST_NAME}") if last else None
    trainer.build_model(weights_source=weights_source)
    trainer.decode()
    trainer.prepare_teacher()
    if last is None:
        reporter.log(f"resuming {run_dir}: no epoch had finished, starting training from the beginning")
        trainer.write_manifest("training")
        trainer.save_last("head", 0)
        return _run_stages(trainer, "head", None)
    if last["config"]["labels"] != trainer.classes:
        raise EdgetlError(f"the data at {ds.root} no longer has the classes this run was trained on")
    trainer.history = list(last.get("history", []))
    trainer.model.load_state_dict(last["state_dict"])
    best = plan["best"]
    best_row = next((h for h in trainer.history if (h["stage"], h["epoch"]) == (last.get("best_stage"), last.get("best_epoch"))), None)
    if best is not None and best_row is not None:
        trainer.best_score = Score(float(best_row["val_top1"]), float(best_row["val_loss"]))
        trainer.best_state = best["state_dict"]
        # Validation logits of the best model are needed for the final metrics; recompute them (fp32).
        model = build_classifier(cfg.backbone, len(trainer.classes), cfg.hidden, cfg.dropout)
        model.load_state_dict(best["state_dict"])
        logits = trainer._val_logits(model.to(trainer.device))
        trainer.best = {"stage": best["stage"], "epoch": best["epoch"], "val_loss": best["val_loss"], "val_logits": logits}
    state = {"optimizer": last.get("optimizer"), "scheduler": last.get("scheduler"), "epoch": epoch,
             "bad_epochs": 0 if restart else bad_epochs, "ema_state_dict": last.get("ema_state_dict"),
             "l2sp_anchor": last.get("l2sp_anchor"),
             "restart_schedule": restart, "recipe": last.get("recipe")}  # fmt: skip
    if stage == "head" and not _head_done(cfg, epoch, bad_epochs):
        reporter.log(f"resuming {run_dir} in stage 1 after epoch {epoch}")
        return _run_stages(trainer, "head", state)
    if stage == "head":
        reporter.log(f"resuming {run_dir}: stage 1 completed, starting fine-tuning")
        return _run_stages(trainer, "finetune", None)
    reporter.log(f"resuming {run_dir} at fine-tune epoch {epoch + 1}")
    return _run_stages(trainer, "finetune", state)


def _head_done(cfg: TrainConfig, epoch: int, bad_epochs: int) -> bool:
    return epoch >= cfg.epochs_head or bad_epochs >= cfg.patience_head > 0


def _finished(cfg: TrainConfig, stage: str, epoch: int, bad_epochs: int, recipe: dict[str, Any] | None) -> bool:
    if stage == "head":
        return _head_done(cfg, epoch, bad_epochs) and (cfg.epochs_finetune == 0 or cfg.recipe == "head")
    if recipe is not None and recipe.get("chosen") is None:
        return True  # --recipe auto kept the head
    return epoch >= cfg.epochs_finetune or (bad_epochs >= cfg.patience > 0 and epoch >= cfg.min_epochs_finetune)


# Timing fields that add up over the sessions of a resumed run; the rest describe the latest session
# (trial_seconds among them: it is read from the recipe record, which a resumed run carries over whole).
_ADDITIVE_TIMINGS = ("seconds", "train_seconds", "feature_cache_seconds", "images")


def combine_stage_timings(before: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Stage timings of earlier sessions (`before`, from the manifest) and of this one (`now`): a stage that ran
    in both gets the sums of its times and images, its images/s recomputed from them, and its session count."""
    combined: dict[str, dict[str, Any]] = {}
    for stage in ("head", "finetune"):
        old, new = before.get(stage), now.get(stage)
        if old is None or new is None:
            if old is not None or new is not None:
                combined[stage] = dict(old if new is None else new)
            continue
        rate_over = "train_seconds" if stage == "finetune" else "seconds"
        # Records written before image counts were kept: the count from their rate and time.
        old, new = ({**r, "images": r.get("images", round((r.get("images_per_second") or 0.0) * (r.get(rate_over) or 0.0)))}
                    for r in (old, new))  # fmt: skip
        merged = {**old, **new}
        for key in _ADDITIVE_TIMINGS:
            if key in old or key in new:
                merged[key] = (old.get(key) or 0) + (new.get(key) or 0)
        merged["images_per_second"] = merged["images"] / merged[rate_over] if merged.get(rate_over) else None
        merged["sessions"] = int(old.get("sessions", 1)) + int(new.get("sessions", 1))
        combined[stage] = merged
    return combined


def worker_stopped(exc: BaseException) -> bool:
    """A DataLoader worker stopped by SIGTERM or SIGINT. Those go to the whole process group (torchrun stopping
    the job, a scheduler, Ctrl-C in a terminal), and PyTorch can report the worker's death before this process's
    own handler runs: the run is being interrupted, not failing. (Seen on a 16-core machine under torchrun.)"""
    text = str(exc)
    return isinstance(exc, RuntimeError) and "DataLoader worker" in text and any(s in text for s in ("Terminated", "Interrupt"))


def _run_stages(trainer: Trainer, from_stage: str, resume_state: dict[str, Any] | None) -> TrainResult:
    cfg = trainer.cfg
    if trainer.dist.is_main:
        trainer.tb = TrainLog(trainer.run_dir)
    try:
        if from_stage == "head":
            trainer.stage_head(resume_state)
            resume_state = None
        if cfg.epochs_finetune > 0 and cfg.recipe != "head":
            trainer.stage_finetune(resume_state)
        trainer.dist.barrier()  # nobody removes its share of the decoded images while another still reads it
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt) and not worker_stopped(exc) and not (trainer.dist.active and lost_peer(exc)):
            raise
        # Whatever was saved at the end of the last completed epoch is good; finish the reports with it,
        # without being cut short by a second signal (torchrun sends SIGTERM right after a peer dies) or by
        # PyTorch's SIGCHLD handler raising for the next DataLoader worker that the same signal stopped.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        trainer.remove_feature_cache()
        if trainer.history:
            trainer.finish(interrupted=True)
        else:
            trainer.write_manifest("interrupted")
        raise TrainingInterrupted(str(trainer.run_dir)) from None
    finally:
        if trainer.tb is not None:
            trainer.tb.close()
    metrics = trainer.finish()
    best = metrics.get("best", {})
    if best:
        top5 = f", top-5 {best['top5']:.2%}" if best.get("top5") is not None else ""
        trainer.r.log(
            f"best: {best['stage']} epoch {best['epoch']}, val top-1 {best['top1']:.2%}{top5}, "
            f"macro-F1 {best['macro_f1']:.3f} -> {trainer.run_dir / checkpoint.BEST_NAME}"
        )
    return TrainResult(trainer.run_dir, metrics)
