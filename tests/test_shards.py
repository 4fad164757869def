"""WebDataset shards: folder -> shards -> the same images and labels; bad shards fail in one line."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_folder
from typer.testing import CliRunner

from edgetl.cli.main import app
from edgetl.data import load_dataset
from edgetl.decoded import decode_split
from edgetl.errors import EdgetlError
from edgetl.evaluate import evaluate
from edgetl.preprocess import PreprocessSpec, decode_image
from edgetl.shards import write_shards

runner = CliRunner()
SPEC = PreprocessSpec(32, 36, "bicubic", (0.5,) * 3, (0.5,) * 3)


def _members(root: Path) -> set[tuple[str, str, int]]:
    """(relative path without extension, class, bytes) of every image of a folder dataset's split."""
    return {(p.relative_to(root).with_suffix("").as_posix(), p.parent.name, p.stat().st_size) for p in root.rglob("*.png")}


def test_folder_to_shards_to_dataset_keeps_every_image_and_label(split_folder: Path, tmp_path: Path) -> None:
    summary = write_shards(split_folder, tmp_path / "shards", shard_size=7)
    assert set(summary["splits"]) == {"train", "val", "test"}
    assert (tmp_path / "shards" / "classes.txt").read_text().split() == ["blue", "green", "red"]
    ds = load_dataset(summary["splits"]["train"]["pattern"], val_data=summary["splits"]["val"]["pattern"])
    assert ds.kind == "shards" and ds.classes == ["blue", "green", "red"]
    for split, ls in (("train", ds.train), ("val", ds.val)):
        got = {(r.key.split("/", 1)[1], ds.classes[int(lab)], r.size_on_disk()) for r, lab in zip(ls.refs, ls.labels, strict=True)}
        assert got == _members(split_folder / split)
    # The bytes read back from a shard are the original file's: same pixels.
    ref = ds.train.refs[0]
    original = split_folder / "train" / (ref.key.split("/", 1)[1] + ".png")
    assert np.array_equal(np.asarray(ref.load()), np.asarray(decode_image(original)))


def test_a_test_folder_without_a_validation_folder_is_sharded_too(tmp_path: Path) -> None:
    make_folder(tmp_path / "data" / "train", per_class=4, seed=1)
    make_folder(tmp_path / "data" / "test", per_class=2, seed=2)
    summary = write_shards(tmp_path / "data", tmp_path / "shards", shard_size=100)
    assert {k: v["samples"] for k, v in summary["splits"].items()} == {"train": 12, "test": 6}
    assert (tmp_path / "shards" / "test-000000.tar").is_file()


def test_training_on_shards_records_them_and_later_stages_read_them(image_folder: Path, tmp_path: Path) -> None:
    write_shards(image_folder, tmp_path / "shards", shard_size=10)
    pattern = str(tmp_path / "shards" / "train-{000000..000002}.tar")
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", pattern, "--backbone", "tiny", "--no-pretrained", "--epochs-head", "2",
                                 "--epochs-finetune", "1", "--out", str(run)])  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((run / "splits.json").read_text())
    assert record["kind"] == "shards" and record["patterns"]["train"] == pattern
    folder_ds = load_dataset(image_folder)
    shard_keys = {row[0].split("/", 1)[1] for rows in record["splits"].values() for row in rows}
    assert shard_keys == {r.key.rsplit(".", 1)[0] for ls in (folder_ds.train, folder_ds.val) for r in ls.refs}
    # Export's parity check reads the recorded validation samples back out of the shards.
    result = runner.invoke(app, ["export", str(run), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "export.json").read_text())["parity"]["onnx"]["n"] == len(record["splits"]["val"])
    # Scoring the shards themselves gives what scoring the folder they came from gives.
    from_shards = evaluate(run, pattern)
    from_folder = evaluate(run, image_folder)
    assert from_shards["scored"] == from_folder["scored"] == len(folder_ds.train) + len(folder_ds.val)
    assert from_shards["top1"] == from_folder["top1"] and from_shards["per_class_accuracy"] == from_folder["per_class_accuracy"]
    _fails(["eval", str(run), pattern, "--split", "test"], "drop --split test")


