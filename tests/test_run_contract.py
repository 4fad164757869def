"""The run folder as the one contract between stages (issue 13): each test names a defect it guards."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgetl.cli.main import app
from edgetl.config import TrainConfig
from edgetl.errors import EdgetlError, TrainingInterrupted
from edgetl.evaluate import evaluate
from edgetl.export import ExportOptions, export_run
from edgetl.progress import Reporter
from edgetl.quantize import QuantizeOptions, quantize_run
from edgetl.run import RunFolder, locked
from edgetl.train import Trainer, resume, train

QUIET = Reporter(quiet=True)
runner = CliRunner()


def tiny_cfg(**kw: object) -> TrainConfig:
    base = dict(backbone="tiny", pretrained=False, epochs_head=3, epochs_finetune=1, lr_head=1e-2, batch_size=8, seed=0, patience=0)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def history(run: Path) -> list[tuple[str, int]]:
    return [(r["stage"], int(r["epoch"])) for r in csv.DictReader((run / "history.csv").open())]


@pytest.fixture
def fresh_data(tmp_path: Path) -> Path:
    """Its own copy of the data, which a test may change."""
    from conftest import make_folder

    return make_folder(tmp_path / "data", per_class=10)


@pytest.fixture
def fresh_run(fresh_data: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A run trained on its own copy of the data, which tests may then change."""
    return train(fresh_data, tiny_cfg(), out=str(tmp_path / "run"), reporter=QUIET).run_dir, fresh_data


# ----------------------------------------------------------------------------- what gets scored


def test_eval_of_a_plain_folder_scores_every_image(fresh_run: tuple[Path, Path], tmp_path: Path) -> None:
    from conftest import make_folder

    run, _ = fresh_run
    folder = make_folder(tmp_path / "photos", per_class=7, seed=5)
    m = evaluate(run, folder, reporter=QUIET)
    assert m["n"] == m["scored"] == 21 and m["split"] == "all"  # not a 20% "validation split" of it
    one_class = make_folder(tmp_path / "reds", per_class=4, classes={"red": (200, 40, 40)}, seed=6)
    m = evaluate(run, one_class, reporter=QUIET)
    assert m["n"] == 4 and m["per_class_accuracy"]["blue"] is None


def test_bench_data_of_a_plain_folder_scores_every_image(fresh_run: tuple[Path, Path], tmp_path: Path) -> None:
    from conftest import make_folder

    from edgetl.bench.runner import BenchOptions, bench

    run, _ = fresh_run
    folder = make_folder(tmp_path / "photos", per_class=5, seed=7)
    opts = BenchOptions(data=str(folder), targets=("torch-cpu",), batches=(1,), min_time=0.05, warmup=1, isolation="in-process",
                        out=str(tmp_path / "b"))  # fmt: skip
    report = bench([run], opts, QUIET)
    assert report["data"]["n"] == 15 and "every image" in report["data"]["source"]


# ----------------------------------------------------------------------------- export --out and quantize


