"""Typed, frozen options for each stage. None means "use the backbone's or stage's default"."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from edgetl.backbones import DEFAULT_BACKBONE
from edgetl.errors import EdgetlError
from edgetl.recipes import RECIPES, parse_candidates

AUGMENT_POLICIES = ("none", "light", "trivial")
DISTILL_MODES = ("cached", "consistent")
# Below 16 px a 5-stage network has no spatial extent left; above 1024 px one decoded image is 3 MB and
# a few thousand fill the memory of the machines edgetl targets.
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 16, 1024


@dataclass(frozen=True)
class TrainConfig:
    backbone: str = DEFAULT_BACKBONE
    input_size: int | None = None  # None: the backbone's pretrained size
    # stage 1: frozen base, new head
    epochs_head: int = 30
    lr_head: float = 1e-3
    head_batch_size: int = 128
    cache_features: bool = True  # run the frozen base once and train the head on cached features
    cache_views: int = 1  # >1: also cache K-1 augmented views of every training image
    hidden: int = 0
    dropout: float = 0.2
    # Stage 1 stops after this many epochs without a better head (0: runs all epochs); the best head,
    # not the last, is what stage 2 starts from.
    patience_head: int = 5
    # stage 2: fine-tune the top
    epochs_finetune: int = 8
    # auto: short trials of a few fine-tune recipes pick one, or none (see edgetl.recipes);
    # finetune: --unfreeze blocks at --lr-finetune; head: stage 1 only.
    recipe: str = "auto"
    recipe_candidates: str | None = None  # --recipe auto's candidates, UNFREEZE@LR[/DECAY],... (None: built-in set)
    lr_finetune: float | None = None  # None: lr_head / 10
    unfreeze: str = "3"  # number of top blocks, or "all" (--recipe finetune)
    head_lr_scale: float = 1.0  # the head's stage-2 learning rate as a multiple of the blocks' top rate
    # >0: L2-SP (edgetl.l2sp): stage 2 pulls the backbone's weights toward their pretrained values with this
    # strength (a fraction lr * l2sp per step) instead of decaying them toward zero; 0: plain weight decay.
    l2sp: float = 0.0
    batch_size: int = 32
    warmup_epochs: float = 1.0
    patience: int = 3  # stage 2: epochs without a better checkpoint than stage 2's own best
    min_epochs_finetune: int = 2  # stage 2 is not stopped early before this many epochs
    # knowledge distillation from a trained run's checkpoint (its logits on the training images, cached once);
    # several runs (a tuple): cross-fitted teachers, each scoring the training images it did not train on, or an
    # ensemble of teachers that each trained on all of them (edgetl.distill.teacher_coverage tells which).
    teacher: str | tuple[str, ...] | None = None
    distill_alpha: float = 0.5  # weight of the teacher's soft labels; 1 - alpha on the true labels
    distill_temperature: float = 2.0
    # cached: the teacher's logits of each whole training image, computed once (a lookup per step);
    # consistent: in stage 2 the teacher sees the very crop (and mix) the student trains on, one teacher
    # forward per step (Beyer et al., CVPR 2022, "a good teacher is patient and consistent").
    distill_mode: str = "cached"
    # >0: validate and keep an exponential moving average of the fine-tuned weights (timm's ModelEmaV3,
    # decay warmed up from 0 so short fine-tunes still average over a useful window).
    ema_decay: float = 0.0
    # Stage 2 only (stage 1 trains on cached features of whole images): timm's Mixup with these Beta(alpha)
    # parameters (0: off). With both >0 each batch is mixed one way or the other, half and half.
    mixup: float = 0.0
    cutmix: float = 0.0
    # Random erasing (Zhong et al., AAAI 2020; torchvision's RandomErasing) of each augmented training image with
    # this probability (0: off): a rectangle of 2-33% of the crop is set to the dataset mean.
    erase: float = 0.0
    # both stages
    label_smoothing: float = 0.1
    weight_decay: float = 0.01
    augment: str = "light"
    # Smallest area fraction of the random resized crop. 0.35 keeps the object in view on photos;
    # centred, frame-filling images (Fashion-MNIST, product shots) want 0.7-1.0.
    crop_scale: float = 0.35
    # Where training crops are cut from: "resized" (default) from the evaluation-size image, the smallest crops
    # upsampled; "full" keeps training images large enough that they are not. On clothing-small both scored
    # 92.20% on test, "resized" higher on validation (91.79 vs 91.20%) and 1.4x faster in stage 2.
    crop_source: str = "resized"
    balance: bool = False
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (CUDA; autocast for training steps; evaluation stays fp32)
    channels_last: bool = True
    # Stage 2 steps through torch.compile (inductor). Off by default: on 2 Xeon cores it gave 1.18x images/s
    # for Lite0, all blocks at 224 px (benchmarks/results/train_throughput_all-blocks.md), and 1.03x at 64 px,
    # batch 64 (train_throughput_fm64-b64.md), but compiling costs about a minute per recipe tried, so it pays
    # only when stage 2 runs for many minutes at a large input size.
    compile: bool = False
    workers: int | None = None
    # data
    val_fraction: float = 0.2
    limit_train: int | None = None
    limit_val: int | None = None
    # K/N: train without fold K of N of the training images (edgetl.data.fold_of), e.g. the N teachers of a
    # cross-fitted --teacher, each of which scores the fold it did not see.
    hold_out_fold: str | None = None
    strict: bool = False
    # weights
    pretrained: bool = True
    weights: str | None = None

    def __post_init__(self) -> None:
        if self.augment not in AUGMENT_POLICIES:
            raise EdgetlError(f"--augment must be one of {', '.join(AUGMENT_POLICIES)}, got {self.augment!r}")
        if not 0.0 < self.crop_scale <= 1.0:
            raise EdgetlError(f"--crop-scale is the smallest crop area fraction, in (0, 1]; got {self.crop_scale}")
        if self.crop_source not in ("full", "resized"):
            raise EdgetlError(f"--crop-source must be full or resized, got {self.crop_source!r}")
        for name in ("mixup", "cutmix"):
            if not 0.0 <= getattr(self, name) <= 10.0:
                raise EdgetlError(f"--{name} is a Beta distribution's alpha in [0, 10] (0: off), got {getattr(self, name)}")
        if not 0.0 <= self.erase <= 1.0:
            raise EdgetlError(f"--erase is the probability of erasing a rectangle of a training image, in [0, 1]; got {self.erase}")
        if self.erase > 0 and self.augment == "none":
            raise EdgetlError("--erase is part of the training augmentation, which --augment none turns off")
        if self.distill_mode not in DISTILL_MODES:
            raise EdgetlError(f"--distill-mode must be one of {', '.join(DISTILL_MODES)}, got {self.distill_mode!r}")
        if isinstance(self.teacher, tuple) and (len(self.teacher) < 2 or len(set(self.teacher)) != len(self.teacher)):
            raise EdgetlError(f"several --teacher runs must be at least two different ones, got {list(self.teacher)}")
        if isinstance(self.teacher, tuple) and self.distill_mode != "cached":
            raise EdgetlError(f"--distill-mode {self.distill_mode} runs one teacher on every crop; several --teacher "
                              "runs (cross-fitted or an ensemble) score whole images, in --distill-mode cached")
        if self.distill_mode != "cached" and self.teacher is None:
            raise EdgetlError(f"--distill-mode {self.distill_mode} says how to distil from a --teacher, and none was given")
        if self.mixes and self.teacher is not None and self.distill_mode == "cached":
            # The cached teacher logits are of whole, unmixed images; a mixed image has no teacher label.
            raise EdgetlError("--mixup/--cutmix cannot be combined with --teacher in --distill-mode cached: the teacher's "
                              "cached logits are of unmixed images (--distill-mode consistent scores the mixed ones)")
        if self.mixes and self.batch_size % 2:
            raise EdgetlError(f"--mixup/--cutmix pair the images of a batch: --batch-size must be even, got {self.batch_size}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise EdgetlError(f"--ema-decay must be in [0, 1) (0 turns the weight average off), got {self.ema_decay}")
        if self.unfreeze != "all" and not (self.unfreeze.isdigit()):
            raise EdgetlError(f"--unfreeze takes a number of top blocks or 'all', got {self.unfreeze!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise EdgetlError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise EdgetlError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.recipe not in RECIPES:
            raise EdgetlError(f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.recipe_candidates is not None:
            parse_candidates(self.recipe_candidates, self.finetune_lr)  # a bad item fails now, not after stage 1
        if not 0.0 <= self.l2sp <= 100.0:
            raise EdgetlError(f"--l2sp must be in [0, 100] (0 turns it off), got {self.l2sp}")
        if self.l2sp > 0 and not self.pretrained:
            raise EdgetlError("--l2sp pulls the backbone toward its pretrained weights, and --no-pretrained has none")
        if not 0.0 < self.head_lr_scale <= 100.0:
            raise EdgetlError(f"--head-lr-scale must be in (0, 100], got {self.head_lr_scale}")
        if not 0.0 < self.distill_alpha <= 1.0 or self.distill_temperature <= 0:
            raise EdgetlError("--distill-alpha must be in (0, 1] and --distill-temperature above 0")
        for name in ("epochs_head", "epochs_finetune", "patience", "patience_head", "min_epochs_finetune"):
            if getattr(self, name) < 0:
                raise EdgetlError(f"--{name.replace('_', '-')} must be >= 0")
        if self.epochs_head < 1:
            raise EdgetlError("--epochs-head must be at least 1: the new head has to be trained before fine-tuning")
        if self.input_size is not None and not MIN_INPUT_SIZE <= self.input_size <= MAX_INPUT_SIZE:
            raise EdgetlError(f"--input-size must be from {MIN_INPUT_SIZE} to {MAX_INPUT_SIZE} pixels, got {self.input_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise EdgetlError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        for name in ("limit_train", "limit_val"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise EdgetlError(f"--{name.replace('_', '-')} must be at least 1")
        if self.hold_out_fold is not None:
            parse_fold(self.hold_out_fold)
        if self.batch_size < 1 or self.head_batch_size < 1 or self.cache_views < 1:
            raise EdgetlError("batch sizes and --cache-views must be at least 1")
        # A negative rate climbs the loss, NaN or infinity ruins the first step: refused before any image is read.
        for name, lr in (("lr-head", self.lr_head), ("lr-finetune", self.lr_finetune)):
            if lr is not None and not (math.isfinite(lr) and 0.0 < lr <= 10.0):
                raise EdgetlError(f"--{name} must be a learning rate in (0, 10], got {lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise EdgetlError(f"--dropout is the probability of dropping a feature, in [0, 1); got {self.dropout}")
        if not 0 <= self.hidden <= 65536:
            raise EdgetlError(f"--hidden is the width of the head's hidden layer (0: none), up to 65536; got {self.hidden}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise EdgetlError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not math.isfinite(self.distill_temperature):
            raise EdgetlError(f"--distill-temperature must be finite, got {self.distill_temperature}")

    @property
    def mixes(self) -> bool:
        """Whether stage 2 mixes its batches (--mixup / --cutmix)."""
        return self.mixup > 0 or self.cutmix > 0

    @property
    def teachers(self) -> tuple[str, ...]:
        """The --teacher runs: none, one, or several cross-fitted ones."""
        if self.teacher is None:
            return ()
        return self.teacher if isinstance(self.teacher, tuple) else (self.teacher,)

    @property
    def finetune_lr(self) -> float:
        return self.lr_finetune if self.lr_finetune is not None else self.lr_head / 10

    @property
    def unfreeze_blocks(self) -> int | None:
        return None if self.unfreeze == "all" else int(self.unfreeze)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "the recorded training config") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        # Runs recorded before recipes and per-stage early stopping existed resume as they were trained.
        values.setdefault("recipe", "finetune")
        values.setdefault("patience_head", 0)
        values.setdefault("min_epochs_finetune", 0)
        if isinstance(values.get("teacher"), list):  # JSON has no tuples
            values["teacher"] = tuple(values["teacher"])
        for f in fields(cls):
            if f.name in values and not has_type(values[f.name], str(f.type)):
                # A hand-edited manifest: say which value is wrong rather than fail later in arithmetic on it.
                raise EdgetlError(f"{source} has {f.name}={values[f.name]!r}, which is not "
                                  f"of type {f.type}")
        return cls(**values)


def parse_fold(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N): fold K (0-based) of N."""
    k, slash, n = text.partition("/")
    if not slash or not k.strip().isdigit() or not n.strip().isdigit() or not 0 <= int(k) < int(n) or int(n) < 2:
        raise EdgetlError(f"--hold-out-fold takes K/N, fold K (0 to N-1) of N >= 2 folds of the training images, got {text!r}")
    return int(k), int(n)


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def has_type(value: Any, annotation: str) -> bool:
    """Whether a JSON value fits a field's annotation ('int', 'float | None', ...); bool is not an int here."""
    for name in (part.strip() for part in annotation.split("|")):
        if name == "None" and value is None:
            return True
        if name in _TYPES and isinstance(value, _TYPES[name]) and (name == "bool" or not isinstance(value, bool)):
            return True
        if name == "tuple[str, ...]" and isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            return True
    return False
