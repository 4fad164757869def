"""Byte-identical images across the training and validation splits, and under two classes, are found,
said and recorded; the test split is not read for it."""

from __future__ import annotations

import builtins
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetl.config import TrainConfig
from edgetl.data import ImageRef, LabelledSet, content_digest, load_dataset
from edgetl.decoded import DecodedImages, decode_split
from edgetl.duplicates import Duplicates, find_duplicates
from edgetl.errors import EdgetlError
from edgetl.evaluate import evaluate
from edgetl.preprocess import PreprocessSpec
from edgetl.progress import Reporter
from edgetl.train import train

SPEC = PreprocessSpec(32, 36, "bicubic", (0.5,) * 3, (0.5,) * 3)


def _classes(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def _decoded(ls: LabelledSet) -> DecodedImages:
    return decode_split(ls, SPEC)[0]


def _find(train_set: LabelledSet, val_set: LabelledSet, classes: list[str]) -> Duplicates:
    return find_duplicates(_decoded(train_set), _decoded(val_set), classes)


def test_copies_across_splits_and_classes_are_found(split_folder: Path) -> None:
    red, green, blue = (c for c in _classes(split_folder / "train") if c in ("red", "green", "blue"))
    shutil.copy(split_folder / "val" / red / f"{red}_0.png", split_folder / "train" / red / "copy_of_val.png")
    shutil.copy(split_folder / "train" / green / f"{green}_1.png", split_folder / "train" / blue / "mislabelled.png")
    ds = load_dataset(split_folder)
    found = _find(ds.train, ds.val, ds.classes)
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
    sizes = Counter(r.size_on_disk() for r in ds.train.refs + ds.val.refs)
    assert max(sizes.values()) > 1, "no two images share a byte count: the test would not compare contents"
    found = _find(ds.train, ds.val, ds.classes)
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
    found = _find(train_set, val_set, ["a", "b"])
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


def test_the_decode_hashes_the_bytes_it_read(split_folder: Path, tmp_path: Path) -> None:
    ds = load_dataset(split_folder)
    bad = split_folder / "train" / _classes(split_folder / "train")[0] / "broken.png"
    bad.write_bytes(b"not an image")
    ds = load_dataset(split_folder)
    images, failed = decode_split(ds.train, SPEC)
    assert [Path(f["file"]).name for f in failed] == ["broken.png"]
    assert "BytesIO" not in failed[0]["reason"]  # the buffer's repr says nothing; the record names the file
    assert images.digests.shape == (len(ds.train) - 1, 16)
    for ref, digest in zip(images.refs, images.digests, strict=True):
        assert digest.tobytes() == content_digest(Path(ref.path).read_bytes())
    half = images.subset(np.arange(0, len(images), 2))
    assert (half.digests == images.digests[::2]).all()


def test_training_reads_each_image_once(split_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The duplicate check takes the digests from the decode's own read: no image file is opened twice.
    red = _classes(split_folder / "train")[0]
    shutil.copy(split_folder / "val" / red / f"{red}_0.png", split_folder / "train" / red / "copy_of_val.png")
    opened: list[str] = []
    real_open = builtins.open

    def spy_open(file: object, *a: object, **k: object) -> object:
        if isinstance(file, (str, os.PathLike)):
            opened.append(os.fspath(file))
        return real_open(file, *a, **k)  # type: ignore[call-overload]

    monkeypatch.setattr(builtins, "open", spy_open)
    cfg = TrainConfig(backbone="tiny", pretrained=False, epochs_head=1, epochs_finetune=0, batch_size=8, seed=0)
    run = train(split_folder, cfg, out=str(tmp_path / "run"), reporter=Reporter(quiet=True)).run_dir
    monkeypatch.undo()
    images = Counter(p for p in opened if p.endswith(".png"))
    assert len(images) == len(list((split_folder / "train").rglob("*.png"))) + len(list((split_folder / "val").rglob("*.png")))
    assert set(images.values()) == {1}, [p for p, n in images.items() if n > 1][:3]
    assert json.loads((run / "manifest.json").read_text())["duplicates"]["val_in_train"] == 1


def test_shares_decoded_by_several_processes_join_with_their_digests_in_order(split_folder: Path, tmp_path: Path) -> None:
    # What torchrun's processes of a node do (Trainer._decode): each decodes every 2nd image; the join
    # must put each digest back beside its image, or a copy would be missed or an image paired wrongly.
    red = _classes(split_folder / "train")[0]
    shutil.copy(split_folder / "val" / red / f"{red}_1.png", split_folder / "train" / red / "copy_of_val.png")
    ds = load_dataset(split_folder)
    whole = _decoded(ds.train)
    parts = []
    for share in range(2):
        mine = np.arange(share, len(ds.train), 2)
        part, _ = decode_split(ds.train.subset(mine), SPEC, cache_dir=tmp_path)
        parts.append((str(part.paths[0]), part.index, mine[part.positions], part.digests))
        part.disown()
    joined = DecodedImages.join(ds.train, parts, SPEC.resize_size, SPEC.interpolation)
    assert [r.key for r in joined.refs] == [r.key for r in whole.refs]
    assert (joined.digests == whole.digests).all()
    found = find_duplicates(joined, _decoded(ds.val), ds.classes)
    assert found.across == 1 and found.across_examples[0][1].endswith("copy_of_val.png")


def test_the_run_records_digests_and_eval_needs_no_training_image(split_folder: Path, tmp_path: Path) -> None:
    red = _classes(split_folder / "train")[0]
    shutil.copy(split_folder / "train" / red / f"{red}_2.png", split_folder / "test" / red / "copy_of_train.png")
    (split_folder / "train" / red / "broken.png").write_bytes(b"not an image")
    cfg = TrainConfig(backbone="tiny", pretrained=False, epochs_head=1, epochs_finetune=0, batch_size=8, seed=0)
    run = train(split_folder, cfg, out=str(tmp_path / "run"), reporter=Reporter(quiet=True)).run_dir
    record = json.loads((run / "splits.json").read_text())
    assert record["format_version"] == 4
    for split in ("train", "val"):
        for key, _, _, digest in record["splits"][split]:
            if key.endswith("broken.png"):
                assert digest is None  # never decoded, so no digest
            else:
                assert digest == content_digest((split_folder / key).read_bytes()).hex()
    assert all(len(row) == 3 for row in record["splits"]["test"])  # training never read the test split

    # The training images gone: the recorded digests still find the copy, and the same pairs as before.
    moved = tmp_path / "elsewhere"
    shutil.move(split_folder / "train", moved)
    scored = evaluate(run, split_folder / "test", reporter=Reporter(quiet=True))
    assert scored["copies_of_training_images"] == {"count": 1, "examples": [[f"{red}/copy_of_train.png", f"train/{red}/{red}_2.png"]]}

    # A run recorded before digests (format 2, three columns) reads its training images for the same answer.
    shutil.move(moved, split_folder / "train")
    record["splits"] = {split: [row[:3] for row in rows] for split, rows in record["splits"].items()}
    (run / "splits.json").write_text(json.dumps({**record, "format_version": 2}))
    again = evaluate(run, split_folder / "test", reporter=Reporter(quiet=True))
    assert again["copies_of_training_images"] == scored["copies_of_training_images"]
    shutil.move(split_folder / "train", moved)
    assert evaluate(run, split_folder / "test", reporter=Reporter(quiet=True))["copies_of_training_images"] is None


def _photo_like(seed: int) -> Image.Image:
    """Smooth shapes on a gradient: what a JPEG re-encode or a resize leaves recognisable (noise it would not)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:120, 0:160]
    img = np.stack([x * 1.5, y * 2.0, (x + y) * 0.8], axis=-1)
    for _ in range(4):
        cy, cx, r = rng.integers(20, 100), rng.integers(20, 140), rng.integers(10, 30)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r**2] = rng.integers(0, 255, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def test_a_reencoded_resized_copy_looks_the_same_and_is_recorded(split_folder: Path, tmp_path: Path) -> None:
    red = _classes(split_folder / "train")[0]
    original = _photo_like(0)
    original.save(split_folder / "val" / red / "photo.png")
    original.resize((120, 90), Image.Resampling.BICUBIC).save(split_folder / "train" / red / "photo_small.jpg", quality=70)
    _photo_like(1).save(split_folder / "train" / red / "another_photo.png")  # alike in kind, not the same picture
    ds = load_dataset(split_folder)
    found = _find(ds.train, ds.val, ds.classes)
    assert (found.across, found.near) == (0, 1)
    assert found.near_examples == [(f"val/{red}/photo.png", f"train/{red}/photo_small.jpg")]
    assert any("1 validation image(s) look the same as training images" in w for w in found.warnings())
    assert found.to_dict()["val_looks_like_train"] == 1


def test_eval_finds_look_alikes_of_training_images_from_the_record(split_folder: Path, tmp_path: Path) -> None:
    """The test split is never read in training, so its look-alikes of training images are eval's to find: from
    the training images' thumbnails the run recorded, reading only the nearest training images to confirm."""
    red = _classes(split_folder / "train")[0]
    original = _photo_like(0)
    original.save(split_folder / "train" / red / "photo.png")
    original.resize((120, 90), Image.Resampling.BICUBIC).save(split_folder / "test" / red / "photo_again.jpg", quality=70)
    shutil.copy(split_folder / "train" / red / "photo.png", split_folder / "test" / red / "photo_copy.png")
    _photo_like(1).save(split_folder / "test" / red / "another_photo.png")  # alike in kind, not the same picture
    cfg = TrainConfig(backbone="tiny", pretrained=False, epochs_head=1, epochs_finetune=0, batch_size=8, seed=0)
    run = train(split_folder, cfg, out=str(tmp_path / "run"), reporter=Reporter(quiet=True)).run_dir
    record = json.loads((run / "splits.json").read_text())
    assert record["format_version"] == 4 and record["train_vectors"]["images"] == len(record["splits"]["train"])

    reporter = _Recorder()
    on_test = evaluate(run, split_folder, reporter=reporter)
    assert on_test["looks_like_training_images"] == {"count": 1, "unconfirmed": 0,
                                                     "examples": [[f"test/{red}/photo_again.jpg", f"train/{red}/photo.png"]]}  # fmt: skip
    assert on_test["copies_of_training_images"]["count"] == 1  # the byte-identical one, counted there only
    assert any("1 of the " in line and "look the same as images the run trained on" in line for line in reporter.lines)
    on_train = evaluate(run, split_folder, split="train", reporter=Reporter(quiet=True))
    assert on_train["looks_like_training_images"]["count"] == 0  # no image looks like itself

    # The training images gone: the record still finds what is near them, which cannot be confirmed.
    shutil.move(split_folder / "train", tmp_path / "elsewhere")
    reporter = _Recorder()
    gone = evaluate(run, split_folder / "test", reporter=reporter)["looks_like_training_images"]
    assert gone["count"] == 0 and gone["unconfirmed"] >= 1
    assert any("not here to compare with" in line for line in reporter.lines)
    # The recorded thumbnails changed after training: one clear error, not a silent guess.
    (run / "train_vectors.npz").write_bytes(b"changed")
    with pytest.raises(EdgetlError, match="not the file this run recorded"):
        evaluate(run, split_folder / "test", reporter=Reporter(quiet=True))
    (run / "train_vectors.npz").unlink()
    with pytest.raises(EdgetlError, match="missing from the run folder"):
        evaluate(run, split_folder / "test", reporter=Reporter(quiet=True))


def test_the_candidate_search_matches_brute_force_nearest_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """_candidates (blocked products, a comparison with the bound, then a sort of the few found) against the
    definition: per query, the NEAREST pool rows whose RMS difference is within CANDIDATE_RMS, nearest first."""
    from edgetl import duplicates
    from edgetl.duplicates import CANDIDATE_RMS, NEAREST, _candidates

    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, size=(3000, 64)).astype(np.uint8)
    queries = rng.integers(0, 256, size=(40, 64)).astype(np.uint8)
    for i in range(0, 40, 2):  # half the queries get 1 to 12 near copies, some just beyond the bound
        for j in rng.choice(len(pool), size=1 + i // 4 * 2, replace=False):
            pool[j] = np.clip(queries[i].astype(int) + rng.integers(-16, 17, size=64), 0, 255)
    rms = np.sqrt(((queries[:, None, :].astype(float) - pool[None].astype(float)) ** 2).mean(-1))
    expected = {}
    for i in range(len(queries)):
        order = [int(j) for j in np.argsort(rms[i], kind="stable")[:NEAREST] if rms[i, j] <= CANDIDATE_RMS]
        if order:
            expected[i] = order
    assert len(expected) >= 10 and max(map(len, expected.values())) == NEAREST  # the cases under test are there
    assert ((rms > CANDIDATE_RMS) & (rms < CANDIDATE_RMS * 1.05)).sum() >= 3  # and copies just beyond the bound
    monkeypatch.setattr(duplicates, "BLOCK_FLOATS", 1 << 14)  # several blocks of 5 queries
    assert dict(_candidates(queries, pool)) == expected
