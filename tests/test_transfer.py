"""Stage 2 that earns its time: model selection, per-stage early stopping, --recipe auto, distillation."""

from __future__ import annotations

import builtins
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetl.config import TrainConfig
from edgetl.errors import EdgetlError
from edgetl.model import build_classifier, layerwise_param_groups, unfreeze_top
from edgetl.progress import Reporter
from edgetl.recipes import FinetuneRecipe, Score, choose, parse_candidates
from edgetl.train import Trainer, resume, train

QUIET = Reporter(quiet=True)


def tiny_cfg(**kw: object) -> TrainConfig:
    base = dict(backbone="tiny", pretrained=False, epochs_head=4, epochs_finetune=2, lr_head=1e-2, batch_size=8, seed=0)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def history(run: Path) -> list[dict]:
    return torch.load(run / "last.pt", weights_only=True)["history"]


# ----------------------------------------------------------------------------- pieces


def test_selection_prefers_accuracy_then_loss() -> None:
    assert Score(0.9, 0.5).better(Score(0.8, 0.1)), "higher top-1 wins even at a higher loss"
    assert Score(0.9, 0.3).better(Score(0.9, 0.4)) and not Score(0.9, 0.4).better(Score(0.9, 0.3))
    assert not Score(0.9, 0.3).better(Score(0.9, 0.3)), "a tie is not an improvement"
    head = Score(0.9, 0.3)
    top, full = FinetuneRecipe("3", 1e-4), FinetuneRecipe("all", 1e-4, 0.7)
    chosen, why = choose(head, [(top, Score(0.85, 0.35)), (full, Score(0.88, 0.32))])
    assert chosen is None and "head is kept" in why, "every trial worse on top-1 and loss: keep the head"
    chosen, _ = choose(head, [(top, Score(0.85, 0.25)), (full, Score(0.80, 0.2))])
    assert chosen == top, "a trial with a lower loss goes on (a fine-tune often starts below the head's top-1)"
    chosen, why = choose(head, [(top, Score(0.85, 0.35)), (full, Score(0.88, 0.32))], whole_epoch=False)
    assert chosen == full and "shorter than an epoch" in why, "a partial-epoch trial cannot stop stage 2"


def test_candidates_are_parsed_and_bad_ones_refused() -> None:
    got = parse_candidates("3@1e-4, all@3x/0.7", base_lr=2e-4)
    assert got == [FinetuneRecipe("3", 1e-4), FinetuneRecipe("all", 6e-4, 0.7)]
    for bad in ("3", "x@1e-4", "3@-1", "all@1e-4/1.5", "3@fast"):
        with pytest.raises(EdgetlError, match="recipe-candidates"):
            parse_candidates(bad, 1e-4)
    with pytest.raises(EdgetlError, match="recipe-candidates"):
        tiny_cfg(recipe_candidates="3@nope")  # refused when the config is made, not after stage 1
    with pytest.raises(EdgetlError, match="--recipe"):
        tiny_cfg(recipe="everything")


def test_layerwise_learning_rates_decay_from_the_top() -> None:
    model = build_classifier("tiny", 3)
    unfreeze_top(model, None)
    groups = layerwise_param_groups(model, lr=1e-3, weight_decay=0.01, decay=0.5, head_lr_scale=0.1)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(rate) == sum(1 for p in model.parameters() if p.requires_grad), "every trainable parameter, once"
    blocks = list(model.backbone.blocks)
    top_block, bottom_block = next(blocks[-1].parameters()), next(blocks[0].parameters())
    assert rate[id(next(model.backbone.conv_head.parameters()))] == pytest.approx(1e-3)
    assert rate[id(top_block)] == pytest.approx(1e-3 * 0.5)
    assert rate[id(bottom_block)] == pytest.approx(1e-3 * 0.5 ** len(blocks))
    assert rate[id(model.backbone.conv_stem.weight)] == pytest.approx(1e-3 * 0.5 ** (len(blocks) + 1))
    assert rate[id(model.head[-1].weight)] == pytest.approx(1e-4)
    assert all(g["weight_decay"] == 0 for g in groups if any(p.ndim < 2 for p in g["params"]))


