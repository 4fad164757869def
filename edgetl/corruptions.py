"""Common image corruptions in the style of ImageNet-C (Hendrycks & Dietterich 2019), on numpy/scipy/Pillow.

Parameters per severity (1-5) are those of the paper's `make_imagenet_c.py` for 224 x 224 images.
The reference code needs OpenCV, ImageMagick (Wand) and an old scikit-image API; here the same
operations are written on numpy/scipy/Pillow: noise, brightness, contrast, saturation, pixelate,
JPEG and fog (the paper's plasma fractal) compute the same thing; defocus blur uses the same disk
kernel; motion blur approximates ImageMagick's one-sided Gaussian line kernel; zoom blur resizes with
Pillow's bilinear filter instead of scipy's order-1 zoom. Glass blur, snow, frost, spatter and
elastic transform are not included (each needs ImageMagick or bundled frost photos).

`VALIDATION` are the paper's held-out corruptions (not among the 15 test ones): tune on them, report
on `CORRUPTIONS`. Every function takes and returns an RGB uint8 array and draws from `rng`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def _float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) / 255.0


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.clip(x, 0, 1) * 255), 0, 255).astype(np.uint8)


def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.08, 0.12, 0.18, 0.26, 0.38][severity - 1]
    f = _float(x)
    return _uint8(f + rng.normal(size=f.shape, scale=c))


def shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [60, 25, 12, 5, 3][severity - 1]
    return _uint8(rng.poisson(_float(x) * c) / c)


def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper on each value (scikit-image's random_noise(mode='s&p'), half salt)."""
    c = [0.03, 0.06, 0.09, 0.17, 0.27][severity - 1]
    f = _float(x)
    hit = rng.random(f.shape) < c
    salt = rng.random(f.shape) < 0.5
    f[hit & salt], f[hit & ~salt] = 1.0, 0.0
    return _uint8(f)


def speckle_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.15, 0.2, 0.35, 0.45, 0.6][severity - 1]
    f = _float(x)
    return _uint8(f + f * rng.normal(size=f.shape, scale=c))


def _per_channel(f: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    # OpenCV's filter2D border (reflect 101) is scipy's "mirror".
    return np.stack([ndimage.convolve(f[..., ch], kernel, mode="mirror") for ch in range(f.shape[2])], axis=2)


def _gaussian_kernel_1d(size: int, sigma: float) -> np.ndarray:
    r = np.arange(size) - (size - 1) / 2
    k = np.exp(-(r**2) / (2 * sigma**2))
    return k / k.sum()


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    if radius <= 8:
        grid, ksize = np.arange(-8, 8 + 1), 3
    else:
        grid, ksize = np.arange(-radius, radius + 1), 5
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    g = _gaussian_kernel_1d(ksize, alias_blur)
    return ndimage.convolve(disk, np.outer(g, g), mode="mirror")


def defocus_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, alias = [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)][severity - 1]
    return _uint8(_per_channel(_float(x), _disk(radius, alias)))


def gaussian_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [1, 2, 3, 4, 6][severity - 1]
    return _uint8(ndimage.gaussian_filter(_float(x), sigma=(c, c, 0), mode="nearest"))


def motion_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A one-sided line kernel of Gaussian weights at a random angle in [-45, 45] degrees (ImageMagick's
    motion blur with the paper's radius and sigma)."""
    radius, sigma = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)][severity - 1]
    angle = math.radians(rng.uniform(-45, 45))
    size = 2 * radius + 1
    kernel = np.zeros((size, size))
    for i in range(radius + 1):
        w = math.exp(-(i**2) / (2 * sigma**2))
        # ImageMagick blurs towards the angle: each pixel averages those behind it along the line.
        r, c = radius - round(i * math.sin(angle)), radius - round(i * math.cos(angle))
        kernel[r, c] += w
    kernel /= kernel.sum()
    return _uint8(_per_channel(_float(x), kernel))


def _clipped_zoom(img: Image.Image, zoom: float) -> np.ndarray:
    w, h = img.size
    cw, ch = math.ceil(w / zoom), math.ceil(h / zoom)
    left, top = (w - cw) // 2, (h - ch) // 2
    big = img.crop((left, top, left + cw, top + ch)).resize((round(cw * zoom), round(ch * zoom)), Image.Resampling.BILINEAR)
    tl, tt = (big.width - w) // 2, (big.height - h) // 2
    return _float(np.asarray(big.crop((tl, tt, tl + w, tt + h))))


