"""Dataset discovery, splits, IDX files and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_folder, write_idx

from edgetl.data import current_listing, listing, load_dataset, read_idx, stratified_split
from edgetl.decoded import decode_split
from edgetl.errors import EdgetlError
from edgetl.preprocess import PreprocessSpec

SPEC = PreprocessSpec(32, 36, "bicubic", (0.5,) * 3, (0.5,) * 3)


def test_class_folders_get_a_stratified_seeded_split(image_folder: Path) -> None:
    a = load_dataset(image_folder, val_fraction=0.25, seed=3)
    b = load_dataset(image_folder, val_fraction=0.25, seed=3)
    c = load_dataset(image_folder, val_fraction=0.25, seed=4)
    assert a.classes == ["blue", "green", "red"]
    assert a.val.class_counts(3) == [2, 2, 2] and a.train.class_counts(3) == [6, 6, 6]
    assert [r.key for r in a.val.refs] == [r.key for r in b.val.refs]
    assert [r.key for r in a.val.refs] != [r.key for r in c.val.refs]
    assert not {r.key for r in a.val.refs} & {r.key for r in a.train.refs}
    record = a.split_record()
    assert len(record["splits"]["train"]) == 18 and record["splits"]["val"][0][1] in a.classes
    assert record["splits"]["train"][0][2] > 0  # sizes, so a replaced file is noticed
    json.dumps(record)  # it is written to the run folder


def test_given_splits_are_used(split_folder: Path) -> None:
    ds = load_dataset(split_folder)
    assert ds.kind == "split-folders"
    assert (len(ds.train), len(ds.val), len(ds.test)) == (30, 12, 12)  # type: ignore[arg-type]


def test_a_test_folder_beside_a_lone_train_folder_stays_the_test_split(tmp_path: Path) -> None:
    # train/ + test/ without a validation folder (a common download layout): validation is held out of
    # train/, and test/ is recorded as the test split instead of being ignored.
    make_folder(tmp_path / "train", per_class=8, seed=1)
    make_folder(tmp_path / "Test", classes={"red": (200, 30, 30), "blue": (30, 30, 200)}, per_class=3, seed=2)
    ds = load_dataset(tmp_path, val_fraction=0.25, seed=0)
    assert ds.kind == "train-test-folders" and ds.classes == ["blue", "green", "red"]
    assert (len(ds.train), len(ds.val)) == (18, 6)
    assert ds.test is not None and ds.test.class_counts(3) == [3, 0, 3]
    assert all(r.key.startswith("Test/") for r in ds.test.refs)
    assert not any(r.key.startswith("Test/") for r in [*ds.train.refs, *ds.val.refs])
    assert "test: Test/" in ds.split_note
    # The run folder's data check finds the same files where training found them, test/ included.
    assert current_listing(tmp_path, ds.kind) == listing(ds)
    make_folder(tmp_path / "Test", classes={"purple": (120, 0, 120)}, per_class=1)
    with pytest.raises(EdgetlError, match="Test/ has classes that train/ does not: purple"):
        load_dataset(tmp_path)


def test_the_data_check_lists_every_split_folder_of_a_given_split(split_folder: Path) -> None:
    ds = load_dataset(split_folder)
    assert current_listing(split_folder, ds.kind) == listing(ds)


@pytest.mark.parametrize("val_name", ["valid", "validation"])
def test_val_folder_aliases(tmp_path: Path, val_name: str) -> None:
    make_folder(tmp_path / "train", per_class=3)
    make_folder(tmp_path / val_name, per_class=2)
    assert len(load_dataset(tmp_path).val) == 6


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(EdgetlError, match="does not exist"):
        load_dataset(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(EdgetlError, match="not a folder"):
        load_dataset(tmp_path / "x.txt")


def test_no_class_folders(tmp_path: Path) -> None:
    with pytest.raises(EdgetlError, match="no class folders"):
        load_dataset(tmp_path)


def test_empty_class_folder(image_folder: Path) -> None:
    (image_folder / "purple").mkdir()
    (image_folder / "purple" / "notes.txt").write_text("not an image")
    with pytest.raises(EdgetlError, match="purple"):
        load_dataset(image_folder)


def test_single_class(tmp_path: Path) -> None:
    make_folder(tmp_path, classes={"only": (1, 2, 3)})
    with pytest.raises(EdgetlError, match="only one class"):
        load_dataset(tmp_path)


def test_class_with_one_image_cannot_be_split(tmp_path: Path) -> None:
    make_folder(tmp_path, per_class=1)
    with pytest.raises(EdgetlError, match="single image"):
        load_dataset(tmp_path)


def test_train_and_val_classes_differ(tmp_path: Path) -> None:
    make_folder(tmp_path / "train", per_class=2)
    make_folder(tmp_path / "val", per_class=2, classes={"red": (1, 1, 1), "cyan": (0, 9, 9)})
    with pytest.raises(EdgetlError, match=r"only in train/: blue, green; only in val/: cyan"):
        load_dataset(tmp_path)


def test_corrupt_truncated_and_fake_images_are_skipped_and_listed(image_folder: Path) -> None:
    (image_folder / "red" / "fake.jpg").write_text("this is not a jpeg")
    good = (image_folder / "red" / "red_0.png").read_bytes()
    (image_folder / "red" / "truncated.png").write_bytes(good[: len(good) // 3])
    (image_folder / "blue" / "empty.webp").write_bytes(b"")
    ds = load_dataset(image_folder, val_fraction=0.2)
    everything = [*ds.train.refs, *ds.val.refs]
    assert len(everything) == 27
    skipped = []
    for ls in (ds.train, ds.val):
        images, failed = decode_split(ls, SPEC)
        skipped += failed
        assert len(images) == len(ls) - len(failed)
        assert all(images.get(i).mode == "RGB" for i in range(len(images)))
    assert sorted(Path(f["file"]).name for f in skipped) == ["empty.webp", "fake.jpg", "truncated.png"]
    assert all(f["reason"] for f in skipped)


def test_limits_take_stratified_subsets(image_folder: Path) -> None:
    ds = load_dataset(image_folder, val_fraction=0.25, limit_train=9)
    assert ds.train.class_counts(3) == [3, 3, 3]


def test_hold_out_folds_are_complementary_stratified_and_recorded(image_folder: Path) -> None:
    whole = load_dataset(image_folder, val_fraction=0.25, seed=3)
    folds = [load_dataset(image_folder, val_fraction=0.25, seed=3, hold_out_fold=f"{k}/3") for k in range(3)]
    keys = [{r.key for r in ds.train.refs} for ds in folds]
    every = {r.key for r in whole.train.refs}
    held = [every - k for k in keys]
    assert all(h and not (h & k) for h, k in zip(held, keys, strict=True)), "a fold is left out of its run and only of it"
    assert held[0] | held[1] | held[2] == every and not (held[0] & held[1] or held[0] & held[2] or held[1] & held[2])
    assert [ds.val.refs for ds in folds] == [whole.val.refs] * 3, "folds split the training images, never validation"
    assert all(ds.train.class_counts(3) == [4, 4, 4] for ds in folds), "6 training images a class: 2 of each held out"
    assert {r.key for r in folds[1].unused.refs} == held[1] and "fold 1 of 3" in folds[1].split_note
    assert "unused" in folds[1].split_record()["splits"]


def test_hold_out_folds_do_not_depend_on_the_seed(split_folder: Path) -> None:
    # The same training images (a given val/ folder): another seed deals every file the same fold.
    a, b = (load_dataset(split_folder, seed=seed, hold_out_fold="0/2") for seed in (3, 4))
    assert [r.key for r in a.unused.refs] == [r.key for r in b.unused.refs] and len(a.unused) == 15
    for bad in ("3/3", "1", "a/2", "0/1", "-1/2"):
        with pytest.raises(EdgetlError, match="hold-out-fold"):
            load_dataset(split_folder, hold_out_fold=bad)


def test_a_fold_that_would_empty_a_class_is_refused(tmp_path: Path) -> None:
    make_folder(tmp_path / "train", per_class=4)
    make_folder(tmp_path / "val", per_class=2, seed=1)
    only = next(p for p in sorted((tmp_path / "train").iterdir()))
    for extra in sorted(only.iterdir())[1:]:
        extra.unlink()  # one training image left in this class: the fold holding it would leave the class empty
    with pytest.raises(EdgetlError, match=f"too few training images for 2 folds \\(class {only.name} would have none left"):
        load_dataset(tmp_path, hold_out_fold="0/2")
    assert len(load_dataset(tmp_path, hold_out_fold="1/2").unused) == 4, "the other fold keeps it: 2 + 2 held out, 0 of it"


def test_stratified_split_keeps_one_in_each_side() -> None:
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    keep, held = stratified_split(labels, 0.2, np.random.default_rng(0))
    assert sorted(labels[held].tolist()) == [0, 1, 1]
    assert set(keep) | set(held) == set(range(10))


def test_idx_dataset(idx_folder: Path) -> None:
    ds = load_dataset(idx_folder, val_fraction=0.2)
    assert ds.kind == "idx" and ds.classes == ["0", "1", "2"]
    assert len(ds.train) + len(ds.val) == 60 and len(ds.test) == 15  # type: ignore[arg-type]
    img = ds.test.refs[0].load()  # type: ignore[union-attr]
    assert img.mode == "RGB" and img.size == (28, 28)
    rgb = np.asarray(img)
    assert (rgb[..., 0] == rgb[..., 2]).all()  # grayscale replicated to 3 channels


def test_idx_labels_txt_names_classes(idx_folder: Path) -> None:
    (idx_folder / "labels.txt").write_text("tl\ntr\nbottom\n")
    assert load_dataset(idx_folder).classes == ["tl", "tr", "bottom"]


def test_fashion_mnist_folder_gets_its_class_names(tmp_path: Path, idx_folder: Path) -> None:
    fm = tmp_path / "fashion-mnist"
    fm.mkdir()
    labels = np.arange(20, dtype=np.uint8) % 10
    write_idx(fm / "train-images-idx3-ubyte.gz", np.zeros((20, 28, 28), np.uint8))
    write_idx(fm / "train-labels-idx1-ubyte.gz", labels)
    ds = load_dataset(fm, val_fraction=0.5)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"


def test_truncated_idx_is_a_clear_error(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), gz=False)
    data = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(data[:-50])
    with pytest.raises(EdgetlError, match="truncated"):
        read_idx(tmp_path / "train-images-idx3-ubyte")


def test_idx_without_labels(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(EdgetlError, match="labels"):
        load_dataset(tmp_path)


def test_fingerprint_changes_with_content(image_folder: Path) -> None:
    a = load_dataset(image_folder).fingerprint()
    (image_folder / "red" / "red_0.png").rename(image_folder / "red" / "renamed.png")
    assert load_dataset(image_folder).fingerprint() != a