def test_l2sp_pulls_the_backbone_toward_its_start_and_the_head_toward_zero() -> None:
    """With zero gradients AdamW moves nothing but its decay: what is left is each group's pull, exactly."""
    from edgetl.l2sp import GROUP_KEY, StartingPointPull, backbone_anchor

    model = build_classifier("tiny", 3)
    unfreeze_top(model, None)
    anchor = backbone_anchor(model)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)  # as if fine-tuning had moved every weight by 1
    head_before = model.head[-1].weight.detach().clone()
    groups = layerwise_param_groups(model, lr=0.1, weight_decay=0.5, decay=0.5, l2sp=2.0)
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    for g in groups:
        anchored = [id(p) in backbone_ids for p in g["params"]]
        assert all(anchored) or not any(anchored), "a group is all backbone or all head"
        if anchored[0]:
            assert g[GROUP_KEY] == 2.0 and g["weight_decay"] == 0.0, "the backbone decays toward its start, not zero"
        else:
            assert GROUP_KEY not in g
    opt = torch.optim.AdamW(groups)
    pull = StartingPointPull(model, opt, anchor)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    pull()
    for name, p in model.backbone.named_parameters():
        rate = next(g["lr"] for g in groups if any(q is p for q in g["params"]))
        # Moved 1 away; the pull takes back lr * strength of it (layer-decayed rates: the stem's pull is weaker).
        torch.testing.assert_close(p - anchor[name], torch.full_like(p, 1.0 - rate * 2.0), msg=name)
    torch.testing.assert_close(model.head[-1].weight, head_before * (1 - 0.1 * 0.5), msg="the new head: plain weight decay")
    assert pull.distance() < (sum(p.numel() for p in model.backbone.parameters())) ** 0.5


def test_l2sp_fine_tunes_near_the_pretrained_weights_and_resumes_with_them(image_folder: Path, tmp_path: Path) -> None:
    weights = tmp_path / "tiny-weights.pt"
    torch.save(build_classifier("tiny", 3).backbone.state_dict(), weights)
    start = torch.load(weights, weights_only=True)

    def drift(run: Path) -> float:
        state = torch.load(run / "last.pt", weights_only=True)["state_dict"]
        params = {k for k, _ in build_classifier("tiny", 3).backbone.named_parameters()}  # not BatchNorm's statistics
        return sum(float((state[f"backbone.{k}"] - start[k]).pow(2).sum()) for k in params) ** 0.5

    common = dict(pretrained=True, weights=str(weights), recipe="finetune", unfreeze="all", lr_finetune=3e-2, epochs_finetune=2)
    plain, pulled = tmp_path / "plain", tmp_path / "pulled"
    train(image_folder, tiny_cfg(**common), out=str(plain), reporter=QUIET)
    train(image_folder, tiny_cfg(**common, l2sp=30.0), out=str(pulled), reporter=QUIET)
    assert drift(pulled) < 0.5 * drift(plain), "the pull keeps the backbone near where it started"
    last = torch.load(pulled / "last.pt", weights_only=True)
    recorded = {k: v for k, v in last["l2sp_anchor"].items()}
    assert recorded.keys() == {k for k, v in build_classifier("tiny", 3).backbone.named_parameters()}
    assert all(torch.equal(recorded[k], start[k]) for k in recorded), "the starting point is the given weights"
    drifts = [r["backbone_drift"] for r in last["history"] if r["stage"] == "finetune"]
    assert len(drifts) == 2 and drifts[-1] == pytest.approx(drift(pulled), rel=1e-3), "each epoch records the drift"
    # Extended by a resume (the weights file is not read again): the recorded starting point carries on.
    weights.unlink()
    resume(pulled, reporter=QUIET, epochs_finetune=3)
    last = torch.load(pulled / "last.pt", weights_only=True)
    assert [r["epoch"] for r in last["history"] if r["stage"] == "finetune"] == [1, 2, 3]
    assert all(torch.equal(last["l2sp_anchor"][k], start[k]) for k in recorded)
    # A last.pt without it is refused in words, not resumed with a wrong starting point.
    last["l2sp_anchor"] = None
    torch.save(last, pulled / "last.pt")
    with pytest.raises(EdgetlError, match="starting point"):
        resume(pulled, reporter=QUIET, epochs_finetune=4)
    with pytest.raises(EdgetlError, match="--no-pretrained"):
        tiny_cfg(l2sp=1.0)
    from typer.testing import CliRunner

    from edgetl.cli.main import app

    res = CliRunner().invoke(app, ["train", str(image_folder), "--backbone", "tiny", "--no-pretrained", "--l2sp", "5",
                                   "--out", str(tmp_path / "cli")])  # fmt: skip
    assert res.exit_code != 0 and "--no-pretrained has none" in res.output and "Traceback" not in res.output
    with pytest.raises(EdgetlError, match="--l2sp must be"):
        tiny_cfg(pretrained=True, l2sp=-1.0)


# ----------------------------------------------------------------------------- early stopping and selection


