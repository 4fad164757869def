"""BatchNorm statistics for domain adaptation: measure them, align target batches to them, fold them in.

edgetl trains with every BatchNorm in eval mode, so a trained model normalises with ImageNet's
statistics, not with those of the user's training images. AdaBN (Li et al. 2016) replaces a layer's
statistics with the target domain's; done literally here it would also undo the difference between
ImageNet and the training images that the head learned on top of, and hurt even on clean images.
So each BatchNorm input is aligned from the target statistics to the *source* statistics (measured
on the run's recorded training images with the trained model), and the model keeps normalising
with what it was trained with:

    x_aligned = (x - mean_t) / std_t * std_s + mean_s        then the layer's own (x - mean_I) / std_I

which is one affine map per channel, so it folds into new running statistics and the exported graph
is unchanged in shape. On images of the source domain mean_t ~ mean_s and std_t ~ std_s: a no-op.

While adapting, `BatchAlignment` applies the map with each batch's own statistics (as train-mode
BatchNorm does in AdaBN and Tent), accumulates the exact target statistics over every batch, and
`fold` writes the final map into the layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

# Standardising a batch: the same epsilon BatchNorm layers use by default.
BATCH_EPS = 1e-5
# A source channel with less variance than this carries no signal to align to: it is left as trained.
DEAD_CHANNEL_VAR = 1e-8


def batchnorm_layers(model: nn.Module, depth: float = 1.0) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers by name in forward order (timm's BatchNormAct2d included: it subclasses
    BatchNorm2d); `depth` < 1 keeps that share of them, from the input side."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return dict(layers[: round(depth * len(layers))])


@dataclass
class ChannelStats:
    """Exact per-channel mean and (biased) variance of a layer's input, accumulated over batches in float64."""

    total: torch.Tensor | None = None
    total_sq: torch.Tensor | None = None
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        dims = [d for d in range(x.ndim) if d != 1]
        x64 = x.detach().to(torch.float64)
        s, sq = x64.sum(dims).cpu(), (x64 * x64).sum(dims).cpu()
        self.total = s if self.total is None else self.total + s
        self.total_sq = sq if self.total_sq is None else self.total_sq + sq
        self.count += x.numel() // x.shape[1]

    @property
    def mean(self) -> torch.Tensor:
        assert self.total is not None and self.count > 0, "no batch was seen"
        return self.total / self.count

    @property
    def var(self) -> torch.Tensor:
        assert self.total_sq is not None
        return (self.total_sq / self.count - self.mean**2).clamp_min(0.0)


@dataclass
class LayerStats:
    """Per-channel mean and variance of each BatchNorm layer's input, by layer name."""

    mean: dict[str, torch.Tensor] = field(default_factory=dict)
    var: dict[str, torch.Tensor] = field(default_factory=dict)

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Plain tensors, for a checkpoint (loadable with weights_only=True)."""
        return {"mean": {k: v.float() for k, v in self.mean.items()}, "var": {k: v.float() for k, v in self.var.items()}}

    @classmethod
    def from_state(cls, state: dict[str, dict[str, torch.Tensor]]) -> LayerStats:
        return cls({k: v.double() for k, v in state["mean"].items()}, {k: v.double() for k, v in state["var"].items()})

    @classmethod
    def of(cls, acc: dict[str, ChannelStats]) -> LayerStats:
        return cls({k: a.mean for k, a in acc.items()}, {k: a.var for k, a in acc.items()})


@contextmanager
def measuring(model: nn.Module) -> Iterator[dict[str, ChannelStats]]:
    """Record every BatchNorm layer's input statistics while the model runs as it is."""
    acc = {name: ChannelStats() for name in batchnorm_layers(model)}
    handles = [m.register_forward_pre_hook(_recorder(acc[name])) for name, m in batchnorm_layers(model).items()]
    try:
        yield acc
    finally:
        for h in handles:
            h.remove()


def _recorder(stats: ChannelStats):
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        stats.add(args[0])

    return hook


class BatchAlignment:
    """While entered, every BatchNorm input is standardised with its batch's own statistics and mapped
    onto the source statistics (differentiably, so Tent can learn through it); the statistics of the
    target inputs are accumulated for `fold`. Batches of a few images give noisy statistics: use >= 16."""

    def __init__(self, model: nn.Module, source: LayerStats, depth: float = 1.0) -> None:
        self.model, self.source = model, source
        self.layers = batchnorm_layers(model, depth)
        missing = set(self.layers) - set(source.mean)
        if missing:
            raise ValueError(f"source statistics miss {len(missing)} BatchNorm layer(s), e.g. {sorted(missing)[0]}")
        self.target: dict[str, ChannelStats] = {}
        self.recording = True  # off while Tent trains: its batches need aligning, not measuring
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def reset(self) -> None:
        self.target = {name: ChannelStats() for name in self.layers}

    def __enter__(self) -> BatchAlignment:
        self.reset()
        for name, m in self.layers.items():
            self._handles.append(m.register_forward_pre_hook(self._aligner(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _aligner(self, name: str):
        mean_s = self.source.mean[name].float()
        std_s = self.source.var[name].float().sqrt()
        dead = self.source.var[name] < DEAD_CHANNEL_VAR

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x = args[0]
            if self.recording:
                self.target[name].add(x)
            dims = [d for d in range(x.ndim) if d != 1]
            shape = [1, -1] + [1] * (x.ndim - 2)
            mu = x.mean(dims, keepdim=True)
            var = x.var(dims, unbiased=False, keepdim=True)
            aligned = (x - mu) * torch.rsqrt(var + BATCH_EPS) * std_s.to(x.device).view(shape) + mean_s.to(x.device).view(shape)
            keep = dead.to(x.device).view(shape)
            return (torch.where(keep, x, aligned),)

        return hook

    def target_stats(self) -> LayerStats:
        return LayerStats.of(self.target)


def fold(model: nn.Module, source: LayerStats, target: LayerStats) -> int:
    """Write the target-to-source alignment into the running statistics of each BatchNorm layer that
    `target` has statistics of (see the module docstring for the map); returns how many channels were
    changed. Channels dead at the source stay as they are."""
    changed = 0
    with torch.no_grad():
        for name, bn in batchnorm_layers(model).items():
            if name not in target.mean:
                continue
            assert bn.running_mean is not None and bn.running_var is not None, f"{name} keeps no running statistics"
            mean_i, var_i = bn.running_mean.double(), bn.running_var.double()
            mean_s, std_s = source.mean[name], source.var[name].sqrt()
            mean_t, std_t = target.mean[name], (target.var[name] + BATCH_EPS).sqrt()
            live = source.var[name] >= DEAD_CHANNEL_VAR
            # (x - m') / sqrt(v' + eps) == ((x - mean_t) / std_t * std_s + mean_s - mean_i) / sqrt(var_i + eps)
            ratio = std_t / std_s.clamp_min(DEAD_CHANNEL_VAR)
            new_var = ratio**2 * (var_i + bn.eps) - bn.eps
            new_mean = mean_t - (mean_s - mean_i) * ratio
            ok = live & (new_var > 0) & torch.isfinite(new_var) & torch.isfinite(new_mean)
            bn.running_mean.copy_(torch.where(ok, new_mean, mean_i).to(bn.running_mean.dtype))
            bn.running_var.copy_(torch.where(ok, new_var, var_i).to(bn.running_var.dtype))
            changed += int(ok.sum())
    return changed


def affine_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    """The BatchNorm scale and shift parameters: what Tent adapts."""
    for bn in batchnorm_layers(model).values():
        for p in (bn.weight, bn.bias):
            if p is not None:
                yield p