def zoom_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    zooms = [np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02), np.arange(1, 1.26, 0.02),
             np.arange(1, 1.31, 0.03)][severity - 1]  # fmt: skip
    img = Image.fromarray(x)
    out = np.zeros(x.shape, dtype=np.float64)
    for z in zooms:
        out += _clipped_zoom(img, float(z))
    return _uint8((_float(x) + out) / (len(zooms) + 1))


def plasma_fractal(rng: np.random.Generator, mapsize: int = 256, wibbledecay: float = 3) -> np.ndarray:
    """Diamond-square height map in [0, 1] (the paper's code, with an explicit generator)."""
    assert mapsize & (mapsize - 1) == 0
    grid = np.zeros((mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def wibbled_mean(a: np.ndarray) -> np.ndarray:
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0:mapsize:step, 0:mapsize:step]
        squares = corners + np.roll(corners, -1, axis=0)
        squares += np.roll(squares, -1, axis=1)
        grid[half:mapsize:step, half:mapsize:step] = wibbled_mean(squares)
        centres = grid[half:mapsize:step, half:mapsize:step]
        left = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        grid[0:mapsize:step, half:mapsize:step] = wibbled_mean(left)
        top = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        grid[half:mapsize:step, 0:mapsize:step] = wibbled_mean(top)
        step //= 2
        wibble /= wibbledecay
    grid -= grid.min()
    return grid / grid.max()


def fog(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    strength, decay = [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)][severity - 1]
    f = _float(x)
    peak = f.max()
    size = 1 << max(8, math.ceil(math.log2(max(f.shape[:2]))))
    f = f + strength * plasma_fractal(rng, size, decay)[: f.shape[0], : f.shape[1], None]
    return _uint8(f * peak / (peak + strength))


def brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """V of HSV raised by c: at fixed hue and saturation RGB scales with V (black becomes grey c)."""
    c = [0.1, 0.2, 0.3, 0.4, 0.5][severity - 1]
    f = _float(x)
    v = f.max(2, keepdims=True)
    scaled = np.where(v > 0, f * np.minimum(v + c, 1) / np.maximum(v, 1e-12), c)
    return _uint8(scaled)


def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.4, 0.3, 0.2, 0.1, 0.05][severity - 1]
    f = _float(x)
    means = f.mean(axis=(0, 1), keepdims=True)
    return _uint8((f - means) * c + means)


def saturate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """S of HSV times a, plus b: at fixed hue and value, each channel moves along (V - channel)."""
    a, b = [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)][severity - 1]
    f = _float(x)
    v = f.max(2, keepdims=True)
    s = np.where(v > 0, (v - f.min(2, keepdims=True)) / np.maximum(v, 1e-12), 0)
    s_new = np.clip(s * a + b, 0, 1)
    # channel = V * (1 - S * k) with k in [0, 1] fixed by hue; k = (V - channel) / (V * S)
    k = np.where(s > 0, (v - f) / np.maximum(v * s, 1e-12), 0)
    return _uint8(v * (1 - s_new * k))


def pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.6, 0.5, 0.4, 0.3, 0.25][severity - 1]
    img = Image.fromarray(x)
    w, h = img.size
    small = img.resize((max(1, int(w * c)), max(1, int(h * c))), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.BOX))


def jpeg_compression(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = [25, 18, 15, 10, 7][severity - 1]
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur, "motion_blur": motion_blur, "zoom_blur": zoom_blur,
    "fog": fog,
    "brightness": brightness, "contrast": contrast, "pixelate": pixelate, "jpeg_compression": jpeg_compression,
}  # fmt: skip
VALIDATION: dict[str, Corruption] = {"speckle_noise": speckle_noise, "gaussian_blur": gaussian_blur, "saturate": saturate}


def corrupt(x: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """One corrupted copy of an RGB uint8 image; the same seed gives the same noise."""
    fn = CORRUPTIONS.get(name) or VALIDATION.get(name)
    if fn is None:
        raise ValueError(f"unknown corruption {name!r}: one of {', '.join([*CORRUPTIONS, *VALIDATION])}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity is 1 to 5, got {severity}")
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {x.dtype} {x.shape}")
    return fn(x, severity, np.random.default_rng(seed))
