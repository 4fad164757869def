"""How stage 2 fine-tunes, and how a run decides between recipes and between checkpoints.

Model selection: a checkpoint is better when its validation top-1 is higher, and at equal top-1 when its
validation cross-entropy (without label smoothing) is lower. Top-1 is what the user deploys for; loss
alone can prefer a less accurate model (a confident head against a fine-tuned model that is right more
often but less sure), and loss with label smoothing is on a different scale in each stage. The loss
breaks ties, which on a few hundred validation images are common.

`--recipe auto` tries each candidate fine-tune for a short trial (the first steps of its real schedule,
from the best stage-1 head), keeps going with the best one, and fine-tunes not at all when every trial is
worse than the head on both top-1 and loss - but only when the trials were whole epochs. A trial cut
short at TRIAL_IMAGES is a few percent of an epoch of a large set, judged at the top of the warm-up where
a fine-tune is most disturbed: on Fashion-MNIST (48k images) every 1024-image trial scored 4-16 points
below the head, and the fine-tune that stopping skipped was worth about 6 points. There the best trial goes
on, and model selection still keeps the head if no fine-tune epoch beats it. Only validation data is used.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from edgetl.errors import EdgetlError

RECIPES = ("auto", "finetune", "head")
# The built-in candidates of --recipe auto, as multiples of the fine-tune learning rate: the top blocks
# (what works for photos close to ImageNet), and the whole base with layer-wise decay at 1x and 3x
# (data far from ImageNet, e.g. grey 28 px thumbnails, needs the lower layers to move too).
DEFAULT_AUTO_CANDIDATES = "3@1x,all@1x/0.7,all@3x/0.7"
# A trial is at most one epoch and at most this many images: enough steps to see which way a recipe goes.
TRIAL_IMAGES = 1024


@dataclass(frozen=True)
class FinetuneRecipe:
    unfreeze: str  # number of top blocks, or "all"
    lr: float
    llrd: float = 1.0  # layer-wise learning-rate decay per block below the top (1: one rate for all)

    @property
    def name(self) -> str:
        where = "all blocks" if self.unfreeze == "all" else f"top {self.unfreeze} blocks"
        return f"{where} @ lr {self.lr:.1e}" + (f", layer decay {self.llrd:g}" if self.llrd != 1.0 else "")

    @property
    def unfreeze_blocks(self) -> int | None:
        return None if self.unfreeze == "all" else int(self.unfreeze)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "name": self.name}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneRecipe:
        return cls(str(d["unfreeze"]), float(d["lr"]), float(d.get("llrd", 1.0)))


def parse_candidates(spec: str, base_lr: float) -> list[FinetuneRecipe]:
    """'UNFREEZE@LR[/DECAY],...': UNFREEZE a number of top blocks or `all`; LR a rate (1e-4) or a
    multiple of the fine-tune rate (3x); DECAY the layer-wise learning-rate decay (default 1)."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        try:
            unfreeze, _, rest = item.partition("@")
            lr_text, _, decay_text = rest.partition("/")
            if unfreeze != "all" and not unfreeze.isdigit():
                raise ValueError
            lr = float(f"{float(lr_text[:-1]) * base_lr:.6g}") if lr_text.endswith("x") else float(lr_text)
            decay = float(decay_text) if decay_text else 1.0
            if not (lr > 0 and math.isfinite(lr) and 0 < decay <= 1):
                raise ValueError
        except ValueError:
            raise EdgetlError(f"--recipe-candidates: cannot read {item!r}; write UNFREEZE@LR[/DECAY] items separated by "
                              "commas, e.g. 3@1e-4,all@3x/0.7 (UNFREEZE a block count or all, LR a rate or a multiple "
                              "of --lr-finetune, DECAY in (0, 1])") from None  # fmt: skip
        out.append(FinetuneRecipe(unfreeze, lr, decay))
    if not out:
        raise EdgetlError("--recipe-candidates is empty")
    return out


def candidates(recipe: str, unfreeze: str, lr: float, spec: str | None) -> list[FinetuneRecipe]:
    """The fine-tune recipes a run considers: the one given (`finetune`), the auto set, or none (`head`)."""
    if recipe == "head":
        return []
    if recipe == "finetune":
        return [FinetuneRecipe(unfreeze, lr)]
    return parse_candidates(spec or DEFAULT_AUTO_CANDIDATES, lr)


@dataclass(frozen=True)
class Score:
    """Validation top-1 and cross-entropy of one checkpoint; `better` is the selection rule."""

    top1: float
    loss: float

    def better(self, other: Score | None) -> bool:
        if other is None:
            return True
        if self.top1 != other.top1:
            return self.top1 > other.top1
        return self.loss < other.loss

    def to_dict(self) -> dict[str, float]:
        return {"val_top1": self.top1, "val_loss": self.loss}


def choose(head: Score, trials: list[tuple[FinetuneRecipe, Score]], whole_epoch: bool = True) -> tuple[FinetuneRecipe | None, str]:
    """The recipe to continue with after the trials (None: keep the head, skip stage 2) and why.
    `whole_epoch`: the trials were whole first epochs; only then can being worse than the head stop stage 2."""
    if not trials:
        return None, "no fine-tune recipe to try"
    recipe, score = trials[0]
    for r, s in trials[1:]:
        if s.better(score):
            recipe, score = r, s
    others = "; ".join(f"{r.name}: {s.top1:.2%} / {s.loss:.4f}" for r, s in trials if r is not recipe)
    seen = f"{recipe.name} scored {score.top1:.2%} top-1 / {score.loss:.4f} loss on validation after its trial"
    seen += f" (others: {others})" if others else ""
    head_text = f"the stage-1 head's {head.top1:.2%} / {head.loss:.4f}"
    if score.top1 < head.top1 and score.loss > head.loss:
        if whole_epoch:
            return None, f"{seen}: worse than {head_text} on both, so fine-tuning stops here and the head is kept"
        return recipe, (f"{seen}: worse than {head_text} on both, but a trial shorter than an epoch cannot tell whether "
                        f"fine-tuning pays; continuing with {recipe.name} (the head stays the kept checkpoint unless an "
                        "epoch beats it)")  # fmt: skip
    return recipe, f"{seen}; {head_text}: continuing with {recipe.name}"
