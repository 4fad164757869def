"""The classifier edgetl trains: a timm feature extractor and a small head, with freezing rules.

One head contract for every backbone: timm with `num_classes=0` returns pooled features of size
`num_features`, and our head maps them to logits. Freezing covers BatchNorm: a frozen layer keeps
its running statistics, because a few hundred images would otherwise overwrite ImageNet's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from edgetl.backbones import create_feature_extractor
from edgetl.l2sp import GROUP_KEY as L2SP_GROUP_KEY


@dataclass(frozen=True)
class HeadConfig:
    num_features: int
    num_classes: int
    hidden: int = 0  # 0: dropout + linear; >0: linear -> ReLU -> dropout -> linear
    dropout: float = 0.2

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def build_head(cfg: HeadConfig) -> nn.Sequential:
    if cfg.hidden > 0:
        return nn.Sequential(
            nn.Linear(cfg.num_features, cfg.hidden), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.num_classes),
        )  # fmt: skip
    return nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.num_features, cfg.num_classes))


class EdgeClassifier(nn.Module):
    """Images (N, 3, H, W), normalised -> logits (N, num_classes)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def feature_dim(backbone: nn.Module) -> int:
    """Size of the pooled features timm returns with num_classes=0. MobileNetV3 has a 1x1 conv after
    pooling, so there it is `head_hidden_size`, not `num_features`."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


def build_classifier(backbone_name: str, num_classes: int, hidden: int = 0, dropout: float = 0.2) -> EdgeClassifier:
    backbone = create_feature_extractor(backbone_name)
    head = build_head(HeadConfig(feature_dim(backbone), num_classes, hidden, dropout))
    return EdgeClassifier(backbone, head)


def _blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's stages from input to output (timm's EfficientNet/MobileNet family)."""
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(backbone).__name__} has no .blocks: cannot unfreeze by block")
    return list(blocks)


def num_blocks(backbone: nn.Module) -> int:
    return len(_blocks(backbone))


def freeze_backbone(model: EdgeClassifier) -> None:
    """Stage 1: nothing in the backbone learns; only the head has requires_grad."""
    model.backbone.requires_grad_(False)
    model.head.requires_grad_(True)


def unfreeze_top(model: EdgeClassifier, n_blocks: int | None) -> list[str]:
    """Stage 2: unfreeze the last `n_blocks` stages and everything after them (None: all).

    Returns the names of the unfrozen top-level parts, for the log.
    """
    backbone = model.backbone
    freeze_backbone(model)
    if n_blocks is None:
        backbone.requires_grad_(True)
        return ["all"]
    blocks = _blocks(backbone)
    n_blocks = max(0, min(n_blocks, len(blocks)))
    names = []
    for i in range(len(blocks) - n_blocks, len(blocks)):
        blocks[i].requires_grad_(True)
        names.append(f"blocks.{i}")
    # Everything after the last stage (1x1 head conv, its norm) belongs to the top too.
    for name in ("conv_head", "bn2", "norm_head"):
        part = getattr(backbone, name, None)
        if isinstance(part, nn.Module) and any(True for _ in part.parameters()):
            part.requires_grad_(True)
            names.append(name)
    return names


def set_train_mode(model: EdgeClassifier) -> None:
    """Train mode for dropout, but every BatchNorm stays in eval mode (running stats untouched).

    With small batches of a few hundred images, updating BN statistics hurts more than it helps;
    keeping them is what Keras' fine-tuning guide and timm's freeze helpers do too.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """AdamW groups: no weight decay on biases and norm parameters (1-D tensors), as nanoGPT does."""
    decay = [p for p in trainable_parameters(model) if p.ndim >= 2]
    no_decay = [p for p in trainable_parameters(model) if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def layerwise_param_groups(model: EdgeClassifier, lr: float, weight_decay: float, decay: float = 1.0,
                           head_lr_scale: float = 1.0, l2sp: float = 0.0) -> list[dict[str, object]]:  # fmt: skip
    """AdamW groups for fine-tuning with layer-wise learning-rate decay (as BEiT and timm's
    `param_groups_layer_decay`): the head gets `lr * head_lr_scale`, the layers after the last block
    `lr`, block i from the top `lr * decay**(i + 1)` and the stem `lr * decay**(blocks + 1)`.
    Only trainable parameters are included; each group carries its own `lr`, so one scheduler scales all.
    `l2sp` > 0: the backbone's parameters are pulled toward their starting point instead (edgetl.l2sp), so
    their groups carry no weight decay and that strength under `edgetl.l2sp.GROUP_KEY`."""
    backbone = model.backbone
    blocks = _blocks(backbone)
    depth_of: dict[int, int] = {}  # parameter id -> layers below the top (0: after the last block)
    for p in backbone.parameters():
        depth_of[id(p)] = len(blocks) + 1  # stem and anything not inside a block
    for i, block in enumerate(blocks):
        for p in block.parameters():
            depth_of[id(p)] = len(blocks) - i
    for name in ("conv_head", "bn2", "norm_head"):
        part = getattr(backbone, name, None)
        if isinstance(part, nn.Module):
            for p in part.parameters():
                depth_of[id(p)] = 0
    groups: dict[tuple[float, bool, bool], list[nn.Parameter]] = {}
    for p in trainable_parameters(model):
        in_backbone = id(p) in depth_of
        rate = lr * decay ** depth_of[id(p)] if in_backbone else lr * head_lr_scale
        groups.setdefault((rate, p.ndim >= 2, in_backbone and l2sp > 0), []).append(p)
    return [{"params": ps, "lr": rate, "weight_decay": weight_decay if decayed and not anchored else 0.0,
             **({L2SP_GROUP_KEY: l2sp} if anchored else {})}
            for (rate, decayed, anchored), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1], kv[0][2]))]  # fmt: skip
