"""Byte-identical images across the training and validation splits, and under two classes, are found,
said and recorded; the test split is not read for it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from edgetl.config import TrainConfig
from edgetl.data import ImageRef, LabelledSet, load_dataset
from edgetl.duplicates import find_duplicates
from edgetl.evaluate import evaluate
from edgetl.progress import Reporter
from edgetl.train import train


def _classes(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_copies_across_splits_and_classes_are_found(split_folder: Path) -> None:
    red, green, blue = (c for c in _classes(split_folder / "train") if c in ("red", "green", "blue"))
    shutil.copy(split_folder / "val" / red / f"{red}_0.png", split_folder / "train" / red / "copy_of_val.png")
    shutil.copy(split_folder / "train" / green / f"{green}_1.png", split_folder / "train" / blue / "mislabelled.png")
    ds = load_dataset(split_folder)
    found = find_duplicates(ds.train, ds.val, ds.classes)
    assert found.across == 1
    (val_key, train_key), = found.across_examples
    assert val_key.endswith(f"{red}_0.png") and train_key.endswith("copy_of_val.png")
    assert found.conflicting == 2  # the original and its copy under blue
    ((a, class_a, b, class_b),) = found.conflicting_examples
    assert {Path(a).name, Path(b).name} == {f"{green}_1.png", "mislabelled.png"} and {class_a, class_b} == {green, blue}
    said = " ".join(found.warnings())
    assert "1 validation image(s) are byte-identical to training images" in said
    assert "2 image(s) have a byte-identical copy filed under another class" in said


def test_distinct_images_are_not_duplicates_even_at_equal_size(split_folder: Path) -> None:
    # The generated PNGs share their size often, so their bytes are compared, and differ.
    ds = load_dataset(split_folder)
    found = find_duplicates(ds.train, ds.val, ds.classes)
    assert (found.across, found.conflicting) == (0, 0)
    assert found.warnings() == []


def test_in_memory_images_are_compared_by_their_pixels() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    pixels[3] = pixels[1]  # a copy of a training image, in validation under another class

    def refs(*indices: int) -> list[ImageRef]:
        return [ImageRef(key=f"img{i}", array=pixels, index=i) for i in indices]

    train_set = LabelledSet(refs(0, 1), np.array([0, 1]))
    val_set = LabelledSet(refs(2, 3), np.array([0, 0]))
    found = find_duplicates(train_set, val_set, ["a", "b"])
    assert (found.across, found.conflicting) == (1, 2)
    assert found.across_examples == [("img3", "img1")]


class _Recorder(Reporter):
    """Keeps the log lines (warnings included) as plain text."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def log(self, message: object) -> None:
        self.lines.append(str(message))


def test_training_and_eval_say_and_record_what_they_found(split_folder: Path, tmp_path: Path) -> None:
    red = _classes(split_folder / "train")[0]
    shutil.copy(split_folder / "val" / red / f"{red}_0.png", split_folder / "train" / red / "copy_of_val.png")
    shutil.copy(split_folder / "train" / red / f"{red}_2.png", split_folder / "test" / red / "copy_of_train.png")
    cfg = TrainConfig(backbone="tiny", pretrained=False, epochs_head=1, epochs_finetune=0, batch_size=8, seed=0)
    reporter = _Recorder()
    run = train(split_folder, cfg, out=str(tmp_path / "run"), reporter=reporter).run_dir
    recorded = json.loads((run / "manifest.json").read_text())["duplicates"]
    assert recorded["val_in_train"] == 1 and recorded["conflicting_labels"] == 0
    assert recorded["val_in_train_examples"][0][1].endswith("copy_of_val.png")
    assert any(line.startswith("warning: 1 validation image(s) are byte-identical to training images") for line in reporter.lines)

    on_test = evaluate(run, split_folder, reporter=reporter)  # the test split, with one copy of a training image
    assert on_test["copies_of_training_images"] == {"count": 1, "examples": [[f"test/{red}/copy_of_train.png", f"train/{red}/{red}_2.png"]]}
    assert any(line.startswith("warning: 1 of the ") and "byte-identical to images the run trained on" in line for line in reporter.lines)
    on_train = evaluate(run, split_folder, split="train", reporter=Reporter(quiet=True))
    assert on_train["copies_of_training_images"]["count"] == 0  # no image is its own copy
