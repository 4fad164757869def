"""Model size and compute: parameters and multiply-accumulates at the input size."""

from __future__ import annotations

from functools import cache


@cache
def count_macs_and_params(backbone: str, input_size: int) -> tuple[int, int]:
    """MACs of one forward pass at batch 1 (convolutions and linear layers) and parameters of the
    ImageNet model (1000 classes, the figure papers quote)."""
    import timm
    import torch
    from torch import nn

    from edgetl.backbones import get_entry

    model = timm.create_model(get_entry(backbone).timm_id, pretrained=False).eval()
    macs = 0

    def conv_hook(m: nn.Conv2d, _inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        nonlocal macs
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        macs += out.numel() * k

    def linear_hook(m: nn.Linear, _inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        nonlocal macs
        macs += out.numel() * m.in_features

    handles = [
        m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)  # type: ignore[arg-type]
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    for h in handles:
        h.remove()
    return macs, sum(p.numel() for p in model.parameters())
