"""End-to-end training on the tiny backbone and generated images: artifacts, resume, Ctrl-C."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from edgetl import checkpoint
from edgetl.config import TrainConfig
from edgetl.errors import EdgetlError, TrainingInterrupted
from edgetl.evaluate import evaluate
from edgetl.progress import Reporter
from edgetl.train import Trainer, resume, train

QUIET = Reporter(quiet=True)


def tiny_cfg(**kw: object) -> TrainConfig:
    base = dict(backbone="tiny", pretrained=False, epochs_head=4, epochs_finetune=2, lr_head=1e-2, batch_size=8, seed=0)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import make_folder

    root = tmp_path_factory.mktemp("e2e")
    data = make_folder(root / "data", per_class=10)
    (data / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    result = train(data, tiny_cfg(patience=0), out=str(root / "run"), reporter=QUIET)
    return result.run_dir


def test_run_folder_has_every_artifact(trained_run: Path) -> None:
    for name in ("checkpoint.pt", "last.pt", "metrics.json", "history.csv", "curves.png", "confusion.png",
                 "manifest.json", "splits.json"):  # fmt: skip
        assert (trained_run / name).stat().st_size > 0, name
    assert not list(trained_run.glob(".*.tmp")), "a temporary file was left behind"


def rows_of(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "history.csv").open()))


def test_metrics_and_history(trained_run: Path) -> None:
    m = json.loads((trained_run / "metrics.json").read_text())
    best = m["best"]
    assert set(m["stages"]) == {"head", "finetune"}
    assert 0.0 <= best["top1"] <= 1.0 and 0 <= best["macro_f1"] <= 1
    assert best["top5"] is None, "top-5 of 3 classes is 100% by construction and is not reported"
    assert set(best["per_class_accuracy"]) == {"blue", "green", "red"}
    # The kept checkpoint's accuracy, not the best of any epoch.
    kept = m["stages"][best["stage"]]
    assert kept["best_epoch"] == best["epoch"]
    row = next(r for r in rows_of(trained_run) if r["stage"] == best["stage"] and int(r["epoch"]) == best["epoch"])
    assert kept["best_val_top1"] == pytest.approx(float(row["val_top1"])) == pytest.approx(best["top1"])
    assert sum(map(sum, best["confusion_matrix"])) == best["n"] == 6
    assert best["top1"] > 0.5, "three colour classes should be easy even for a random-init tiny net"
    rows = list(csv.DictReader((trained_run / "history.csv").open()))
    assert [r["stage"] for r in rows] == ["head"] * 4 + ["finetune"] * 2
    assert m["stages"]["head"]["images_per_second"] > 0


def test_history_records_the_rate_each_epoch_trained_at(trained_run: Path) -> None:
    """Each stage's cosine ends at 0 after its last step; the epoch's row (and log line) shows the rate its last step
    used, so the last epoch of a stage does not read 'lr 0.00e+00' as if it had not trained."""
    for stage in ("head", "finetune"):
        lrs = [float(r["lr"]) for r in rows_of(trained_run) if r["stage"] == stage]
        assert all(lr > 0 for lr in lrs), (stage, lrs)
        assert lrs[-1] < lrs[0] or len(lrs) == 1, "the rate decays over a stage"


def test_manifest_records_provenance_and_skips(trained_run: Path) -> None:
    man = json.loads((trained_run / "manifest.json").read_text())
    assert man["seed"] == 0 and len(man["dataset"]["fingerprint"]) == 16
    assert [Path(s["file"]).name for s in man["skipped_files"]] == ["broken.jpg"]
    assert "torch" in man["host"]["libraries"]
    splits = json.loads((trained_run / "splits.json").read_text())
    assert len(splits["splits"]["train"]) + len(splits["splits"]["val"]) == 31
    assert man["status"] == "finished" and splits["fingerprint"] == man["dataset"]["fingerprint"]


def test_checkpoint_is_self_describing_and_safe(trained_run: Path) -> None:
    ckpt = torch.load(trained_run / "checkpoint.pt", weights_only=True)  # no pickled code inside
    cfg = ckpt["config"]
    assert cfg["labels"] == ["blue", "green", "red"] and cfg["backbone"] == "tiny"
    assert cfg["preprocess"]["input_size"] == 64 and cfg["preprocess"]["interpolation"] == "bicubic"
    model, _ = checkpoint.load_model(trained_run)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


def test_eval_command_scores_a_folder(trained_run: Path, split_folder: Path) -> None:
    m = evaluate(trained_run, split_folder, reporter=QUIET)
    assert m["split"] == "test" and m["n"] == 12 and 0 <= m["top1"] <= 1
    m_val = evaluate(trained_run, split_folder, split="val", reporter=QUIET)
    assert m_val["split"] == "val"


def test_eval_refuses_unknown_classes(trained_run: Path, tmp_path: Path) -> None:
    from conftest import make_folder

    make_folder(tmp_path, per_class=2, classes={"red": (200, 0, 0), "mauve": (90, 60, 90)})
    with pytest.raises(EdgetlError, match="mauve"):
        evaluate(trained_run, tmp_path, reporter=QUIET)


def test_same_seed_same_result(image_folder: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(epochs_finetune=1)
    a = train(image_folder, cfg, out=str(tmp_path / "a"), reporter=QUIET).metrics["best"]
    b = train(image_folder, cfg, out=str(tmp_path / "b"), reporter=QUIET).metrics["best"]
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


def test_existing_run_is_not_overwritten(trained_run: Path, image_folder: Path) -> None:
    before = (trained_run / "checkpoint.pt").read_bytes()
    with pytest.raises(EdgetlError, match="already holds a run"):
        train(image_folder, tiny_cfg(), out=str(trained_run), reporter=QUIET)
    assert (trained_run / "checkpoint.pt").read_bytes() == before


def test_ctrl_c_keeps_the_last_good_epoch_and_resume_finishes(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    original = Trainer.record

    def record_then_interrupt(self: Trainer, row: dict) -> None:
        original(self, row)
        if row["stage"] == "finetune":
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyboardInterrupt  # as if Ctrl-C came right after fine-tune epoch 1

    monkeypatch.setattr(Trainer, "record", record_then_interrupt)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(image_folder, tiny_cfg(epochs_finetune=3, patience=0), out=str(run), reporter=QUIET)
    # The interrupt came before the end-of-epoch save, so last.pt still holds the end of stage 1.
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["stage"] == "head"
    assert (run / "checkpoint.pt").exists() and json.loads((run / "metrics.json").read_text())["interrupted"]
    monkeypatch.setattr(Trainer, "record", original)
    result = resume(run, reporter=QUIET)
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert [r["stage"] for r in rows].count("finetune") >= 3
    assert not result.metrics["interrupted"]


def test_a_dataloader_worker_stopped_by_sigterm_is_an_interruption(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM to the process group stops the DataLoader workers too, and PyTorch may report that first (as this
    RuntimeError, from its SIGCHLD handler): the run ends as interrupted, like Ctrl-C, not with a traceback. A
    worker that crashed on its own is still an error."""
    import signal

    from edgetl.train import worker_stopped

    original = Trainer.record

    def record_then_worker_dies(self: Trainer, row: dict) -> None:
        original(self, row)
        if row["stage"] == "finetune":
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated. ")

    monkeypatch.setattr(Trainer, "record", record_then_worker_dies)
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGCHLD)
    try:
        with pytest.raises(TrainingInterrupted):
            train(image_folder, tiny_cfg(epochs_finetune=3, patience=0), out=str(run), reporter=QUIET)
        assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL, "later worker deaths must not raise while finishing"
    finally:
        signal.signal(signal.SIGCHLD, before)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"
    assert not worker_stopped(RuntimeError("DataLoader worker (pid 4242) is killed by signal: Segmentation fault. "))
    assert not worker_stopped(RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly"))


def test_resume_mid_finetune_continues_at_the_next_epoch(image_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = train(image_folder, tiny_cfg(epochs_finetune=1, patience=0), out=str(run), reporter=QUIET).metrics["stages"]
    resume(run, reporter=QUIET, epochs_finetune=3)
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows if r["stage"] == "finetune"] == [1, 2, 3]
    # The stage times cover both sessions: stage 1 as it ran in the first, stage 2 first + second.
    stages = json.loads((run / "metrics.json").read_text())["stages"]
    assert stages["head"]["seconds"] == first["head"]["seconds"] and stages["head"]["images"] == first["head"]["images"]
    assert stages["finetune"]["sessions"] == 2 and stages["finetune"]["seconds"] > first["finetune"]["seconds"]
    assert stages["finetune"]["images"] == 3 * first["finetune"]["images"]
    assert json.loads((run / "manifest.json").read_text())["timings"]["finetune"].items() <= stages["finetune"].items()


def test_a_session_killed_outright_keeps_the_time_of_its_completed_epochs(image_folder: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL writes no manifest: the stage times must come from last.pt, which is saved after every epoch."""

    class Killed(BaseException):  # nothing in edgetl handles it, so no report is written, as under SIGKILL
        pass

    original = Trainer.save_last

    def save_then_die(self: Trainer, stage: str, epoch: int, *args: object, **kw: object) -> None:
        original(self, stage, epoch, *args, **kw)  # type: ignore[arg-type]
        if (stage, epoch) == ("finetune", 2):
            raise Killed

    cfg = tiny_cfg(epochs_finetune=3, patience=0)
    whole = train(image_folder, cfg, out=str(tmp_path / "whole"), reporter=QUIET).metrics["stages"]
    monkeypatch.setattr(Trainer, "save_last", save_then_die)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(image_folder, cfg, out=str(run), reporter=QUIET)
    assert json.loads((run / "manifest.json").read_text())["timings"] == {}  # as written when the session began
    monkeypatch.setattr(Trainer, "save_last", original)
    stages = resume(run, reporter=QUIET).metrics["stages"]
    assert stages["head"]["images"] == whole["head"]["images"] and stages["head"]["seconds"] > 0
    assert stages["finetune"]["images"] == whole["finetune"]["images"] and stages["finetune"]["sessions"] == 2


def test_stage_timings_of_a_resumed_run_add_up_over_its_sessions() -> None:
    from edgetl.train import combine_stage_timings

    before = {"head": {"seconds": 10.0, "images": 500, "images_per_second": 50.0},
              # a record from before image counts were kept: 100 images/s over 30 s of training
              "finetune": {"seconds": 40.0, "train_seconds": 30.0, "images_per_second": 100.0, "trial_seconds": 5.0}}
    now = {"finetune": {"seconds": 25.0, "train_seconds": 20.0, "images": 1000, "images_per_second": 50.0, "trial_seconds": 5.0}}
    combined = combine_stage_timings(before, now)
    assert combined["head"] == before["head"]
    ft = combined["finetune"]
    assert (ft["seconds"], ft["train_seconds"], ft["images"], ft["sessions"]) == (65.0, 50.0, 4000, 2)
    assert ft["images_per_second"] == 80.0 and ft["trial_seconds"] == 5.0  # trials are counted once
    assert combine_stage_timings({}, now) == now and combine_stage_timings(before, {}) == before


def test_resume_needs_no_imagenet_weights_file(image_folder: Path, tmp_path: Path) -> None:
    # The checkpoint holds every weight: a --weights file moved or deleted since training must not matter.
    from edgetl.model import create_feature_extractor

    weights = tmp_path / "imagenet.pt"
    torch.save(create_feature_extractor("tiny").state_dict(), weights)
    run = tmp_path / "run"
    train(image_folder, tiny_cfg(pretrained=True, weights=str(weights), epochs_finetune=1, patience=0), out=str(run), reporter=QUIET)
    weights.unlink()
    resume(run, reporter=QUIET, epochs_finetune=2)
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows if r["stage"] == "finetune"] == [1, 2]
    assert "imagenet.pt" in json.loads((run / "manifest.json").read_text())["weights_source"]


def test_weight_average_is_validated_and_kept(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kept: list[tuple[str, object, object]] = []
    original = Trainer.save_best

    def spy(self: Trainer, stage: str, epoch: int, val_loss: float, val_logits: object, model: object = None) -> None:
        kept.append((stage, model, self.model))
        original(self, stage, epoch, val_loss, val_logits, model)  # type: ignore[arg-type]

    monkeypatch.setattr(Trainer, "save_best", spy)
    run = tmp_path / "run"
    # val loss goes to 0 so that every fine-tune epoch is a new best
    monkeypatch.setattr(Trainer, "val_loss", lambda self, logits: -float(len(self.history)))
    cfg = tiny_cfg(ema_decay=0.99, epochs_finetune=2, patience=0, unfreeze="1", recipe="finetune")  # no trial of all blocks
    train(image_folder, cfg, out=str(run), reporter=QUIET)
    finetune_kept = [(m, trained) for stage, m, trained in kept if stage == "finetune"]
    assert len(finetune_kept) == 2
    assert all(type(m).__name__ == "EdgeClassifier" and m is not trained for m, trained in finetune_kept)
    last = torch.load(run / "last.pt", weights_only=True)
    best = torch.load(run / "checkpoint.pt", weights_only=True)
    avg, raw = last["ema_state_dict"], last["state_dict"]
    trained = [k for k in raw if k.startswith("head.") and raw[k].is_floating_point()]
    assert any(not torch.equal(avg[k], raw[k]) for k in trained), "the average should lag the trained weights"
    assert all(torch.equal(best["state_dict"][k], avg[k]) for k in avg), "the best checkpoint should be the average"
    frozen = [k for k in raw if k.startswith("backbone.conv_stem")]
    assert frozen and all(torch.equal(avg[k], raw[k]) for k in frozen)
    resume(run, reporter=QUIET, epochs_finetune=3)
    assert torch.load(run / "last.pt", weights_only=True)["ema_state_dict"] is not None


def test_uncached_stage1_and_augmented_views(image_folder: Path, tmp_path: Path) -> None:
    m = train(image_folder, tiny_cfg(epochs_finetune=0, cache_features=False), out=str(tmp_path / "a"), reporter=QUIET).metrics
    assert m["stages"]["head"]["feature_cache"] is False and "finetune" not in m["stages"]
    m = train(image_folder, tiny_cfg(epochs_finetune=0, cache_views=3, balance=True, hidden=16), out=str(tmp_path / "b"),
              reporter=QUIET).metrics  # fmt: skip
    assert m["stages"]["head"]["cache_views"] == 3


def test_no_weights_and_no_opt_out_is_a_clear_error(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(EdgetlError, match="no ImageNet weights for tiny"):
        train(image_folder, tiny_cfg(pretrained=True), out=str(tmp_path / "r"), reporter=QUIET)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_strict_makes_unreadable_images_an_error(image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "blue" / "bad.png").write_bytes(b"nope")
    with pytest.raises(EdgetlError, match="--strict"):
        train(image_folder, tiny_cfg(strict=True), out=str(tmp_path / "r"), reporter=QUIET)


def test_bad_options_are_user_errors() -> None:
    with pytest.raises(EdgetlError, match="--augment"):
        tiny_cfg(augment="heavy")
    with pytest.raises(EdgetlError, match="--unfreeze"):
        tiny_cfg(unfreeze="some")


@pytest.mark.parametrize(("option", "value"), [("lr_head", -1e-3), ("lr_head", float("nan")), ("lr_finetune", 0.0),
                                               ("lr_finetune", float("inf")), ("dropout", 1.0), ("hidden", -8),
                                               ("label_smoothing", 1.0), ("distill_temperature", float("inf"))])  # fmt: skip
def test_out_of_range_numbers_are_user_errors(option: str, value: float) -> None:
    with pytest.raises(EdgetlError, match="--" + option.replace("_", "-")):
        tiny_cfg(**{option: value})


def test_idx_training(idx_folder: Path, tmp_path: Path) -> None:
    m = train(idx_folder, tiny_cfg(epochs_finetune=1, input_size=32), out=str(tmp_path / "r"), reporter=QUIET).metrics
    assert m["best"]["n"] == 12


def test_uncached_stage1_leaves_batchnorm_statistics_untouched(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the cache the frozen base runs every epoch; it must do so in eval mode."""
    from torch import nn

    from edgetl import model as model_mod

    built = {}
    original = model_mod.build_classifier

    def keep(*args: object, **kw: object):
        built["m"] = original(*args, **kw)  # type: ignore[arg-type]
        built["stats"] = {k: v.clone() for k, v in built["m"].backbone.state_dict().items() if "running" in k}
        return built["m"]

    monkeypatch.setattr("edgetl.train.build_classifier", keep)
    train(image_folder, tiny_cfg(epochs_finetune=0, cache_features=False, epochs_head=2), out=str(tmp_path / "r"), reporter=QUIET)
    after = {k: v for k, v in built["m"].backbone.state_dict().items() if "running" in k}
    assert after and all(torch.equal(after[k].cpu(), built["stats"][k].cpu()) for k in after)  # the model may be on CUDA
    assert any(isinstance(m, nn.BatchNorm2d) for m in built["m"].backbone.modules())


def test_precision_auto_trains_in_fp32_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an H100 bf16 autocast made Lite0's stage 2 slower (288-489 against 618-682 images/s in fp32), so `auto`
    is fp32 on CUDA; bf16 and fp16 stay available when asked."""
    from edgetl.train import autocast_dtype, use_bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda = torch.device("cuda")
    assert use_bf16("auto", cuda) is False and autocast_dtype("auto", cuda) is None
    assert autocast_dtype("bf16", cuda) == torch.bfloat16 and autocast_dtype("fp16", cuda) == torch.float16


@pytest.mark.parametrize(("flags", "asked"), [
    (set(), None),  # no bf16 instructions: --precision bf16 is refused
    ({"avx512_bf16"}, True),  # AVX-512 bf16 alone trained Lite0 2x slower in bf16: fp32 unless asked
    ({"avx512_bf16", "amx_bf16"}, True),  # AMX tiles: still 0.76x of fp32 (train_throughput_amx-all.md)
])  # fmt: skip
def test_precision_auto_trains_in_fp32_on_a_cpu_and_bf16_only_when_asked(flags: set[str], asked: bool | None,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import edgetl.hostinfo
    from edgetl.train import autocast_dtype, use_bf16

    monkeypatch.setattr(edgetl.hostinfo, "cpu_flags", lambda: frozenset(flags))
    cpu = torch.device("cpu")
    assert use_bf16("auto", cpu) is False and use_bf16("fp32", cpu) is False
    assert autocast_dtype("auto", cpu) is None
    if asked is None:
        with pytest.raises(EdgetlError, match="no native bf16"):
            use_bf16("bf16", cpu)
    else:
        assert autocast_dtype("bf16", cpu) == torch.bfloat16
        assert use_bf16("bf16", cpu) is asked
