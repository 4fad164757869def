"""Decoding of awkward images, and preprocessing that matches torchvision's exactly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from edgetl.preprocess import (
    PreprocessSpec,
    center_crop,
    decode_image,
    preprocess,
    resize_shorter,
    resized_size,
)

SPEC = PreprocessSpec(input_size=32, resize_size=36, interpolation="bicubic", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def _png_bytes(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode_image(_png_bytes(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert decoded.size == (20, 40)
    top = np.asarray(decoded)[2, 10]
    assert top[2] > 150 and top[0] < 100  # the blue stripe is now on top


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("L", (8, 8), 128),
        lambda: Image.new("P", (8, 8), 3),
        lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)),
        lambda: Image.new("1", (8, 8), 1),
    ],
    ids=["grayscale", "palette", "cmyk", "bilevel"],
)
def test_odd_modes_become_rgb(make) -> None:
    img = make()
    fmt = "JPEG" if img.mode == "CMYK" else "PNG"
    assert decode_image(_png_bytes(img, fmt)).mode == "RGB"


def test_transparent_pixels_go_on_white() -> None:
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    out = np.asarray(decode_image(_png_bytes(img)))
    assert (out == 255).all()


def test_16_bit_is_scaled_not_clipped() -> None:
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    out = np.asarray(decode_image(_png_bytes(Image.fromarray(arr))))
    assert 120 <= out[0, 0, 0] <= 135


def test_gif_first_frame() -> None:
    frames = [Image.new("RGB", (6, 6), (255, 0, 0)), Image.new("RGB", (6, 6), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = np.asarray(decode_image(buf.getvalue()))
    assert out[0, 0, 0] > 200 and out[0, 0, 2] < 50


def test_truncated_file_raises() -> None:
    data = _png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises((OSError, SyntaxError, ValueError)):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize("size", [(50, 37), (37, 50), (36, 36), (301, 200)])
def test_resize_and_crop_match_torchvision(size: tuple[int, int]) -> None:
    """The numpy/Pillow pipeline gives exactly torchvision's Resize + CenterCrop + Normalize on PIL."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8))
    tv = v2.Compose([
        v2.Resize(SPEC.resize_size, interpolation=InterpolationMode.BICUBIC), v2.CenterCrop(SPEC.input_size),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(SPEC.mean), list(SPEC.std)),
    ])  # fmt: skip
    expected = tv(img).numpy()
    ours = preprocess(img, SPEC)
    assert ours.shape == (3, 32, 32) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert resize_shorter(img, SPEC.resize_size, "bicubic").size == resized_size(*size, SPEC.resize_size)


def test_center_crop_pads_small_images() -> None:
    out = center_crop(Image.new("RGB", (10, 40), (255, 255, 255)), 20)
    assert out.size == (20, 20)
    arr = np.asarray(out)
    assert arr[10, 0].sum() == 0 and arr[10, 10].sum() == 765


def test_spec_round_trips() -> None:
    assert PreprocessSpec.from_dict(SPEC.to_dict()) == SPEC


def test_very_large_images_decode_quietly_and_bombs_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow's limits scaled down (89 MP warns, 179 MP raises): a 40x30 image is "large", 50x50 a "bomb".
    import warnings

    from edgetl.data import ImageRef, LabelledSet
    from edgetl.decoded import decode_split

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "large.png")
    Image.new("RGB", (50, 50), (10, 10, 200)).save(tmp_path / "bomb.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("ignore", category=ResourceWarning)
        large = decode_image(tmp_path / "large.png")
    assert large.size == (40, 30) and [str(w.message) for w in caught] == []
    refs = [ImageRef(key=name, path=tmp_path / name) for name in ("large.png", "bomb.png")]
    images, failed = decode_split(LabelledSet(refs, np.zeros(2, dtype=np.int64)), PreprocessSpec(32, 36, "bicubic", (0.5,) * 3, (0.5,) * 3))
    assert [r.key for r in images.refs] == ["large.png"]
    assert [f["file"] for f in failed] == ["bomb.png"] and failed[0]["reason"].startswith("DecompressionBombError")