def scripted_scores(monkeypatch: pytest.MonkeyPatch, head: list[tuple[float, float]], finetune: list[tuple[float, float]]) -> None:
    """Validation scores by epoch, whatever the model does: the selection and stopping rules are what is tested."""

    def fake(self: Trainer, logits: object) -> Score:
        stage = self._stage
        done = sum(1 for h in self.history if h["stage"] == stage)
        scores = head if stage == "head" else finetune
        return Score(*scores[min(done, len(scores) - 1)])

    monkeypatch.setattr(Trainer, "val_score", fake)


def test_head_stops_after_its_best_and_stage2_starts_from_the_best_head(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted_scores(monkeypatch, head=[(0.5, 1.0), (0.8, 0.5), (0.7, 0.6), (0.7, 0.6), (0.9, 0.1)], finetune=[(0.85, 0.4)] * 3)
    seen: dict[str, dict[str, torch.Tensor]] = {}
    choose_original, start_original = Trainer._choose_recipe, Trainer._start_finetune

    def spy_choose(self: Trainer, *args: object) -> object:
        # .cpu(): the model may be on CUDA, the kept best state is on the CPU
        seen["last_head"] = {k: v.cpu().clone() for k, v in self.model.head.state_dict().items()}
        seen["best_head"] = {k[len("head."):]: v.cpu().clone() for k, v in self.best_state.items() if k.startswith("head.")}  # type: ignore[union-attr]
        return choose_original(self, *args)  # type: ignore[arg-type]

    def spy_start(self: Trainer, *args: object) -> object:
        seen.setdefault("start", {k: v.cpu().clone() for k, v in self.model.head.state_dict().items()})
        return start_original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Trainer, "_choose_recipe", spy_choose)
    monkeypatch.setattr(Trainer, "_start_finetune", spy_start)
    run = tmp_path / "run"
    cfg = tiny_cfg(epochs_head=10, patience_head=2, recipe="finetune", epochs_finetune=1)
    result = train(image_folder, cfg, out=str(run), reporter=QUIET)
    rows = history(run)
    assert [r["epoch"] for r in rows if r["stage"] == "head"] == [1, 2, 3, 4], "two epochs past the best (epoch 2), then stop"
    assert result.metrics["best"]["stage"] == "finetune"
    # LP-FT: stage 2 began from epoch 2's head (the best), not epoch 4's (the last).
    assert any(not torch.equal(seen["last_head"][k], seen["best_head"][k]) for k in seen["best_head"])
    assert all(torch.equal(seen["start"][k], seen["best_head"][k]) for k in seen["best_head"])
    assert result.metrics["stages"]["head"]["best_epoch"] == 2


