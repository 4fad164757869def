"""L2-SP: stage 2 pulls the pretrained backbone weights back toward their starting point instead of toward zero.

Li, Grandvalet and Davoine (ICML 2018) regularise fine-tuning with alpha/2 * ||w - w0||^2 on the pretrained
weights w0. Added to the loss, Adam would divide that gradient by its per-weight scale and the pull would
depend on each weight's gradient history; so it is applied here the way AdamW applies weight decay
(Loshchilov and Hutter, ICLR 2019), decoupled: after each optimizer step every anchored weight moves a
fraction lr * strength of the way back to its starting value, with lr its group's current (scheduled,
layer-decayed) rate. The anchored weights' own AdamW decay toward zero is off (their groups carry
weight_decay 0); the new head keeps plain weight decay, having no starting point worth keeping.
"""

from __future__ import annotations

import torch
from torch import nn

from edgetl.errors import EdgetlError

GROUP_KEY = "l2sp"  # an optimizer group's pull strength toward its starting point (absent or 0: no pull)


def backbone_anchor(model: nn.Module) -> dict[str, torch.Tensor]:
    """The starting point: a detached copy of every backbone parameter (by name), taken before stage 2 moves it."""
    return {name: p.detach().clone() for name, p in model.backbone.named_parameters()}  # type: ignore[union-attr]


class StartingPointPull:
    """Called after each optimizer step: moves the anchored parameters of `opt` toward `anchor`."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, anchor: dict[str, torch.Tensor]) -> None:
        names = {id(p): name for name, p in model.backbone.named_parameters()}  # type: ignore[union-attr]
        self.groups: list[tuple[dict, list[torch.Tensor], list[torch.Tensor]]] = []
        for g in opt.param_groups:
            if not g.get(GROUP_KEY):
                continue
            params = list(g["params"])
            missing = [p for p in params if id(p) not in names or names[id(p)] not in anchor]
            if missing:
                # Only a mismatched checkpoint gets here (a resume whose anchor lacks a layer): refuse rather than guess.
                raise EdgetlError(f"--l2sp: {len(missing)} backbone parameters have no recorded starting point")
            # empty_like keeps each parameter's device, dtype and layout (channels_last convolutions included).
            targets = [torch.empty_like(p).copy_(anchor[names[id(p)]]) for p in params]
            self.groups.append((g, params, targets))

    @torch.no_grad()
    def __call__(self) -> None:
        for g, params, targets in self.groups:
            step = min(1.0, g["lr"] * g[GROUP_KEY])  # 1: back at the start; more would overshoot it
            for p, target in zip(params, targets, strict=True):
                p.lerp_(target, step)  # w <- w + step * (w0 - w)

    @torch.no_grad()
    def distance(self) -> float:
        """||w - w0|| over the anchored parameters: how far stage 2 has moved the backbone."""
        total = sum(float((p - t).float().pow(2).sum()) for _, ps, ts in self.groups for p, t in zip(ps, ts, strict=True))
        return total**0.5
