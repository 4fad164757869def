"""The Node.js example app (onnxruntime-node) gives the same answers as `edgetl predict`."""

from __future__ import annotations

import json
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
    for image in images:
        proc = subprocess.run(["node", str(APP / "classify.js"), str(model), str(image), "--json"], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        node = json.loads(proc.stdout)
        py = clf.predict(image)
        assert node["label"] == py.label, image
        # JPEG decoders and 8-bit resampling may differ by a grey level here and there; probabilities stay close.
        assert node["probability"] == pytest.approx(py.probability, abs=0.02), image


@needs_node
def test_node_app_refuses_a_model_without_metadata(tmp_path: Path) -> None:
    if not (APP / "node_modules").is_dir():
        pytest.fail("examples/node has no node_modules: run `npm install --ignore-scripts` there")
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")  # ir_version 7 and nothing else
    img = next((sample_path() / "val").rglob("*.jpg"))
    proc = subprocess.run(["node", str(APP / "classify.js"), str(tmp_path / "m.onnx"), str(img)], capture_output=True, text=True)
    assert proc.returncode == 1 and "no edgetl metadata" in proc.stderr
