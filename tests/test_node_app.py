"""The Node.js example app (onnxruntime-node) gives the same answers as `edgetl predict`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edgetl.runtime import Classifier
from edgetl.sample import sample_path

APP = Path(__file__).resolve().parents[1] / "examples" / "node"

needs_node = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None, reason="node or npm is not installed on this machine"
)


def same_or_near_tie(node: dict, py: object) -> bool:
    """The app's label is Python's, or (JPEG decoders differ by a grey level or so) Python's close runner-up:
    within 5 points of its top probability."""
    probs = dict(py.top_k)  # type: ignore[attr-defined]
    return node["label"] == py.label or (node["label"] in probs and py.probability - probs[node["label"]] < 0.05)  # type: ignore[attr-defined]


@needs_node
@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["model.onnx", "model.uint8.onnx"])
def test_node_app_matches_edgetl_predict(real_export: Path, model_name: str) -> None:
    assert (APP / "node_modules" / "onnxruntime-node").is_dir(), (
        "examples/node has no node_modules: run `npm install --ignore-scripts` there (the README's install command does)"
    )
    model = real_export / model_name
    clf = Classifier(model)
    images = sorted((sample_path() / "val").rglob("*.jpg"))[::5]  # 20 real photos, every class
    gaps: list[float] = []
    flips: list[Path] = []
    for image in images:
        proc = subprocess.run(["node", str(APP / "classify.js"), str(model), str(image), "--json"], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        node = json.loads(proc.stdout)
        py = clf.predict(image)
        # jpeg-js and Pillow's libjpeg-turbo decode the same file ~1 grey level apart (chroma
        # upsampling; up to 18 at edges), so on JPEGs the label must match and the probabilities
        # stay close on average; a low-confidence image can move a few points on its own.
        assert same_or_near_tie(node, py), (image, node, py.top_k)
        if node["label"] != py.label:
            flips.append(image)  # a near tie that flipped: its probabilities are of different labels
            continue
        gaps.append(abs(node["probability"] - py.probability))
    assert len(flips) <= 1, flips
    assert sum(gaps) / len(gaps) < 0.05, gaps  # measured: 0.023 on the 1-epoch test model


@needs_node
@pytest.mark.slow
def test_node_preprocessing_matches_on_lossless_images(real_export: Path, tmp_path: Path) -> None:
    """PNG decodes identically everywhere, so what is left is the resize, crop and normalisation the
    app ports from edgetl.preprocess: the probabilities must agree closely, after a real downscale."""
    from PIL import Image

    model = real_export / "model.onnx"
    clf = Classifier(model)
    for i, image in enumerate(sorted((sample_path() / "val").rglob("*.jpg"))[::10]):
        img = Image.open(image).convert("RGB")
        big = img.resize((img.width * 3 // 2, img.height * 3 // 2), Image.Resampling.LANCZOS)  # forces a 1.5x downscale
        png = tmp_path / f"{i}.png"
        big.save(png)
        cmd = ["node", str(APP / "classify.js"), str(model), str(png), "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        node, py = json.loads(proc.stdout), clf.predict(png)
        assert node["label"] == py.label and node["probability"] == pytest.approx(py.probability, abs=2e-3), image


@needs_node
def test_node_app_refuses_a_model_without_metadata(tmp_path: Path) -> None:
    if not (APP / "node_modules").is_dir():
        pytest.fail("examples/node has no node_modules: run `npm install --ignore-scripts` there")
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")  # ir_version 7 and nothing else
    img = next((sample_path() / "val").rglob("*.jpg"))
    proc = subprocess.run(["node", str(APP / "classify.js"), str(tmp_path / "m.onnx"), str(img)], capture_output=True, text=True)
    assert proc.returncode == 1 and "no edgetl metadata" in proc.stderr


@needs_node
@pytest.mark.slow
@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_node_honours_exif_orientation_like_the_python_runtime(real_export: Path, tmp_path: Path, orientation: int, fmt: str) -> None:
    """A phone photo stored sideways with an EXIF orientation tag: both apps must rotate it upright
    first. Lossless PNG must agree as closely as the unrotated test above; JPEG on the label."""
    from PIL import Image

    model = real_export / "model.onnx"
    clf = Classifier(model)
    photo = sorted((sample_path() / "val").rglob("*.jpg"))[3]
    upright = Image.open(photo).convert("RGB")
    upright = upright.crop((0, 0, upright.width, upright.height * 3 // 4))  # not square: a rotation changes the crop
    # Store the pixels the way a camera would for this tag: the inverse of the transpose Pillow applies.
    inverse = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    stored = upright.transpose(inverse)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rotated.{'png' if fmt == 'png' else 'jpg'}"
    stored.save(path, exif=exif, **({"quality": 95} if fmt == "jpeg" else {}))
    py = clf.predict(path)
    assert py.top_k == clf.predict(upright).top_k or fmt == "jpeg", "the Python runtime must see the upright photo"
    proc = subprocess.run(["node", str(APP / "classify.js"), str(model), str(path), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    node = json.loads(proc.stdout)
    assert same_or_near_tie(node, py), (node, py.top_k)
    if fmt == "png":
        assert node["probability"] == pytest.approx(py.probability, abs=2e-3)


@needs_node
@pytest.mark.parametrize(("given", "seen"), [(None, "1"), ("0", "0")], ids=["unset", "user-set"])
def test_node_app_turns_onnxruntime_telemetry_off_unless_the_user_set_it(tmp_path: Path, given: str | None, seen: str) -> None:
    # onnxruntime-node's native library posts usage events some seconds into a session unless this variable is set.
    probe = tmp_path / "probe.js"  # preloaded: says what the environment held when the app ended
    probe.write_text("process.on('exit', () => process.stderr.write(`ORT_DISABLE_TELEMETRY=${process.env.ORT_DISABLE_TELEMETRY}\\n`));\n")
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    img = next((sample_path() / "val").rglob("*.jpg"))
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}  # importing edgetl set it in this process
    if given is not None:
        env["ORT_DISABLE_TELEMETRY"] = given
    proc = subprocess.run(["node", "-r", str(probe), str(APP / "classify.js"), str(tmp_path / "m.onnx"), str(img)],
                          capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert f"ORT_DISABLE_TELEMETRY={seen}" in proc.stderr.splitlines()