def test_stage2_is_judged_on_its_own_trajectory(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The head is better than any fine-tune epoch, but stage 2 keeps improving: it must not be cut off.
    improving = [(0.6 + 0.05 * i, 0.8 - 0.1 * i) for i in range(5)]
    scripted_scores(monkeypatch, head=[(0.95, 0.05)], finetune=improving)
    run = tmp_path / "a"
    m = train(image_folder, tiny_cfg(recipe="finetune", epochs_finetune=5, patience=1), out=str(run), reporter=QUIET).metrics
    assert [r["epoch"] for r in history(run) if r["stage"] == "finetune"] == [1, 2, 3, 4, 5]
    assert m["best"]["stage"] == "head", "the kept checkpoint is still the best of the run"
    # Worsening from its first epoch: stopped after the minimum number of epochs, not before.
    scripted_scores(monkeypatch, head=[(0.95, 0.05)], finetune=[(0.6 - 0.05 * i, 0.8 + 0.1 * i) for i in range(5)])
    run = tmp_path / "b"
    train(image_folder, tiny_cfg(recipe="finetune", epochs_finetune=5, patience=1, min_epochs_finetune=3), out=str(run), reporter=QUIET)
    assert [r["epoch"] for r in history(run) if r["stage"] == "finetune"] == [1, 2, 3]


# ----------------------------------------------------------------------------- --recipe auto


def test_auto_recipe_picks_the_better_of_two(image_folder: Path, tmp_path: Path) -> None:
    # lr 30 wrecks the network in a few steps; 1e-3 fine-tunes it. No scripted scores: real trials.
    run = tmp_path / "run"
    m = train(image_folder, tiny_cfg(recipe_candidates="1@30,1@1e-3", epochs_finetune=2), out=str(run), reporter=QUIET).metrics
    rec = m["recipe"]
    assert [t["recipe"]["lr"] for t in rec["trials"]] == [30.0, 1e-3]
    wrecked, sane = rec["trials"]
    assert Score(sane["val_top1"], sane["val_loss"]).better(Score(wrecked["val_top1"], wrecked["val_loss"]))
    assert rec["chosen"]["lr"] == 1e-3 and "continuing" in rec["why"]
    # The winner's trial was its first epoch (a small set): it is recorded once, and training went on from it.
    assert [r["epoch"] for r in history(run) if r["stage"] == "finetune"] == [1, 2]
    assert m["stages"]["finetune"]["trial_seconds"] > 0
    # An interrupted auto run resumes with the recipe it chose, without new trials.
    resume(run, reporter=QUIET, epochs_finetune=3)
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["recipe"]["chosen"]["lr"] == 1e-3 and len(last["recipe"]["trials"]) == 2


def test_auto_recipe_keeps_the_head_when_every_trial_is_worse(image_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_cfg(epochs_head=8, recipe_candidates="all@50,all@80", epochs_finetune=3)
    m = train(image_folder, cfg, out=str(run), reporter=QUIET).metrics
    assert m["recipe"]["chosen"] is None and "head is kept" in m["recipe"]["why"]
    assert not [r for r in history(run) if r["stage"] == "finetune"], "no fine-tune epoch after the trials"
    assert m["best"]["stage"] == "head"
    with pytest.raises(EdgetlError, match="finished training"):
        resume(run, reporter=QUIET)



def test_trials_shorter_than_an_epoch_never_skip_stage_2(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large set's trials are a sliver of an epoch: worse than the head there is not evidence enough to skip
    fine-tuning (Fashion-MNIST: trials 4-16 points below the head, the fine-tune 6 points above it). Stage 2 goes
    on, and selection still keeps the head when no epoch beats it."""
    import edgetl.train as train_module

    monkeypatch.setattr(train_module, "TRIAL_IMAGES", 8)  # one step of 8: shorter than an epoch
    run = tmp_path / "run"
    cfg = tiny_cfg(epochs_head=8, recipe_candidates="all@50,all@80", epochs_finetune=2)
    m = train(image_folder, cfg, out=str(run), reporter=QUIET).metrics
    trials = m["recipe"]["trials"]
    head = Score(m["recipe"]["head"]["val_top1"], m["recipe"]["head"]["val_loss"])
    assert all(t["val_top1"] < head.top1 and t["val_loss"] > head.loss for t in trials), "the wrecking rates did wreck"
    assert m["recipe"]["chosen"] is not None and "shorter than an epoch" in m["recipe"]["why"]
    assert [r["epoch"] for r in history(run) if r["stage"] == "finetune"] == [1, 2]
    assert m["best"]["stage"] == "head", "no fine-tune epoch beat the head, so the head is what is kept"

def test_explicit_unfreeze_means_a_fixed_recipe(image_folder: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgetl.cli.main import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(image_folder), "--backbone", "tiny", "--no-pretrained", "--epochs-head", "2",
                                   "--epochs-finetune", "1", "--unfreeze", "1", "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["recipe"] == "finetune"
    assert json.loads((out / "metrics.json").read_text())["recipe"]["trials"] == []


# ----------------------------------------------------------------------------- the test split


def test_training_never_opens_a_test_image(split_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file: object, *a: object, **k: object) -> object:
        if isinstance(file, (str, os.PathLike)):
            opened.append(os.fspath(file))
        return real_open(file, *a, **k)  # type: ignore[call-overload]

    def spy_os_open(path: object, *a: object, **k: object) -> int:
        opened.append(os.fspath(path))  # type: ignore[arg-type]
        return real_os_open(path, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    train(split_folder, tiny_cfg(epochs_finetune=1), out=str(tmp_path / "run"), reporter=QUIET)
    monkeypatch.undo()
    images = [p for p in opened if p.endswith(".png")]
    assert any(f"{os.sep}train{os.sep}" in p for p in images), "the spy saw no training image: it is not watching"
    assert not [p for p in images if f"{os.sep}test{os.sep}" in p]


# ----------------------------------------------------------------------------- distillation


@pytest.fixture
def teacher_run(image_folder: Path, tmp_path: Path) -> Path:
    run = tmp_path / "teacher"
    train(image_folder, tiny_cfg(recipe="finetune", epochs_finetune=1), out=str(run), reporter=QUIET)
    return run


def test_distillation_runs_end_to_end(image_folder: Path, tmp_path: Path, teacher_run: Path) -> None:
    from edgetl.run import RunFolder

    cfg = tiny_cfg(recipe="finetune", epochs_finetune=1, input_size=48)
    plain = train(image_folder, cfg, out=str(tmp_path / "plain"), reporter=QUIET)
    taught = train(image_folder, TrainConfig(**{**cfg.to_dict(), "teacher": str(teacher_run), "distill_alpha": 0.9}),
                   out=str(tmp_path / "taught"), reporter=QUIET)  # fmt: skip
    rec = json.loads((taught.run_dir / "manifest.json").read_text())["teacher"]
    assert rec["checkpoint_sha256"] == RunFolder(teacher_run).checkpoint_sha256 and rec["input_size"] == 64
    assert taught.metrics["teacher"]["alpha"] == 0.9
    assert rec["leak_check"].startswith("passed"), "same data root and split: the leak check must have run"
    losses = [r["train_loss"] for r in history(plain.run_dir)], [r["train_loss"] for r in history(taught.run_dir)]
    assert losses[0] != pytest.approx(losses[1]), "the teacher's soft labels should change the training loss"
    assert not list(taught.run_dir.glob(".decoded-*")), "the teacher's decode cache was left behind"


def test_consistent_distillation_scores_the_students_own_crops(image_folder: Path, tmp_path: Path, teacher_run: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """--distill-mode consistent: in stage 2 the teacher runs on every (mixed) batch the student trains on,
    resized to the teacher's 64 px; in cached mode it runs only once, over the whole images."""
    import edgetl.distill as distill

    calls: dict[str, list[tuple[int, ...]]] = {}
    real_load = distill.load_teacher

    def spying_load(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        model, spec, info = real_load(*args, **kwargs)
        seen = calls.setdefault(current, [])
        model.register_forward_pre_hook(lambda module, inputs: seen.append(tuple(inputs[0].shape)))
        return model, spec, info

    monkeypatch.setattr(distill, "load_teacher", spying_load)
    results = {}
    for current, extra in (("cached", {}), ("consistent", {"mixup": 0.4})):
        cfg = tiny_cfg(recipe="finetune", epochs_finetune=2, patience=0, input_size=48, teacher=str(teacher_run),
                       distill_mode=current, **extra)  # fmt: skip
        results[current] = train(image_folder, cfg, out=str(tmp_path / current), reporter=QUIET)
    stage2 = [r for r in history(results["consistent"].run_dir) if r["stage"] == "finetune"]
    once, per_step = calls["cached"], calls["consistent"]
    assert len(per_step) > len(once) >= 1
    assert all(shape[1:] == (3, 64, 64) for shape in per_step), "the teacher must see its own input size"
    step_calls = per_step[len(once):]
    # The same number of steps in each stage-2 epoch, each a whole batch of 8 (ragged last batches are dropped).
    assert len(stage2) == 2 and len(step_calls) % 2 == 0 and {shape[0] for shape in step_calls} == {8}, step_calls
    assert results["consistent"].metrics["teacher"]["mode"] == "consistent"
    assert results["cached"].metrics["teacher"]["mode"] == "cached"


def test_cross_fitted_teachers_score_only_the_images_they_did_not_see(image_folder: Path, tmp_path: Path, teacher_run: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Several --teacher runs, each trained with --hold-out-fold K/2: each scores exactly the training images
    it left out, together all of the student's, and a teacher that saw an image never scores it."""
    folds = [tmp_path / f"fold{k}" for k in range(2)]
    for k, run in enumerate(folds):
        train(image_folder, tiny_cfg(recipe="head", hold_out_fold=f"{k}/2"), out=str(run), reporter=QUIET)
    scored: dict[str, list[str]] = {}
    real_scores = Trainer._teacher_scores

    def spying_scores(self, model, spec, info, ls, name):  # type: ignore[no-untyped-def]
        scored[info["run"]] = [ref.key for ref in ls.refs]
        return real_scores(self, model, spec, info, ls, name)

    monkeypatch.setattr(Trainer, "_teacher_scores", spying_scores)
    cfg = tiny_cfg(recipe="head", teacher=tuple(str(run) for run in folds))
    taught = train(image_folder, cfg, out=str(tmp_path / "student"), reporter=QUIET)
    student_train = {row[0] for row in json.loads((taught.run_dir / "splits.json").read_text())["splits"]["train"]}
    for run in folds:
        splits = json.loads((run / "splits.json").read_text())["splits"]
        held_out = {row[0] for row in splits["unused"]}
        assert set(scored[str(run.resolve())]) == held_out and held_out.isdisjoint(row[0] for row in splits["train"])
    assert sorted(k for keys in scored.values() for k in keys) == sorted(student_train), "each image scored once"
    rec = taught.metrics["teacher"]
    assert rec["combined"] == "cross-fitted" and sum(t["images_scored"] for t in rec["teachers"]) == len(student_train)
    manifest = json.loads((taught.run_dir / "manifest.json").read_text())
    assert TrainConfig.from_dict(manifest["config"]) == cfg, "the recorded teachers come back as they were given"
    # A teacher that trained on every image leaves no honest teacher for the images fold 1 trained on.
    with pytest.raises(EdgetlError, match="trained on by every --teacher"):
        train(image_folder, tiny_cfg(recipe="head", teacher=(str(folds[0]), str(teacher_run))), out=str(tmp_path / "x"),
              reporter=QUIET)  # fmt: skip
    assert not (tmp_path / "x").exists()
    for bad, message in (((str(folds[0]),), "at least two"), ((str(folds[0]),) * 2, "at least two different"),
                         (tuple(map(str, folds)), "several --teacher")):  # fmt: skip
        extra = {"distill_mode": "consistent"} if message == "several --teacher" else {}
        with pytest.raises(EdgetlError, match=message):
            tiny_cfg(teacher=bad, **extra)


def test_an_ensemble_of_teachers_averages_their_logits_on_every_image(image_folder: Path, tmp_path: Path, teacher_run: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Several --teacher runs that each trained on every training image are an ensemble: each scores all of
    the student's training images and the cached soft labels are the mean of their logits."""
    other = tmp_path / "other-teacher"
    train(image_folder, tiny_cfg(recipe="head", input_size=48), out=str(other), reporter=QUIET)
    per_teacher: dict[str, tuple[list[str], np.ndarray]] = {}
    kept: list[torch.Tensor] = []
    real_scores, real_prepare = Trainer._teacher_scores, Trainer.prepare_teacher

    def spying_scores(self, model, spec, info, ls, name):  # type: ignore[no-untyped-def]
        out = real_scores(self, model, spec, info, ls, name)
        per_teacher[info["run"]] = ([ref.key for ref in ls.refs], out)
        return out

    def spying_prepare(self):  # type: ignore[no-untyped-def]
        real_prepare(self)
        kept.append(self.teacher_logits.detach().cpu().clone())

    monkeypatch.setattr(Trainer, "_teacher_scores", spying_scores)
    monkeypatch.setattr(Trainer, "prepare_teacher", spying_prepare)
    taught = train(image_folder, tiny_cfg(recipe="head", teacher=(str(teacher_run), str(other))), out=str(tmp_path / "student"),
                   reporter=QUIET)  # fmt: skip
    student_train = [row[0] for row in json.loads((taught.run_dir / "splits.json").read_text())["splits"]["train"]]
    assert len(per_teacher) == 2
    for keys, _ in per_teacher.values():
        assert sorted(keys) == sorted(student_train), "every teacher of an ensemble scores every training image"
    (keys_a, a), (keys_b, b) = per_teacher.values()
    assert keys_a == keys_b and not np.allclose(a, b), "two different teachers, the same images in the same order"
    np.testing.assert_allclose(kept[0].numpy(), (a + b) / 2, rtol=1e-5, atol=1e-5)
    rec = taught.metrics["teacher"]
    assert rec["combined"] == "ensemble"
    assert [t["images_scored"] for t in rec["teachers"]] == [len(student_train)] * 2


def test_teacher_with_other_labels_or_preprocessing_or_a_leak_is_refused(image_folder: Path, tmp_path: Path, teacher_run: Path) -> None:
    from conftest import make_folder

    other = make_folder(tmp_path / "other", per_class=6, classes={"red": (200, 0, 0), "mauve": (90, 60, 90)})
    with pytest.raises(EdgetlError, match="labels"):
        train(other, tiny_cfg(teacher=str(teacher_run)), out=str(tmp_path / "a"), reporter=QUIET)
    assert not (tmp_path / "a").exists(), "a refused teacher leaves no run folder"
    # Another seed splits the same folder differently: the teacher trained on some of this run's validation images.
    with pytest.raises(EdgetlError, match="in this run's val split"):
        train(image_folder, tiny_cfg(teacher=str(teacher_run), seed=1), out=str(tmp_path / "b"), reporter=QUIET)
    ckpt = torch.load(teacher_run / "checkpoint.pt", weights_only=True)
    ckpt["config"]["preprocess"]["mean"] = [0.0, 0.0, 0.0]
    torch.save(ckpt, teacher_run / "checkpoint.pt")
    with pytest.raises(EdgetlError, match="preprocesses pixels differently"):
        train(image_folder, tiny_cfg(teacher=str(teacher_run)), out=str(tmp_path / "c"), reporter=QUIET)
    with pytest.raises(EdgetlError, match=r"not an edgetl run|not found"):
        train(image_folder, tiny_cfg(teacher=str(tmp_path / "nowhere")), out=str(tmp_path / "d"), reporter=QUIET)


def test_a_teacher_trained_on_a_copy_of_the_data_is_checked_by_content(image_folder: Path, tmp_path: Path) -> None:
    # The same photos in another folder: names cannot be matched, the recorded digests can.
    copy = tmp_path / "copy"
    shutil.copytree(image_folder, copy)
    other_split = tmp_path / "teacher-seed1"
    train(copy, tiny_cfg(recipe="head", seed=1), out=str(other_split), reporter=QUIET)
    with pytest.raises(EdgetlError, match=r"byte-identical copies of .* this run.s validation image"):
        train(image_folder, tiny_cfg(recipe="head", teacher=str(other_split)), out=str(tmp_path / "a"), reporter=QUIET)
    same_split = tmp_path / "teacher-seed0"
    train(copy, tiny_cfg(recipe="head", seed=0), out=str(same_split), reporter=QUIET)
    taught = train(image_folder, tiny_cfg(recipe="head", teacher=str(same_split)), out=str(tmp_path / "b"), reporter=QUIET)
    check = json.loads((taught.run_dir / "manifest.json").read_text())["teacher"]["leak_check"]
    assert check.startswith("passed: no validation image is byte-identical") and "test split" in check, check


def test_a_short_trial_comes_before_whole_epochs(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgetl.train as train_module

    monkeypatch.setattr(train_module, "TRIAL_IMAGES", 8)  # one step of 8: shorter than an epoch
    run = tmp_path / "run"
    cfg = tiny_cfg(recipe_candidates="1@1e-3,1@2e-3", epochs_finetune=2, patience=0)
    m = train(image_folder, cfg, out=str(run), reporter=QUIET).metrics
    assert m["recipe"]["trial_steps"] == 1
    rows = [r for r in history(run) if r["stage"] == "finetune"]
    assert [r["epoch"] for r in rows] == [1, 2], "both whole epochs run after the trial"
    assert rows[0]["lr"] > 0, "the schedule must cover the trial's steps and every whole epoch (no epoch at lr 0)"
    assert m["stages"]["finetune"]["images_per_second"] > 0


def test_compiled_fine_tune_trains_the_same_weights(image_folder: Path, tmp_path: Path) -> None:
    """--compile runs stage 2 through torch.compile: the steps really are compiled, and they update the very
    parameters the optimizer, validation and the checkpoint use (a compiled copy would leave them untouched)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = tiny_cfg(recipe="finetune", unfreeze="all", epochs_head=1, epochs_finetune=1, compile=True)
    m = train(image_folder, cfg, out=str(tmp_path / "run"), reporter=QUIET).metrics
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert m["stages"]["finetune"]["compiled"] is True
    eager = train(image_folder, replace(cfg, compile=False), out=str(tmp_path / "eager"), reporter=QUIET).metrics
    rows = {name: next(r for r in history(tmp_path / name) if r["stage"] == "finetune") for name in ("run", "eager")}
    # Same seed, same batches: compiled and eager kernels differ only in rounding.
    assert rows["run"]["train_loss"] == pytest.approx(rows["eager"]["train_loss"], rel=1e-3)
    assert rows["run"]["val_loss"] == pytest.approx(rows["eager"]["val_loss"], rel=1e-3), "validation saw the trained weights"
    assert eager["stages"]["finetune"]["compiled"] is False


def test_compile_without_a_cpp_compiler_is_refused_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from edgetl.train import check_cpu_compiler

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(EdgetlError, match="needs a C\\+\\+ compiler"):
        check_cpu_compiler()


def test_mixup_and_cutmix_mix_stage_2_batches(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--mixup/--cutmix: every stage-2 batch goes through timm's Mixup and the loss is taken on its soft
    targets (same seed, same batches: the unmixed run's loss differs); stage 1 is not mixed."""
    from timm.data import Mixup

    calls: list[tuple[int, torch.Tensor]] = []
    real_call = Mixup.__call__

    def spy(self: Mixup, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed, soft = real_call(self, x, target)
        calls.append((len(x), soft))
        return mixed, soft

    monkeypatch.setattr(Mixup, "__call__", spy)
    # The loss must be taken on the soft targets, not on the images' own labels.
    loss_targets: list[torch.Tensor] = []
    real_loss = Trainer.train_loss

    def loss_spy(self: Trainer, on_images: bool = False) -> object:
        loss = real_loss(self, on_images)
        return lambda logits, y, idx, x: (loss_targets.append(y), loss(logits, y, idx, x))[1]

    monkeypatch.setattr(Trainer, "train_loss", loss_spy)
    cfg = tiny_cfg(recipe="finetune", unfreeze="all", epochs_head=1, epochs_finetune=1, mixup=0.4, cutmix=1.0)
    m = train(image_folder, cfg, out=str(tmp_path / "mixed"), reporter=QUIET).metrics
    assert m["stages"]["finetune"]["epochs_run"] == 1
    steps = len(calls)
    assert steps >= 2, "stage 2 did not mix its batches"
    # Soft targets: probabilities over the classes, and at least one batch really mixes two labels.
    assert all(soft.shape == (n, 3) and torch.allclose(soft.sum(1).cpu(), torch.ones(n)) for n, soft in calls)
    assert any(((soft > 0) & (soft < 1)).any() for _, soft in calls)
    soft_targets = [t for t in loss_targets if t.ndim == 2]
    assert len(soft_targets) == steps, "a stage-2 loss was taken on the unmixed labels"
    assert all(any(t is soft for _, soft in calls) for t in soft_targets)
    plain = train(image_folder, replace(cfg, mixup=0.0, cutmix=0.0), out=str(tmp_path / "plain"), reporter=QUIET)
    assert len(calls) == steps, "an unmixed run called Mixup"
    rows = {name: next(r for r in history(tmp_path / name) if r["stage"] == "finetune") for name in ("mixed", "plain")}
    assert rows["mixed"]["train_loss"] != pytest.approx(rows["plain"]["train_loss"], rel=1e-3)
    head = [(r["train_loss"], r["val_loss"]) for name in ("mixed", "plain") for r in history(tmp_path / name) if r["stage"] == "head"]
    assert head[0] == pytest.approx(head[1]), "stage 1 must not be mixed"
    assert plain.metrics["stages"]["finetune"]["epochs_run"] == 1
    assert json.loads((tmp_path / "mixed" / "manifest.json").read_text())["config"]["cutmix"] == 1.0


def test_random_erasing_occludes_stage_2_crops_with_the_dataset_mean(image_folder: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """--erase 1: every stage-2 training crop has a rectangle of exact zeros (the mean after normalisation);
    without it none has; the setting is recorded and a probability outside [0, 1] is refused."""
    from edgetl.train import AugmentedImages

    seen: list[torch.Tensor] = []
    real_get = AugmentedImages.__getitem__

    def spy(self: AugmentedImages, i: int) -> object:
        item = real_get(self, i)
        seen.append(item[0])
        return item

    monkeypatch.setattr(AugmentedImages, "__getitem__", spy)

    def zero_share(x: torch.Tensor) -> float:
        return float((x == 0).all(dim=0).float().mean())  # pixels that are exactly 0 in every channel

    cfg = tiny_cfg(recipe="finetune", unfreeze="all", epochs_head=1, epochs_finetune=1, erase=1.0)
    train(image_folder, cfg, out=str(tmp_path / "erased"), reporter=QUIET)
    assert len(seen) >= 8, "stage 2 drew no augmented crops"
    assert all(zero_share(x) >= 0.015 for x in seen), "a training crop was not erased"
    assert json.loads((tmp_path / "erased" / "manifest.json").read_text())["config"]["erase"] == 1.0
    seen.clear()
    train(image_folder, replace(cfg, erase=0.0), out=str(tmp_path / "plain"), reporter=QUIET)
    assert seen and max(zero_share(x) for x in seen) < 0.015
    with pytest.raises(EdgetlError, match="--erase is the probability"):
        tiny_cfg(erase=1.5)
    with pytest.raises(EdgetlError, match="--augment none turns off"):
        tiny_cfg(erase=0.5, augment="none")


def test_bad_mixing_options_are_refused() -> None:
    with pytest.raises(EdgetlError, match="--mixup is a Beta"):
        tiny_cfg(mixup=-1.0)
    with pytest.raises(EdgetlError, match="--batch-size must be even"):
        tiny_cfg(cutmix=1.0, batch_size=7)
    with pytest.raises(EdgetlError, match="cannot be combined with --teacher in --distill-mode cached"):
        tiny_cfg(mixup=0.2, teacher="some-run")
    assert tiny_cfg(mixup=0.2, teacher="some-run", distill_mode="consistent").mixes  # the teacher scores mixed images
    with pytest.raises(EdgetlError, match="--distill-mode must be one of"):
        tiny_cfg(teacher="some-run", distill_mode="online")
    with pytest.raises(EdgetlError, match="none was given"):
        tiny_cfg(distill_mode="consistent")


def test_an_odd_batch_per_process_under_mixup_is_refused_before_training(tmp_path: Path) -> None:
    """6 images a step over 2 processes is 3 each: Mixup pairs images within a process's batch."""
    from types import SimpleNamespace

    from edgetl.distributed import Dist

    dataset = SimpleNamespace(root=tmp_path, classes=["a", "b"])
    with pytest.raises(EdgetlError, match="even batch in each process: 6 over 2 processes is 3"):
        Trainer(tiny_cfg(mixup=0.2, batch_size=6), dataset, tmp_path / "run", QUIET, dist=Dist(world_size=2))  # type: ignore[arg-type]
    Trainer(tiny_cfg(mixup=0.2, batch_size=8), dataset, tmp_path / "run", QUIET, dist=Dist(world_size=2))  # type: ignore[arg-type]
