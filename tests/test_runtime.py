"""edgetl.runtime and `edgetl predict`: torch-free, faithful to training's preprocessing, robust."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import run_with_imports_blocked
from PIL import Image
from typer.testing import CliRunner

from edgetl.cli.main import app
from edgetl.export import ExportOptions, export_run
from edgetl.progress import Reporter
from edgetl.runtime import Classifier, Prediction

QUIET = Reporter(quiet=True)


@pytest.fixture(scope="module")
def tiny_models(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rt")
    export_run(tiny_run, ExportOptions(format="onnx", out=str(out), embed_preprocess=True), QUIET)
    return out


BLOCKED = ("torch", "torchvision", "timm", "onnx", "onnxscript", "openvino", "nncf", "typer", "rich", "matplotlib", "safetensors")


def test_runtime_works_with_the_training_stack_blocked(tiny_models: Path) -> None:
    """What a minimal install (numpy, Pillow, onnxruntime) gives an app: the runtime classifies with
    every heavier package made unimportable."""
    proc = run_with_imports_blocked(BLOCKED, f"""
import numpy as np
from edgetl.runtime import Classifier
clf = Classifier({str(tiny_models / "model.onnx")!r})
pred = clf.predict(np.zeros((30, 40, 3), np.uint8))
print(pred.label in clf.labels)
""")
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stdout + proc.stderr


def test_inputs_of_every_kind(tiny_models: Path, tiny_run: Path) -> None:
    clf = Classifier(tiny_models / "model.onnx")
    path = next((Path(json.loads((tiny_run / "manifest.json").read_text())["dataset"]["root"]) / "red").iterdir())
    img = Image.open(path)
    arr = np.asarray(img.convert("RGB"))
    by_path, by_pil, by_array = clf.predict(path), clf.predict(img), clf.predict(arr)
    assert isinstance(by_path, Prediction) and by_path.label in clf.labels
    assert by_path.top_k == by_pil.top_k == by_array.top_k
    batch = clf.predict([path, img, arr], top_k=2)
    assert len(batch) == 3 and all(len(p.top_k) == 2 for p in batch)
    assert batch[0].top_k[0][1] == pytest.approx(by_path.probability, abs=1e-6)
    assert sum(p for _, p in clf.predict(path, top_k=10).top_k) == pytest.approx(1.0, abs=1e-5)


def test_uint8_model_predicts_the_same(tiny_models: Path) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, size=(50, 70, 3), dtype=np.uint8) for _ in range(4)]
    a = Classifier(tiny_models / "model.onnx").predict(images)
    b = Classifier(tiny_models / "model.uint8.onnx").predict(images)
    for pa, pb in zip(a, b, strict=True):  # type: ignore[arg-type]
        assert pa.label == pb.label and pa.probability == pytest.approx(pb.probability, abs=1e-4)


def test_concurrent_calls_give_the_same_answers(tiny_models: Path) -> None:
    clf = Classifier(tiny_models / "model.onnx", threads=1)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8) for _ in range(16)]
    sequential = [clf.predict(im).top_k for im in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda im: clf.predict(im).top_k, images))
    assert concurrent == sequential


def test_model_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Classifier(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_text("not a model")
    with pytest.raises(ValueError, match="not an ONNX model"):
        Classifier(tmp_path / "bad.onnx")


@pytest.mark.slow
def test_runtime_agrees_with_the_pytorch_eval_pipeline_on_real_photos(real_run: Path, real_export: Path) -> None:
    """The app path (Pillow resize in edgetl.preprocess + onnxruntime) against training's evaluation
    (torch model on the same decoded images), on the bundled sample's validation photos."""
    import torch

    from edgetl import checkpoint
    from edgetl.data import load_dataset
    from edgetl.decoded import decode_split
    from edgetl.train import predict_logits

    model, ckpt = checkpoint.load_model(real_run)
    t = ckpt["config"]["train"]
    ds = load_dataset(ckpt["config"]["data"], t["val_fraction"], t["seed"])
    images, _ = decode_split(ds.val, checkpoint.spec_of(ckpt))
    torch_top1 = predict_logits(model, images, checkpoint.spec_of(ckpt), torch.device("cpu")).argmax(1)
    clf = Classifier(real_export / "model.onnx")
    runtime = [clf.labels.index(p.label) for p in clf.predict([ref.path for ref in ds.val.refs])]  # type: ignore[union-attr]
    agreement = float(np.mean(np.asarray(runtime) == torch_top1))
    assert len(runtime) == 100 and agreement >= 0.995


runner = CliRunner()


def test_predict_cli_reports_bad_files_and_goes_on(tiny_models: Path, tiny_run: Path, tmp_path: Path) -> None:
    good = next((Path(json.loads((tiny_run / "manifest.json").read_text())["dataset"]["root"]) / "blue").iterdir())
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 nope")
    result = runner.invoke(app, ["predict", str(tiny_models / "model.onnx"), str(good), str(bad), "--json", "--top-k", "2"])
    assert result.exit_code == 1
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {Path(r["path"]).name for r in lines} == {good.name, "broken.jpg"}
    ok = next(r for r in lines if "label" in r)
    assert len(ok["top_k"]) == 2 and 0 < ok["probability"] <= 1
    assert "error" in next(r for r in lines if Path(r["path"]).name == "broken.jpg")


