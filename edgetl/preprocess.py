"""Image decoding and evaluation preprocessing in numpy and Pillow only.

This one module defines what "the model's preprocessing" means. Training's evaluation pipeline,
the exported model's metadata and the torch-free runtime all use it, so a model never sees
differently prepared pixels after export (the most common complaint about other tools).
It must not import torch.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def _quiet_large_images() -> None:
    """Pillow warns (a raw Python warning in the middle of edgetl's output) for images between 89 and 179
    megapixels, which decode fine: panoramas, medium-format and satellite photos. Above that it raises
    DecompressionBombError, which stays: the image is skipped and listed with the reason, like a corrupt one.
    Installed at the first decode, and again wherever the filters were reset since (warnings.catch_warnings)."""
    if not any(f[0] == "ignore" and f[2] is Image.DecompressionBombWarning for f in warnings.filters):
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class PreprocessSpec:
    """How pixels become a model input: resize the shorter side to `resize_size`, centre-crop
    `input_size`, scale to [0, 1], subtract `mean` and divide by `std` per RGB channel, NCHW."""

    input_size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str = "RGB"
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if self.resize_size < self.input_size:
            raise ValueError("resize_size must be at least input_size")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        return cls(
            input_size=int(d["input_size"]),
            resize_size=int(d["resize_size"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
            channel_order=str(d.get("channel_order", "RGB")),
            layout=str(d.get("layout", "NCHW")),
        )


def decode_image(source: str | os.PathLike[str] | bytes | Image.Image) -> Image.Image:
    """Open an image as 8-bit RGB, whatever it was stored as.

    Honours EXIF orientation (phone photos are often stored sideways), takes the first frame of
    animations, puts transparent images on white, and scales 16-bit and float images to 8 bits
    instead of clipping them. Raises OSError/ValueError for corrupt or non-image data.
    """
    _quiet_large_images()
    if isinstance(source, Image.Image):
        img = source
    else:
        try:
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        except UnidentifiedImageError:
            if not isinstance(source, bytes):
                raise
            # Pillow's message would name the in-memory buffer ("<_io.BytesIO object at 0x...>"); the
            # caller names the file.
            raise UnidentifiedImageError("cannot identify image file (not a format Pillow reads)") from None
        img.seek(0)
        img.load()  # force a full decode now so truncated files fail here, not later
    img = ImageOps.exif_transpose(img)
    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = arr.max(initial=0)
        if mode.startswith("I;16") or peak > 255:
            hi = 65535.0
        elif mode == "F" and peak <= 1.0:
            hi = 1.0  # float images in [0, 1] (scientific TIFFs): 1.0 is white, not 1/255 of it
        else:
            hi = 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, 1, CMYK, YCbCr, LAB, HSV: Pillow's own conversions are right for these.
    return img.convert("RGB")


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """The (width, height) after resizing the shorter side to `shorter`, keeping the aspect ratio.

    Same rounding as torchvision's Resize(int): the longer side is truncated, not rounded.
    """
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def resize_shorter(img: Image.Image, shorter: int, interpolation: str) -> Image.Image:
    size = resized_size(img.width, img.height, shorter)
    if size == img.size:
        return img
    return img.resize(size, _INTERPOLATIONS[interpolation])


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Centre crop to size x size (padding with black first if the image is smaller, as torchvision does)."""
    if img.width < size or img.height < size:
        padded = Image.new("RGB", (max(size, img.width), max(size, img.height)))
        padded.paste(img, ((padded.width - img.width) // 2, (padded.height - img.height) // 2))
        img = padded
    left = round((img.width - size) / 2.0)
    top = round((img.height - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


def resize_and_crop(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """The geometric half of preprocessing: RGB uint8 image at the crop size."""
    return center_crop(resize_shorter(img, spec.resize_size, spec.interpolation), spec.input_size)


def normalize(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 HWC (or NHWC) RGB -> float32 CHW (or NCHW), scaled and normalised."""
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    x = (pixels.astype(np.float32) / np.float32(255.0) - mean) / std
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def preprocess(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Decoded RGB image -> the float32 CHW array the model takes."""
    return normalize(np.asarray(resize_and_crop(img, spec)), spec)