def test_export_out_quantizes_the_model_it_wrote(fresh_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = fresh_run
    out = tmp_path / "deploy"
    result = runner.invoke(app, ["export", str(run), "--out", str(out), "--format", "onnx", "--quantize", "int8", "--max-drop", "100"])
    assert result.exit_code == 0, result.output
    assert (out / "model.int8.onnx").is_file() and (out / "quantize.json").is_file()
    assert not (run / "model.int8.onnx").exists() and not (run / "model.onnx").exists()
    q = json.loads((out / "quantize.json").read_text())
    assert q["run"] == str(run.resolve()) and q["checkpoint_sha256"] == RunFolder(run).checkpoint_sha256
    # quantize works on an --out folder on its own too (its export.json names the run)
    assert runner.invoke(app, ["quantize", str(out), "--format", "onnx", "--max-drop", "100"]).exit_code == 0


def test_calibration_images_are_never_validation_images(fresh_run: tuple[Path, Path]) -> None:
    run, _ = fresh_run
    export_run(run, ExportOptions(format="onnx"), QUIET)
    quantize_run(run, QuantizeOptions(format="onnx", max_drop=100, calib_size=1000, latency_runs=6), QUIET)
    calib = set(json.loads((run / "quantize.json").read_text())["calibration"]["files"])
    splits = json.loads((run / "splits.json").read_text())["splits"]
    assert calib == {row[0] for row in splits["train"]}  # calib_size above the split: all of the training list
    assert not calib & {row[0] for row in splits["val"]}


# ----------------------------------------------------------------------------- data changed since training


def test_changed_data_is_refused_unless_the_user_goes_on(fresh_run: tuple[Path, Path]) -> None:
    run, data = fresh_run
    export_run(run, ExportOptions(format="onnx"), QUIET)
    splits = json.loads((run / "splits.json").read_text())["splits"]
    gone = splits["val"][0][0]
    (data / gone).unlink()
    shutil.copy(data / splits["train"][0][0], data / "red" / "new.png")
    for args in (["train", "--resume", str(run), "--epochs-finetune", "2"], ["quantize", str(run), "--format", "onnx"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "appeared (red/new.png)" in result.output and f"went ({gone})" in result.output and "--allow-data-change" in result.output
    # With the override: the recorded lists, less the file that went; the new file is not used.
    qopts = QuantizeOptions(format="onnx", max_drop=100, calib_size=1000, latency_runs=6, allow_data_change=True)
    report = quantize_run(run, qopts, QUIET)
    assert "red/new.png" not in report["calibration"]["files"]
    assert set(report["calibration"]["files"]) == {row[0] for row in splits["train"]}
    assert report["validation_images"]["n"] == len(splits["val"]) - 1
    resume(run, reporter=QUIET, epochs_finetune=2, allow_data_change=True)
    assert history(run)[-1] == ("finetune", 2)


def test_a_replaced_file_is_a_change(fresh_run: tuple[Path, Path]) -> None:
    run, data = fresh_run
    target = data / json.loads((run / "splits.json").read_text())["splits"]["train"][0][0]
    target.write_bytes(target.read_bytes() + b"\0" * 10)
    assert RunFolder(run).check_data().replaced == [target.relative_to(data).as_posix()]


def test_moved_data_is_named_and_the_recorded_digests_still_know_it(fresh_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = fresh_run
    moved = tmp_path / "moved"
    shutil.move(data, moved)
    with pytest.raises(EdgetlError, match=r"is not here: .*--data DIR"):
        export_run(run, ExportOptions(out=str(tmp_path / "out")), QUIET)
    trained_on = len(json.loads((run / "splits.json").read_text())["splits"]["train"])
    scored = evaluate(run, moved, reporter=QUIET)  # the same photos, elsewhere: the training ones are found by content
    assert scored["copies_of_training_images"]["count"] == trained_on


# ----------------------------------------------------------------------------- stale models


def test_models_of_an_older_checkpoint_are_not_benchmarked_or_quantized(fresh_run: tuple[Path, Path], tmp_path: Path) -> None:
    from edgetl.bench.runner import BenchOptions, bench

    run, _ = fresh_run
    export_run(run, ExportOptions(format="all"), QUIET)
    old_hash = RunFolder(run).checkpoint_sha256
    resume(run, reporter=QUIET, epochs_finetune=3)  # new best checkpoint; the exports are now stale
    new_hash = RunFolder(run).checkpoint_sha256
    assert new_hash != old_hash, "this test needs the resumed run to keep a new checkpoint"
    report = bench([run], BenchOptions(targets=("torch-cpu", "ort-cpu"), batches=(1,), min_time=0.05, warmup=1, isolation="in-process",
                                       out=str(tmp_path / "b")), QUIET)  # fmt: skip
    assert {r["target"] for r in report["results"]} == {"torch-cpu"}
    stale = [s for s in report["skipped"] if s["reason"].startswith("stale")]
    assert {Path(s["target"]).name for s in stale} == {"model.onnx", "model.xml"}
    with pytest.raises(EdgetlError, match="stale"):
        quantize_run(run, QuantizeOptions(format="onnx", max_drop=100), QUIET)
    # export --force replaces every derived artifact of the old checkpoint, the ones it does not rewrite too
    export_run(run, ExportOptions(format="onnx", force=True), QUIET)
    assert not (run / "openvino").exists()
    assert RunFolder(run).stale_reason(RunFolder(run).models()[0]) is None


# ----------------------------------------------------------------------------- interrupts and resume


def test_ctrl_c_during_stage_1_resumes_stage_1(fresh_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = fresh_data
    original = Trainer._fit_epoch
    calls = {"n": 0}

    def interrupt_second_head_epoch(self: Trainer, *a: object, **kw: object):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Trainer, "_fit_epoch", interrupt_second_head_epoch)
    run = tmp_path / "r"
    with pytest.raises(TrainingInterrupted):
        train(data, tiny_cfg(epochs_head=4, epochs_finetune=2), out=str(run), reporter=QUIET)
    last = torch.load(run / "last.pt", weights_only=True)
    assert (last["stage"], last["epoch"]) == ("head", 1)
    monkeypatch.setattr(Trainer, "_fit_epoch", original)
    result = resume(run, reporter=QUIET)
    assert history(run) == [("head", 1), ("head", 2), ("head", 3), ("head", 4), ("finetune", 1), ("finetune", 2)]
    assert not result.metrics["interrupted"]


def test_ctrl_c_while_caching_features_leaves_a_resumable_run(fresh_data: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    data = fresh_data

    def interrupted(*_a: object, **_kw: object):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "extract_features", interrupted)
    run = tmp_path / "r"
    with pytest.raises(TrainingInterrupted):
        train(data, tiny_cfg(), out=str(run), reporter=QUIET)
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 0
    monkeypatch.undo()
    resume(run, reporter=QUIET)
    assert history(run) == [("head", 1), ("head", 2), ("head", 3), ("finetune", 1)]


def test_sigint_to_the_cli_in_stage_1_then_resume_completes(fresh_data: Path, tmp_path: Path) -> None:
    """A real SIGINT to a real `edgetl train`, as a user's Ctrl-C."""
    data = fresh_data
    run, epochs = tmp_path / "r", 150
    cmd = [sys.executable, "-m", "edgetl.cli.main", "train", str(data), "--backbone", "tiny", "--no-pretrained", "--out", str(run),
           "--epochs-head", str(epochs), "--epochs-finetune", "1", "--lr-head", "0.001"]  # fmt: skip
    # SIGINT as a terminal delivers it: a shell ignores it in background jobs, and children inherit that.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 120
    while not (run / "history.csv").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    done = [e for s, e in history(run) if s == "head"]
    assert 1 <= len(done) < epochs
    result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    h = history(run)
    assert [e for s, e in h if s == "head"] == list(range(1, epochs + 1)) and h[-1] == ("finetune", 1)


def test_resume_refuses_options_it_would_ignore(fresh_run: tuple[Path, Path]) -> None:
    run, data = fresh_run
    for extra in (["--lr-head", "0.5"], ["--backbone", "efficientnet_lite0"], [str(data)]):
        result = runner.invoke(app, ["train", "--resume", str(run), *extra])
        assert result.exit_code == 2 and "cannot be changed" in result.output, result.output
    result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 2 and "finished" in result.output
    # A hand-edited manifest with a wrongly typed value: named, in one process and before launching several.
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"]["batch_size"] = "8"
    (run / "manifest.json").write_text(json.dumps(manifest))
    for extra in ([], ["--nproc-per-node", "2"]):
        result = runner.invoke(app, ["train", "--resume", str(run), *extra])
        assert result.exit_code == 2 and "batch_size='8', which is not of type int" in result.output, result.output


def test_resume_mid_finetune_continues_the_same_schedule(fresh_data: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Interrupted after fine-tune epoch 1 of 3: the resumed epochs 2-3 see exactly the learning rates
    an uninterrupted run does."""
    data = fresh_data
    straight = train(data, tiny_cfg(epochs_finetune=3), out=str(tmp_path / "a"), reporter=QUIET).run_dir
    original = Trainer.record

    def stop_after_finetune_1(self: Trainer, row: dict) -> None:
        original(self, row)
        if row["stage"] == "finetune" and row["epoch"] == 1:
            self.save_last_pending = True

    original_save = Trainer.save_last

    def save_then_interrupt(self: Trainer, *a: object, **kw: object) -> None:
        original_save(self, *a, **kw)  # type: ignore[arg-type]
        if getattr(self, "save_last_pending", False):
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "record", stop_after_finetune_1)
    monkeypatch.setattr(Trainer, "save_last", save_then_interrupt)
    run = tmp_path / "b"
    with pytest.raises(TrainingInterrupted):
        train(data, tiny_cfg(epochs_finetune=3), out=str(run), reporter=QUIET)
    monkeypatch.undo()
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    resume(run, reporter=QUIET)
    lr = {(r["stage"], r["epoch"]): float(r["lr"]) for r in csv.DictReader((run / "history.csv").open())}
    lr_straight = {(r["stage"], r["epoch"]): float(r["lr"]) for r in csv.DictReader((straight / "history.csv").open())}
    assert lr == pytest.approx(lr_straight)
    assert history(run)[-3:] == [("finetune", 1), ("finetune", 2), ("finetune", 3)]


def test_resume_extends_a_finished_run_with_a_new_schedule(fresh_run: tuple[Path, Path]) -> None:
    run, _ = fresh_run
    resume(run, reporter=QUIET, epochs_finetune=3)
    rows = list(csv.DictReader((run / "history.csv").open()))
    ft = [r for r in rows if r["stage"] == "finetune"]
    assert [int(r["epoch"]) for r in ft] == [1, 2, 3]
    # the extension warms up again from the fine-tune rate instead of continuing at the old schedule's ~0
    assert float(ft[1]["lr"]) > float(ft[0]["lr"]) * 0.5
    with pytest.raises(EdgetlError, match="already done 3"):
        resume(run, reporter=QUIET, epochs_finetune=2)


# ----------------------------------------------------------------------------- the folder itself


def test_artifact_modes_follow_the_umask(fresh_data: Path, tmp_path: Path) -> None:
    data = fresh_data
    for mask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o027, 0o640, 0o750)):
        old = os.umask(mask)
        try:
            run = train(data, tiny_cfg(epochs_finetune=0), out=str(tmp_path / f"m{mask:o}"), reporter=QUIET).run_dir
            export_run(run, ExportOptions(format="all"), QUIET)
        finally:
            os.umask(old)
        for name in ("checkpoint.pt", "last.pt", "manifest.json", "splits.json", "model.onnx", "openvino/model.xml", "openvino/model.bin"):
            assert (run / name).stat().st_mode & 0o777 == file_mode, name
        assert (run / "openvino").stat().st_mode & 0o777 == dir_mode


def test_a_users_folder_is_never_written_into(fresh_data: Path, tmp_path: Path) -> None:
    data = fresh_data
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "metrics.json").write_text("my own file")
    result = runner.invoke(app, ["train", str(data), "--backbone", "tiny", "--no-pretrained", "--out", str(mine)])
    assert result.exit_code == 2 and "not an edgetl run" in result.output
    assert (mine / "metrics.json").read_text() == "my own file" and sorted(p.name for p in mine.iterdir()) == ["metrics.json"]


@pytest.mark.parametrize("where", ["file", "readonly"])
def test_an_unwritable_out_fails_before_decoding(fresh_data: Path, tmp_path: Path, where: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    data = fresh_data
    if where == "file":
        out = tmp_path / "a-file"
        out.write_text("x")
    else:
        if os.geteuid() == 0:
            out = Path("/proc/edgetl-run")  # root may write anywhere a mode allows; /proc refuses everyone
        else:
            ro = tmp_path / "ro"
            ro.mkdir()
            ro.chmod(0o555)
            out = ro / "run"
    decoded = []
    monkeypatch.setattr(Trainer, "decode", lambda self: decoded.append(1))
    result = runner.invoke(app, ["train", str(data), "--backbone", "tiny", "--no-pretrained", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and ("is a file" in result.output or "cannot write" in result.output), result.output
    assert not decoded


def test_a_second_train_into_a_busy_folder_is_refused(fresh_data: Path, tmp_path: Path) -> None:
    data = fresh_data
    busy = tmp_path / "busy"
    with locked(busy, "test"), pytest.raises(EdgetlError, match="in use by another edgetl process"):
        train(data, tiny_cfg(), out=str(busy), reporter=QUIET)


def test_a_forked_child_that_outlives_the_lock_does_not_keep_the_folder_locked(tmp_path: Path) -> None:
    # A plain fork (a DataLoader worker, OpenVINO's telemetry sender) shares the lock's open file description;
    # a child still alive when the command ends must not make the next command in this process be refused.
    import multiprocessing

    folder = tmp_path / "run"
    release = multiprocessing.get_context("fork").Event()
    with locked(folder, "first"):
        child = multiprocessing.get_context("fork").Process(target=release.wait, args=(30,))
        child.start()
    try:
        with locked(folder, "second"):
            pass
        assert child.is_alive()  # the child really outlived the first lock
    finally:
        release.set()
        child.join(10)


def test_concurrent_exports_do_not_corrupt_the_openvino_folder(fresh_run: tuple[Path, Path]) -> None:
    run, _ = fresh_run
    export_run(run, ExportOptions(format="all"), QUIET)
    cmd = [sys.executable, "-m", "edgetl.cli.main", "export", str(run), "--force", "--format", "openvino"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [(p.wait(timeout=300), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    assert all(rc in (0, 2) for rc, _ in outs), outs
    assert any(rc == 0 for rc, _ in outs)
    assert all("in use" in err for rc, err in outs if rc == 2)
    from edgetl.backends.openvino import OpenVinoModel

    assert OpenVinoModel(run / "openvino" / "model.xml")(np.zeros((1, 3, 64, 64), np.float32)).shape == (1, 3)


def test_leftover_temporary_files_are_cleaned(fresh_run: tuple[Path, Path]) -> None:
    run, _ = fresh_run
    (run / ".model.onnx.abc123.tmp").write_bytes(b"half a model")
    (run / ".openvino.xyz.tmp").mkdir()
    export_run(run, ExportOptions(format="onnx"), QUIET)
    assert not list(run.glob(".*.tmp"))


def test_the_memory_mapped_feature_cache_is_removed(fresh_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = fresh_data
    monkeypatch.setattr("edgetl.train.FEATURE_CACHE_IN_MEMORY_LIMIT", 0)  # as if the features were gigabytes
    run = train(data, tiny_cfg(epochs_finetune=0), out=str(tmp_path / "a"), reporter=QUIET).run_dir
    assert not list(run.glob("features-*.npy"))
    run = train(data, tiny_cfg(epochs_finetune=0), out=str(tmp_path / "b"), reporter=QUIET, keep_feature_cache=True).run_dir
    assert sorted(p.name for p in run.glob("features-*.npy")) == ["features-train.npy", "features-val.npy"]


@pytest.mark.parametrize("size", ["0", "-3", "100000"])
def test_input_size_is_validated(fresh_data: Path, tmp_path: Path, size: str) -> None:
    data = fresh_data
    result = runner.invoke(app, ["train", str(data), "--backbone", "tiny", "--no-pretrained", "--out", str(tmp_path / "r"),
                                 "--input-size", size])  # fmt: skip
    assert result.exit_code == 2 and "--input-size" in result.output
    assert not (tmp_path / "r").exists()


def test_a_bad_weights_file_fails_before_decoding(fresh_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = fresh_data
    bad = tmp_path / "w.pt"
    bad.write_bytes(b"not weights")
    decoded = []
    monkeypatch.setattr(Trainer, "decode", lambda self: decoded.append(1))
    with pytest.raises(EdgetlError):
        train(data, tiny_cfg(pretrained=True, weights=str(bad)), out=str(tmp_path / "r"), reporter=QUIET)
    assert not decoded and not (tmp_path / "r").exists()


def test_a_killed_command_does_not_leave_its_folder_locked_by_a_forked_child(tmp_path: Path) -> None:
    # SIGKILL runs no clean-up: the lock must go with the killed process even while a child it forked lives on
    # (a DataLoader worker notices its parent is gone only seconds later).
    folder = tmp_path / "run"
    code = """
import multiprocessing, sys, time
from pathlib import Path
from edgetl.run import locked
def work(started):
    started.set()  # the fork is complete (its hooks have run) and the child runs on
    time.sleep(60)
fork = multiprocessing.get_context("fork")
with locked(Path(sys.argv[1]), "first"):
    started = fork.Event()
    child = fork.Process(target=work, args=(started,))
    child.start()
    started.wait(30)
    print(child.pid, flush=True)
    time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    child_pid = int(proc.stdout.readline())  # type: ignore[union-attr]
    try:
        proc.kill()
        proc.wait(10)
        os.kill(child_pid, 0)  # the child outlived the killed command
        with locked(folder, "second"):
            pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child_pid, signal.SIGKILL)