def test_predict_cli_folder_and_table(tiny_models: Path, tiny_run: Path) -> None:
    folder = Path(json.loads((tiny_run / "manifest.json").read_text())["dataset"]["root"]) / "green"
    result = runner.invoke(app, ["predict", str(tiny_models / "model.onnx"), str(folder)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.output.count("green_") == 12


def test_predict_names_the_runtime_of_a_model_it_does_not_run(tmp_path: Path) -> None:
    """An ExecuTorch or OpenVINO file given to predict was refused by onnxruntime's protobuf parser ("INVALID_PROTOBUF")."""
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    for name, words in (("model.pte", "an ExecuTorch program"), ("model.xml", "an OpenVINO model")):
        model = tmp_path / name
        model.write_bytes(b"edgetl export wrote this for another runtime")
        result = runner.invoke(app, ["predict", str(model), str(image)])
        assert result.exit_code == 2 and words in result.output and "bench" in result.output, result.output
        assert "PROTOBUF" not in result.output and "Traceback" not in result.output


def test_predict_table_keeps_long_paths_whole_in_a_log(tiny_models: Path, tiny_run: Path, tmp_path: Path) -> None:
    """Written to a file or a pipe, the table is as wide as its paths: `edgetl predict ... > log` once cut a
    path longer than the 240-column log width to "…", and the row no longer said which image it was."""
    source = Path(json.loads((tiny_run / "manifest.json").read_text())["dataset"]["root"]) / "green"
    folder = tmp_path.joinpath(*["a-folder-with-a-long-name-" + str(i) for i in range(8)])
    shutil.copytree(source, folder)
    (folder / "broken.png").write_bytes(b"not an image")  # its error message repeats the path: a second wide column
    result = runner.invoke(app, ["predict", str(tiny_models / "model.onnx"), str(folder)])
    assert result.exit_code == 1
    assert len(str(folder / "green_0.png")) > 240 and "…" not in result.output
    for name in ("broken.png", *(f"green_{i}.png" for i in range(12))):
        assert str(folder / name) in result.output


def test_predict_cli_skips_hidden_files_in_a_folder_as_training_does(tiny_models: Path, tiny_run: Path, tmp_path: Path) -> None:
    source = Path(json.loads((tiny_run / "manifest.json").read_text())["dataset"]["root"]) / "green"
    folder = tmp_path / "photos"
    shutil.copytree(source, folder)
    (folder / "._green_0.png").write_bytes(b"\x00\x05\x16\x07" + bytes(200))  # what macOS writes beside each file on a FAT disk
    (folder / ".thumbnails").mkdir()
    shutil.copy(source / "green_0.png", folder / ".thumbnails" / "green_0.png")
    result = runner.invoke(app, ["predict", str(tiny_models / "model.onnx"), str(folder), "--json"])
    assert result.exit_code == 0, result.output
    paths = [json.loads(line)["path"] for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(Path(p).name for p in paths) == sorted(p.name for p in source.iterdir())


def test_predict_cli_refuses_a_non_model(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_text("x")
    result = runner.invoke(app, ["predict", str(tmp_path / "m.onnx"), str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output and "error:" in result.output


@pytest.mark.parametrize(("n", "fixed", "sizes"), [(10, 4, [4, 4, 4]), (8, 4, [4, 4]), (3, None, [3]), (70, None, [32, 32, 6])])
def test_run_in_chunks_pads_only_for_fixed_batch_models(n: int, fixed: int | None, sizes: list[int]) -> None:
    from edgetl.runners import run_in_chunks

    seen: list[int] = []

    def model(x: np.ndarray) -> np.ndarray:  # row-wise, so padding must not leak into real rows
        seen.append(len(x))
        return x.sum(axis=1, keepdims=True) * 2

    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3) + 1
    out = run_in_chunks(model, x, fixed)
    assert seen == sizes
    np.testing.assert_array_equal(out, x.sum(axis=1, keepdims=True) * 2)


def test_classifier_runs_a_fixed_batch_model_on_any_number_of_images(tiny_run: Path, tmp_path: Path) -> None:
    export_run(tiny_run, ExportOptions(format="onnx", out=str(tmp_path / "fixed"), batch="4"), QUIET)
    export_run(tiny_run, ExportOptions(format="onnx", out=str(tmp_path / "dyn")), QUIET)
    x = np.random.default_rng(0).normal(size=(7, 3, 64, 64)).astype(np.float32)
    fixed, dyn = Classifier(tmp_path / "fixed" / "model.onnx"), Classifier(tmp_path / "dyn" / "model.onnx")
    assert fixed.fixed_batch == 4 and dyn.fixed_batch is None
    np.testing.assert_allclose(fixed.logits(x), dyn.logits(x), atol=1e-5)