def test_corrupt_sample_inside_a_shard_is_skipped_and_counted(tmp_path: Path) -> None:
    make_folder(tmp_path / "data", per_class=4)
    write_shards(tmp_path / "data", tmp_path / "shards", shard_size=100)
    shard = tmp_path / "shards" / "train-000000.tar"
    with tarfile.open(shard, "a") as tar:
        for name, data in (("bad/broken.png", b"\x89PNG not really"), ("bad/broken.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = load_dataset(str(shard), val_fraction=0.25)
    everything = [*ds.train.refs, *ds.val.refs]
    assert any(r.key.endswith("bad/broken") for r in everything)
    failed = []
    for ls in (ds.train, ds.val):
        images, f = decode_split(ls, SPEC)
        failed += f
        assert len(images) == len(ls) - len(f)
    assert [f["file"] for f in failed] == ["train-000000.tar/bad/broken"]


def _fails(args: list[str], *needles: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), result.output


def test_a_shard_that_is_not_a_tar(tmp_path: Path) -> None:
    (tmp_path / "train-000000.tar").write_bytes(b"this is not a tar file at all" * 40)
    _fails(["train", str(tmp_path / "train-000000.tar"), "--out", str(tmp_path / "run")], "not a readable tar shard")
    assert not (tmp_path / "run").exists()


def test_a_pattern_that_matches_nothing(tmp_path: Path) -> None:
    _fails(["train", str(tmp_path / "train-{000000..000009}.tar"), "--out", str(tmp_path / "run")], "matches no file")
    assert not (tmp_path / "run").exists()


def test_samples_without_a_label(tmp_path: Path) -> None:
    shard = tmp_path / "train-000000.tar"
    buf = io.BytesIO()
    from conftest import make_image

    make_image((200, 0, 0), np.random.default_rng(0)).save(buf, format="PNG")
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"s{i}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    _fails(["train", str(shard), "--out", str(tmp_path / "run")], "have no label")


def test_shards_refuse_an_occupied_output_and_val_data_needs_shards(split_folder: Path, tmp_path: Path) -> None:
    write_shards(split_folder, tmp_path / "shards")
    with pytest.raises(EdgetlError, match="already holds shards"):
        write_shards(split_folder, tmp_path / "shards")
    _fails(["train", str(split_folder), "--val-data", str(tmp_path / "shards" / "val-000000.tar"), "--out", str(tmp_path / "r")],
           "--val-data goes with training shards")  # fmt: skip


def test_a_shard_is_indexed_once_until_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from edgetl import shards

    make_folder(tmp_path / "data", per_class=3)
    write_shards(tmp_path / "data", tmp_path / "shards", shard_size=100)
    shard = tmp_path / "shards" / "train-000000.tar"
    opened: list[str] = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda name, *a, **k: opened.append(str(name)) or real_open(name, *a, **k))
    first = shards.index_shards([shard])
    assert shards.index_shards([shard]) == first and opened == [str(shard)]
    # A rewritten shard (new mtime) is read again, and what it now holds is what is returned.
    img = next((tmp_path / "data").rglob("*.png")).read_bytes()
    with real_open(shard, "a") as tar:
        for name, data in (("extra.png", img), ("extra.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    again = shards.index_shards([shard])
    assert len(opened) == 2 and len(again) == len(first) + 1 and again[-1].key.endswith("/extra")


def test_a_pattern_the_shell_expanded_is_refused_with_the_quoted_pattern(split_folder: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    made = runner.invoke(app, ["shards", str(split_folder), str(shards), "--shard-size", "7"])
    assert made.exit_code == 0, made.output
    train_pattern = str(shards / "train-{000000..000004}.tar")  # 30 images in shards of 7
    assert f"train on them: edgetl train '{train_pattern}' --val-data '{shards}/val-{{000000..000001}}.tar'" in made.output
    # What bash passes for `edgetl train DIR/train-{000000..000004}.tar --val-data DIR/val-{000000..000001}.tar`:
    names = [str(p) for p in sorted(shards.glob("train-*.tar"))]
    vals = [str(p) for p in sorted(shards.glob("val-*.tar"))]
    result = runner.invoke(app, ["train", *names, "--val-data", *vals, "--backbone", "tiny"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    said = " ".join(result.output.split())
    assert "7 shard file names were given" in said and f"'{train_pattern}' and '{shards}/val-{{000000..000001}}.tar'" in said
    scored = runner.invoke(app, ["eval", str(tmp_path / "no-run"), *names])
    assert scored.exit_code == 2 and f"Quote it: '{train_pattern}'" in " ".join(scored.output.split())
    other = runner.invoke(app, ["train", str(split_folder), "stray"])
    assert other.exit_code == 2 and "unexpected extra argument(s): stray" in other.output


def test_pattern_for_undoes_an_expansion() -> None:
    from edgetl.shards import pattern_for

    assert pattern_for(["d/a-08.tar", "d/a-09.tar", "d/a-10.tar"]) == ["d/a-{08..10}.tar"]
    assert pattern_for(["d/a-1.tar", "d/a-3.tar"]) == ["d/a-{1,3}.tar"]  # a gap: a list, not a range
    assert pattern_for(["d/a-1.tar", "d/b-1.tar", "x.tar"]) == ["x.tar", "d/a-1.tar", "d/b-1.tar"]
