"""The bad-input sweep of issue 13: each case is one clear error (exit 2 in the CLI), never a traceback,
wrong labels with exit 0, NaN probabilities or a silent all-black image."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgetl.cli.main import app
from edgetl.data import load_dataset
from edgetl.errors import EdgetlError
from edgetl.export import ExportOptions, export_run, set_onnx_metadata
from edgetl.metadata import read_onnx_metadata
from edgetl.preprocess import decode_image
from edgetl.progress import Reporter
from edgetl.runtime import Classifier

runner = CliRunner()


@pytest.fixture(scope="module")
def onnx_model(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("meta")
    export_run(tiny_run, ExportOptions(format="onnx", out=str(out)), Reporter(quiet=True))
    return out / "model.onnx"


def _with_meta(model: Path, tmp_path: Path, change: dict[str, str | None]) -> Path:
    meta = read_onnx_metadata(str(model))
    for k, v in change.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    target = tmp_path / "hostile.onnx"
    shutil.copy(model, target)
    set_onnx_metadata(target, meta)
    return target


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"labels": "not json"}, "'labels' is not valid JSON"),
        ({"labels": '{"a": 1}'}, "list of strings"),
        ({"labels": "[1, 2, 3]"}, "list of strings"),
        ({"labels": '["a", "b", "c", "d"]'}, "4 labels in the metadata, but the model has 3 outputs"),
        ({"mean": "[0.5, 0.5]"}, "'mean' must be a list of 3 numbers"),
        ({"std": "[0.0, 0.2, 0.2]"}, "'std' must be positive"),
        ({"std": '[NaN, 0.2, 0.2]'}, "not finite"),
        ({"input_size": "-4"}, "out of range"),
        ({"input_size": "100000", "resize_shorter_side": "100000"}, "out of range"),
        ({"input_size": "ten"}, "whole numbers"),
        ({"preprocessing_in_graph": "true"}, "metadata describes uint8 NHWC"),
        ({"mean": None}, "mean missing"),
    ],
)
def test_malformed_metadata_is_one_clear_error(onnx_model: Path, tmp_path: Path, tiny_run: Path, change: dict, fragment: str) -> None:
    bad = _with_meta(onnx_model, tmp_path, change)
    with pytest.raises(ValueError, match=fragment):
        Classifier(bad)
    image = next((Path(json.loads((tiny_run / "splits.json").read_text())["root"]) / "red").iterdir())
    result = runner.invoke(app, ["predict", str(bad), str(image)])
    assert result.exit_code == 2 and fragment.split("'")[0] in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


@pytest.mark.parametrize("batch", ["0", "-1"])
def test_predict_batch_must_be_positive(onnx_model: Path, tiny_run: Path, batch: str) -> None:
    image = next((Path(json.loads((tiny_run / "splits.json").read_text())["root"]) / "red").iterdir())
    result = runner.invoke(app, ["predict", str(onnx_model), str(image), "--batch", batch])
    assert result.exit_code == 2 and "--batch must be at least 1" in result.output


# ----------------------------------------------------------------------------- IDX files


def _idx(path: Path, code: int, dims: tuple[int, ...], body: bytes) -> None:
    path.write_bytes(bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + body)


def _idx_set(root: Path, images: tuple[int, tuple[int, ...], bytes], labels: tuple[int, tuple[int, ...], bytes]) -> Path:
    root.mkdir()
    _idx(root / "train-images-idx3-ubyte", *images)
    _idx(root / "train-labels-idx1-ubyte", *labels)
    return root


GOOD_IMAGES = (0x08, (4, 8, 8), bytes(4 * 64))
GOOD_LABELS = (0x08, (4,), bytes([0, 1, 0, 1]))


@pytest.mark.parametrize(
    ("images", "labels", "fragment"),
    [
        ((0x08, (4, 8, 8), bytes(4 * 64)), (0x08, (), b""), "0 dimensions"),
        (GOOD_IMAGES, (0x09, (4,), struct.pack("4b", 0, 1, -1, 1)), "negative labels"),
        (GOOD_IMAGES, (0x0D, (4,), struct.pack(">4f", 0, 1, float("nan"), 1)), "not whole numbers"),
        ((0x08, (0, 8, 8), b""), (0x08, (0,), b""), "holds no images"),
        ((0x0D, (4, 8, 8), struct.pack(">256f", *([3000.0] * 256))), GOOD_LABELS, "expected 0-255"),
    ],
)
def test_malformed_idx_files(tmp_path: Path, images: tuple, labels: tuple, fragment: str) -> None:
    root = _idx_set(tmp_path / "idx", images, labels)
    with pytest.raises(EdgetlError, match=fragment):
        load_dataset(root)


def test_truncated_idx_header(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    root.mkdir()
    (root / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + b"\0\0\0\4")
    _idx(root / "train-labels-idx1-ubyte", *GOOD_LABELS)
    with pytest.raises(EdgetlError, match="truncated"):
        load_dataset(root)


def test_float_idx_images_in_0_1_are_not_black(tmp_path: Path) -> None:
    pixels = np.full((4, 8, 8), 0.8, dtype=">f4")
    root = _idx_set(tmp_path / "idx", (0x0D, (4, 8, 8), pixels.tobytes()), GOOD_LABELS)
    ds = load_dataset(root, val_fraction=0.5)
    assert np.asarray(ds.train.refs[0].load()).max() == 204


# ----------------------------------------------------------------------------- image folders


def test_a_symlink_back_to_the_root_is_not_a_class(image_folder: Path) -> None:
    os.symlink(image_folder, image_folder / "loop")
    ds = load_dataset(image_folder)
    assert ds.classes == ["blue", "green", "red"] and len(ds.train) + len(ds.val) == 24


def test_a_class_name_with_a_newline_is_refused(image_folder: Path) -> None:
    shutil.copytree(image_folder / "red", image_folder / "bad\nname")
    with pytest.raises(EdgetlError, match="control character"):
        load_dataset(image_folder)


def test_a_test_folder_with_some_classes_is_scored_as_it_is(split_folder: Path) -> None:
    shutil.rmtree(split_folder / "test" / "blue")
    ds = load_dataset(split_folder)
    assert ds.test is not None and set(ds.test.labels.tolist()) == {1, 2} and ds.classes == ["blue", "green", "red"]
    (split_folder / "test" / "purple").mkdir()
    Image.new("RGB", (8, 8)).save(split_folder / "test" / "purple" / "p.png")
    with pytest.raises(EdgetlError, match="test/ has classes that train/ does not: purple"):
        load_dataset(split_folder)


def test_a_float_tiff_in_0_1_is_not_black(tmp_path: Path) -> None:
    path = tmp_path / "f.tif"
    Image.fromarray(np.full((6, 6), 0.8, dtype=np.float32), mode="F").save(path)
    assert np.asarray(decode_image(path)).min() == 204


# ----------------------------------------------------------------------------- where the run folder goes


def test_a_run_folder_inside_the_data_is_refused_and_nothing_is_left(image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `cd data && edgetl train .` would put models/ among the class folders: an empty class now, a class of
    # PNG plots in every later training.
    before = sorted(p.name for p in image_folder.iterdir())
    monkeypatch.chdir(image_folder)
    result = runner.invoke(app, ["train", ".", "--backbone", "tiny", "--no-pretrained"])
    assert result.exit_code == 2 and "is inside the data folder" in result.output and "class 'models'" in result.output
    assert "Traceback" not in result.output
    red = sorted(p.name for p in image_folder.iterdir())[0]
    result = runner.invoke(app, ["train", ".", "--backbone", "tiny", "--no-pretrained", "--out", f"{red}/run"])
    assert result.exit_code == 2 and f"--out {red}/run is inside the data folder" in result.output
    assert sorted(p.name for p in image_folder.iterdir()) == before and not (image_folder / red / "run").exists()


def test_a_failed_start_removes_the_folders_it_made_for_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "photos" / "empty").mkdir(parents=True)  # a data folder whose one class has no image
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "photos", "--backbone", "tiny", "--no-pretrained"])
    assert result.exit_code == 2 and "no images" in result.output
    assert not (tmp_path / "models").exists()  # models/ was made for the default run folder, and is gone
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "kept").mkdir()
    result = runner.invoke(app, ["train", "photos", "--backbone", "tiny", "--no-pretrained", "--out", "models/a/b"])
    assert result.exit_code == 2
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["kept"]  # a/ and a/b/ gone, the rest kept


def test_a_run_beside_idx_files_is_fine(tmp_path: Path) -> None:
    from conftest import write_idx

    from edgetl.data import check_run_outside_data

    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((4, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(4, dtype=np.uint8))
    check_run_outside_data(tmp_path / "models" / "run", tmp_path, given=False)  # IDX data is not searched for images
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(EdgetlError, match="inside the data folder"):
        check_run_outside_data(tmp_path / "models" / "run", tmp_path, given=False)


def test_a_model_file_given_for_a_run_folder_points_to_bench(onnx_model: Path, tiny_run: Path) -> None:
    data = json.loads((tiny_run / "splits.json").read_text())["root"]
    result = runner.invoke(app, ["eval", str(onnx_model), data])
    assert result.exit_code == 2 and "is an exported model, not a run folder" in result.output
    assert f"edgetl bench {onnx_model} --data DATA" in " ".join(result.output.split())
