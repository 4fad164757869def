"""edgetl adapt: BatchNorm alignment, the adapted run folder and its lineage, later stages on it, guard rails."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COLOURS, make_folder, tiny_run_config
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from edgetl.bnalign import BatchAlignment, LayerStats, batchnorm_layers, fold, measuring
from edgetl.cli.main import app
from edgetl.errors import EdgetlError

runner = CliRunner()


def shifted(src: Path, dst: Path, scale: float = 0.35, offset: float = 120.0, mode: str | None = None) -> Path:
    """A copy of a folder of images with lower contrast and a brighter level: a change of camera."""
    for f in src.rglob("*.png"):
        x = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(np.clip(x * scale + offset, 0, 255).astype(np.uint8))
        (img.convert(mode) if mode else img).save(out)
    return dst


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    # No padding: a convolution of a*x + b is then exactly a*conv(x) + const per channel.
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 6 * 6, 4))  # fmt: skip
    for bn in batchnorm_layers(net).values():  # trained-looking statistics that are not the data's
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _measure(net: nn.Module, x: torch.Tensor) -> LayerStats:
    with measuring(net) as acc, torch.no_grad():
        net(x)
    return LayerStats.of(acc)


def _align(net: nn.Module, source: LayerStats, x: torch.Tensor) -> None:
    with BatchAlignment(net, source) as align, torch.no_grad():
        for chunk in x.split(32):
            net(chunk)
    fold(net, source, align.target_stats())


def test_alignment_undoes_a_camera_shift_and_leaves_the_source_domain_alone() -> None:
    gen = torch.Generator().manual_seed(0)
    source_x = torch.randn(512, 3, 10, 10, generator=gen) * 0.8 + 0.3
    net = _convnet()
    source = _measure(net, source_x)
    with torch.no_grad():
        reference = net(source_x)
    spread = (reference - reference.mean(0)).abs().mean()

    same_domain = torch.randn(512, 3, 10, 10, generator=gen) * 0.8 + 0.3
    clean = _convnet()
    _align(clean, source, same_domain)
    moved = max(float((clean[i].running_mean - net[i].running_mean).abs().max()) for i in (1, 4))
    assert moved < 0.1  # another sample of the source domain: close to a no-op
    with torch.no_grad():
        assert (clean(source_x) - reference).abs().mean() < 0.1 * spread

        camera = _convnet()
        shifted_x = source_x * 0.3 + 1.5  # the same scenes through another camera
        error = (net(shifted_x) - reference).abs().mean()
        assert error > 0.5 * spread  # the shift matters to the trained model
        _align(camera, source, shifted_x)
        assert (camera[1].running_mean - net[1].running_mean).abs().max() > 0.2  # statistics really changed
        # The first layer is linear, so aligning its output restores everything after it.
        assert (camera(shifted_x) - reference).abs().mean() < 0.25 * error


def test_alignment_keeps_layers_beyond_the_depth_and_dead_channels() -> None:
    net = _convnet()
    x = torch.randn(64, 3, 10, 10)
    source = _measure(net, x)
    source.var["0"] = source.var["1"]  # unused key: harmless
    source.var["1"][0] = 0.0  # channel 0 of the first BatchNorm carried nothing at the source
    adapted = _convnet()
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    with BatchAlignment(adapted, source, depth=0.5) as align, torch.no_grad():
        adapted(x * 2 + 1)
    assert set(align.target) == {"1"}  # half of the two BatchNorm layers, from the input
    fold(adapted, source, align.target_stats())
    after = adapted.state_dict()
    assert torch.equal(after["4.running_mean"], before["4.running_mean"])
    assert after["1.running_mean"][0] == before["1.running_mean"][0]
    assert not torch.equal(after["1.running_mean"][1:], before["1.running_mean"][1:])


@pytest.fixture(scope="module")
def shifted_data(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shifted")
    new = make_folder(root / "new", per_class=14, seed=5)  # unseen images of the training domain
    return {
        "clean": new,
        "target": shifted(new, root / "target"),  # unlabelled use: the class folders are ignored
        "evaluate": shifted(make_folder(root / "eval", per_class=10, seed=6), root / "evaluate"),
    }


@pytest.fixture(scope="module")
def adapted_run(tiny_run: Path, shifted_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapted") / "run"
    res = runner.invoke(app, ["adapt", str(tiny_run), str(shifted_data["target"]), "--out", str(out), "--bn-depth", "1",
                              "--method", "adabn", "--evaluate", str(shifted_data["evaluate"]), "--batch-size", "16"])  # fmt: skip
    assert res.exit_code == 0, res.output
    return out


def test_adapting_to_a_shifted_copy_raises_accuracy_on_it(adapted_run: Path, tiny_run: Path) -> None:
    m = json.loads((adapted_run / "metrics.json").read_text())
    ev = m["evaluate"]
    assert ev["after_top1"] >= ev["before_top1"] + 0.15, ev
    # Without labels too: before, the shift piled the predictions onto fewer classes than the prior.
    assert m["shift"]["after"]["prior_distance"] < m["shift"]["before"]["prior_distance"] - 0.2
    assert (adapted_run / "shift.png").stat().st_size > 10_000
    parent = torch.load(tiny_run / "checkpoint.pt", weights_only=True)["state_dict"]
    child = torch.load(adapted_run / "checkpoint.pt", weights_only=True)["state_dict"]
    stats = [k for k in parent if k.endswith("running_mean")]
    assert any(not torch.allclose(parent[k], child[k], atol=1e-3) for k in stats)
    weights = [k for k in parent if k.endswith("weight") and "bn" not in k]
    assert all(torch.equal(parent[k], child[k]) for k in weights)  # adabn changes statistics only


def test_adapted_run_records_its_lineage_and_target_images(adapted_run: Path, tiny_run: Path, shifted_data: dict[str, Path]) -> None:
    from edgetl.fileio import sha256_file

    man = json.loads((adapted_run / "manifest.json").read_text())
    lin = man["lineage"]
    assert lin["parent_run"] == str(tiny_run.resolve())
    assert lin["parent_checkpoint_sha256"] == sha256_file(tiny_run / "checkpoint.pt")
    assert lin["method"] == "adabn" and lin["target"]["images"] == 42
    target = json.loads((adapted_run / "target.json").read_text())
    assert target["count"] == 42 and target["root"] == str(shifted_data["target"].resolve())
    files = {p.relative_to(shifted_data["target"]).as_posix() for p in shifted_data["target"].rglob("*.png")}
    assert {k for k, _ in target["files"]} == files
    assert json.loads((adapted_run / "splits.json").read_text())["splits"] == json.loads((tiny_run / "splits.json").read_text())["splits"]
    res = runner.invoke(app, ["train", "--resume", str(adapted_run)])
    assert res.exit_code == 2 and "edgetl adapt" in res.output


def test_adapted_run_exports_quantizes_on_target_images_and_evaluates(adapted_run: Path, shifted_data: dict[str, Path]) -> None:
    res = runner.invoke(app, ["export", str(adapted_run), "--format", "onnx", "--quantize", "int8", "--max-drop", "100"])
    assert res.exit_code == 0, res.output
    q = json.loads((adapted_run / "quantize.json").read_text())
    assert q["calibration"]["images_from"] == "target"
    target_keys = {k for k, _ in json.loads((adapted_run / "target.json").read_text())["files"]}
    assert set(q["calibration"]["files"]) <= target_keys
    # int8 was also judged on the target images, by how often it changes the fp32 model's class there.
    from edgetl import metadata
    from edgetl.backends.onnxruntime import OrtModel
    from edgetl.parity import prepare
    from edgetl.progress import Reporter
    from edgetl.run import RunFolder
    from edgetl.target import recorded_target

    judged, ort = q["judged_on"]["target"], q["results"]["onnxruntime"]
    assert judged["n"] == len(target_keys) and judged["note"].startswith("all")  # every target image calibrated: judged on all
    spec = metadata.spec_from(OrtModel(adapted_run / "model.onnx").metadata)
    x = prepare(recorded_target(RunFolder.open(adapted_run).target_record()), spec, "target", Reporter(quiet=True)).floats
    fp32, int8 = (OrtModel(adapted_run / f).predict(x) for f in ("model.onnx", "model.int8.onnx"))
    assert ort["target_changed_points"] == pytest.approx(100 * float((fp32.argmax(1) != int8.argmax(1)).mean()))
    prob = torch.softmax(torch.from_numpy(fp32).double(), 1).numpy()
    rows = np.arange(len(x))
    expected = 100 * float((prob[rows, fp32.argmax(1)] - prob[rows, int8.argmax(1)]).mean())
    assert ort["target_expected_drop_points"] == pytest.approx(expected)
    assert ort["drop_points"] == max(ort["val_drop_points"], ort["target_expected_drop_points"])
    res = runner.invoke(app, ["eval", str(adapted_run), str(shifted_data["evaluate"]), "--json", str(adapted_run / "e.json")])
    assert res.exit_code == 0, res.output
    m = json.loads((adapted_run / "metrics.json").read_text())
    assert json.loads((adapted_run / "e.json").read_text())["top1"] == pytest.approx(m["evaluate"]["after_top1"])
    # The target images changed since: calibration refuses to guess.
    victim = next(shifted_data["target"].rglob("*.png"))
    data = victim.read_bytes()
    try:
        victim.write_bytes(data + b"\0")
        res = runner.invoke(app, ["quantize", str(adapted_run), "--format", "onnx"])
        assert res.exit_code == 2 and "changed" in res.output
    finally:
        victim.write_bytes(data)


def test_int8_of_an_adapted_run_is_judged_on_target_images_it_was_not_calibrated_on(adapted_run: Path, shifted_data: dict[str, Path],
                                                                                    tmp_path: Path) -> None:  # fmt: skip
    import shutil

    from edgetl import metadata
    from edgetl.backends.onnxruntime import OrtModel
    from edgetl.int8_judge import target_check_images
    from edgetl.progress import Reporter
    from edgetl.quantize import QuantizeOptions, load_images
    from edgetl.run import RunFolder

    # The same adapted run with twice its target images (each copied once): now enough to hold half out.
    run, target = tmp_path / "run", tmp_path / "target"
    shutil.copytree(adapted_run, run)
    shutil.copytree(shifted_data["target"], target)
    record = json.loads((run / "target.json").read_text())
    files = [*record["files"]]
    for key, size in record["files"]:
        copy = key.replace(".png", "_copy.png")
        shutil.copy(target / key, target / copy)
        files.append([copy, size])
    (run / "target.json").write_text(json.dumps({**record, "root": str(target), "files": files, "count": len(files)}))
    folder, quiet = RunFolder.open(run), Reporter(quiet=True)
    if not (run / "model.onnx").exists():  # when this test runs alone
        from edgetl.export import ExportOptions, export_run

        export_run(run, ExportOptions(format="onnx"), quiet)
    meta = OrtModel(run / "model.onnx").metadata
    calib, _, record = load_images(folder, meta, QuantizeOptions(), quiet)
    assert record["warning"].startswith(f"calibrating on {len(files) // 2} of the {len(files)} target images")
    judged, note = target_check_images(folder, metadata.spec_from(meta), calib.keys, 1000, 0, False, quiet)
    assert len(calib.keys) == len(files) // 2 and len(judged.keys) == len(files) - len(files) // 2
    assert not set(calib.keys) & set(judged.keys) and note.startswith(f"{len(judged.keys)} target images not used")


def test_adapting_on_images_of_the_training_domain_is_close_to_a_no_op(tiny_run: Path, shifted_data: dict[str, Path],
                                                                      tmp_path: Path) -> None:  # fmt: skip
    res = runner.invoke(app, ["adapt", str(tiny_run), str(shifted_data["clean"]), "--out", str(tmp_path / "clean"), "--batch-size", "16",
                              "--method", "adabn", "--gate", "0"])  # fmt: skip
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    assert m["adaptation"]["adapted"]  # with the gate off, adapting itself is close to a no-op
    assert abs(m["source_val"]["after_top1"] - m["source_val"]["before_top1"]) <= 0.05
    shift = m["shift"]
    assert shift["after"]["prior_distance"] == pytest.approx(shift["before"]["prior_distance"], abs=0.1)


def test_shift_gate_compares_the_target_with_same_size_in_domain_subsets() -> None:
    from edgetl.shift import GATE_IMAGES, GATE_THRESHOLD, FeatureReference, shift_gate

    rng = np.random.default_rng(0)
    dims = 64
    reference = FeatureReference.of(rng.normal(0, 1, (2000, dims)))
    in_domain = rng.normal(0, 1, (60, dims))
    same = rng.normal(0, 1, (40, dims))
    moved = rng.normal(0.8, 1.3, (40, dims))
    closed, opened = shift_gate(reference, same, in_domain), shift_gate(reference, moved, in_domain)
    assert not closed["open"] and closed["excess"] < GATE_THRESHOLD and closed["subset_images"] == 40 and closed["unit_images"] == 48
    assert opened["open"] and opened["excess"] >= GATE_THRESHOLD
    # A target larger than the subsets is measured at their size: a large in-domain target stays shut
    # although its full-size distance is smaller than every small subset's (the bias the subsets correct for).
    large = shift_gate(reference, rng.normal(0, 1, (1000, dims)), in_domain)
    assert large["subset_images"] == 48 and not large["open"] and large["target_shift"] > 0.5 * large["band_median"]
    # The unit is measured at the size the threshold was chosen at: larger targets and validation splits at GATE_IMAGES.
    big = shift_gate(reference, rng.normal(0, 1, (1000, dims)), rng.normal(0, 1, (400, dims)))
    assert big["subset_images"] == big["unit_images"] == GATE_IMAGES and not big["open"]
    few = shift_gate(reference, moved, in_domain[:10])
    assert few["open"] and few["excess"] is None and "too few" in few["reason"]
    assert shift_gate(reference, same, in_domain, threshold=0)["open"]


def test_shift_gate_opens_on_a_shift_at_32_target_images_as_at_186() -> None:
    """The score must not shrink with the target's size: the first gate's ratio (target shift over the largest
    same-size validation subset's) fell towards 1 on small targets, and at 32 images it shut on Gaussian noise
    that cost 13-18 points. A moderate shift opens the gate, and in-domain images keep it shut, at both sizes."""
    from edgetl.shift import FeatureReference, shift_gate

    for seed in range(3):
        rng = np.random.default_rng(seed)
        reference = FeatureReference.of(rng.normal(0, 1, (2000, 64)))
        in_domain = rng.normal(0, 1, (300, 64))
        for n in (32, 186):
            moved = shift_gate(reference, rng.normal(0.25, 1.1, (n, 64)), in_domain, seed=seed)
            same = shift_gate(reference, rng.normal(0, 1, (n, 64)), in_domain, seed=seed)
            assert moved["open"] and not same["open"], (seed, n, moved["excess"], same["excess"])
            assert moved["subset_images"] == n and moved["unit_images"] == 186
            if n == 32:  # what the first gate scored: far below its 3.0
                assert moved["target_shift"] / moved["band_max"] < 3.0


def test_shift_gate_keeps_the_model_on_images_of_the_training_domain_and_adapts_to_shifted_ones(
        shifted_data: dict[str, Path], tmp_path: Path) -> None:  # fmt: skip
    from edgetl.progress import Reporter
    from edgetl.shift import GATE_THRESHOLD
    from edgetl.train import train

    data = tmp_path / "data"
    make_folder(data / "train", per_class=12)
    make_folder(data / "validation", per_class=15, seed=1)  # 45 images: enough for the shift gate
    run = train(data, tiny_run_config(), out=str(tmp_path / "run"), reporter=Reporter(quiet=True)).run_dir
    parent = torch.load(run / "checkpoint.pt", weights_only=True)["state_dict"]

    def adapt(target: str, *extra: str) -> tuple[dict, dict, str]:
        out = tmp_path / f"{target}{len(extra)}"
        res = runner.invoke(app, ["adapt", str(run), str(shifted_data[target]), "--out", str(out), "--batch-size", "16",
                                  "--method", "adabn", *extra])  # fmt: skip
        assert res.exit_code == 0, res.output
        child = torch.load(out / "checkpoint.pt", weights_only=True)["state_dict"]
        changed = {k for k in parent if not torch.equal(parent[k], child[k])}
        return json.loads((out / "metrics.json").read_text())["adaptation"], {"changed": changed}, res.output

    record, model, output = adapt("clean")
    assert not record["adapted"] and record["gate"]["excess"] < record["gate"]["threshold"] == GATE_THRESHOLD
    assert not model["changed"] and "not adapted" in output and "--gate 0" in output
    record, model, _ = adapt("target")
    assert record["adapted"] and record["gate"]["excess"] >= GATE_THRESHOLD and model["changed"]
    record, model, _ = adapt("clean", "--gate", "0")
    assert record["adapted"] and model["changed"]
    for bad in ("-1", "nan"):  # nan would shut the gate on everything
        res = runner.invoke(app, ["adapt", str(run), str(shifted_data["clean"]), "--gate", bad, "--out", str(tmp_path / "neg")])
        assert res.exit_code == 2 and "--gate" in res.output


def test_quantize_calib_source_target_needs_an_adapted_run(tiny_run: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    assert runner.invoke(app, ["export", str(tiny_run), "--format", "onnx", "--out", str(export)]).exit_code == 0
    res = runner.invoke(app, ["quantize", str(export), "--format", "onnx", "--calib-source", "target"])
    assert res.exit_code == 2 and "not an adapted run" in res.output


@pytest.mark.parametrize("case", ["missing", "file", "empty", "few", "grey", "tiny", "same-out", "bad-method"])
def test_bad_target_folders_exit_2_and_leave_nothing(case: str, tiny_run: Path, shifted_data: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "t"
    out = tmp_path / "out"
    extra: list[str] = []
    expect = {"missing": "not found", "file": "is a file", "empty": "no images", "few": "at least 32", "grey": "grey",
              "tiny": "shorter side", "same-out": "new run", "bad-method": "--method"}[case]  # fmt: skip
    if case == "file":
        target.write_text("x")
    elif case == "empty":
        target.mkdir()
    elif case == "few":
        make_folder(target, per_class=3)
    elif case == "grey":
        shifted(shifted_data["clean"], target, 1.0, 0.0, mode="L")
    elif case == "tiny":
        for f in list(shifted_data["clean"].rglob("*.png")):
            p = target / f.name
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.open(f).resize((6, 5)).save(p)
    elif case == "same-out":
        target, out = shifted_data["target"], tiny_run
    elif case == "bad-method":
        target, extra = shifted_data["target"], ["--method", "magic"]
    res = runner.invoke(app, ["adapt", str(tiny_run), str(target), "--out", str(out), *extra])
    assert res.exit_code == 2, res.output
    assert expect in res.output and "Traceback" not in res.output
    if case != "same-out":
        assert not out.exists()


def test_tent_im_and_shot_learn_only_affine_parameters_and_stop_before_collapse(tiny_run: Path, shifted_data: dict[str, Path],
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import edgetl.adapt
    from edgetl import checkpoint
    from edgetl.adapt import AdaptOptions, adapt_model, measure_source
    from edgetl.data import scoring_set
    from edgetl.decoded import decode_split
    from edgetl.run import RunFolder

    ckpt = RunFolder.open(tiny_run).checkpoint()
    model, spec = checkpoint.build_model(ckpt), checkpoint.spec_of(ckpt)
    dev = torch.device("cpu")
    src, _ = decode_split(RunFolder.open(tiny_run).dataset().train, spec)
    source = measure_source(model, src, spec, dev, np.full(len(COLOURS), 1 / len(COLOURS)))
    target, _ = decode_split(scoring_set(shifted_data["target"])[0], spec)
    for method in ("tent", "im", "shot"):
        adapted, rec = adapt_model(model, source, target, spec, dev, AdaptOptions(method=method, epochs=2, batch_size=16))
        assert rec["training"]["steps"] >= 2
        changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, model.state_dict()[k])}
        assert changed and all(k.rsplit(".", 1)[-1] in ("weight", "bias", "running_mean", "running_var") for k in changed)
        assert all(isinstance(adapted.get_submodule(k.rsplit(".", 1)[0]), nn.modules.batchnorm._BatchNorm) for k in changed)
    # Predictions that lose their diversity after the first pass (as measured): the pass is undone, so
    # the affine parameters are exactly the trained ones (only the statistics are adapted).
    diversity = iter([1.0, 0.1, 1.0, 1.0])
    monkeypatch.setattr(edgetl.adapt, "_share_entropy", lambda pred, n: next(diversity))
    adapted, rec = adapt_model(model, source, target, spec, dev, AdaptOptions(method="tent", lr=1e-2, epochs=3, batch_size=16))
    assert "collapsing" in rec["training"]["stopped"] and len(rec["training"]["passes"]) == 1
    trained = model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in adapted.state_dict().items() if not k.endswith(("running_mean", "running_var")))


def test_shot_with_train_extractor_learns_convolutions_but_never_the_head(tiny_run: Path, shifted_data: dict[str, Path]) -> None:
    from edgetl import checkpoint
    from edgetl.adapt import EXTRACTOR_LR_SCALE, AdaptOptions, adapt_model, measure_source, trained_parameter_groups
    from edgetl.data import scoring_set
    from edgetl.decoded import decode_split
    from edgetl.run import RunFolder

    ckpt = RunFolder.open(tiny_run).checkpoint()
    model, spec = checkpoint.build_model(ckpt), checkpoint.spec_of(ckpt)
    groups = trained_parameter_groups(model, "extractor", 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 1e-3 * EXTRACTOR_LR_SCALE]
    head = {id(p) for p in model.head.parameters()}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) and not head & set(grouped)
    assert set(grouped) == {id(p) for p in model.backbone.parameters()}  # every extractor weight, each once
    dev = torch.device("cpu")
    src, _ = decode_split(RunFolder.open(tiny_run).dataset().train, spec)
    source = measure_source(model, src, spec, dev, np.full(len(COLOURS), 1 / len(COLOURS)))
    target, _ = decode_split(scoring_set(shifted_data["target"])[0], spec)
    adapted, rec = adapt_model(model, source, target, spec, dev, AdaptOptions(method="shot", train="extractor", epochs=2, batch_size=16))
    assert rec["training"]["trained"] == "extractor" and rec["training"]["parameters"] > 0
    before = model.state_dict()
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, before[k])}
    convs = {k for k in changed if isinstance(adapted.get_submodule(k.rsplit(".", 1)[0]), nn.Conv2d)}
    assert convs, "no convolution learned"
    assert not any(k.startswith("head.") for k in changed)
    with pytest.raises(EdgetlError, match="--train"):
        AdaptOptions(train="everything")
    with pytest.raises(EdgetlError, match="adabn learns no weights"):
        AdaptOptions(method="adabn", train="extractor")


@pytest.mark.parametrize("lr", [-1.0, 0.0, float("nan"), float("inf")])
def test_a_learning_rate_out_of_range_is_refused(lr: float) -> None:
    from edgetl.adapt import AdaptOptions

    with pytest.raises(EdgetlError, match="--lr must be"):
        AdaptOptions(method="tent", lr=lr)


def test_corruptions_are_seeded_and_grow_with_severity() -> None:
    from edgetl.corruptions import CORRUPTIONS, VALIDATION, corrupt

    rng = np.random.default_rng(0)
    x = np.clip(rng.normal(120, 50, (64, 64, 3)), 0, 255).astype(np.uint8)
    x[16:48, 16:48] = (200, 30, 30)  # an edge for the blurs
    assert len(CORRUPTIONS) >= 8
    for name in [*CORRUPTIONS, *VALIDATION]:
        mild, severe = corrupt(x, name, 1, seed=1), corrupt(x, name, 5, seed=1)
        assert mild.shape == x.shape and mild.dtype == np.uint8
        assert np.array_equal(mild, corrupt(x, name, 1, seed=1))
        d1, d5 = np.abs(mild.astype(int) - x).mean(), np.abs(severe.astype(int) - x).mean()
        # The paper's saturate goes from washed out (1-2) to oversaturated (3-5): not monotone in pixels.
        assert d1 > 0 and (d1 < d5 or name == "saturate"), (name, d1, d5)
    with pytest.raises(ValueError):
        corrupt(x, "gaussian_noise", 6, seed=0)


def test_shot_centroid_labels_correct_confident_mistakes_inside_clear_clusters() -> None:
    from edgetl.adapt import centroid_labels

    rng = np.random.default_rng(0)
    centres = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    truth = np.repeat(np.arange(3), 20)
    feats = centres[truth] + torch.from_numpy(rng.normal(0, 0.5, (60, 3))).float()
    probs = torch.nn.functional.one_hot(torch.from_numpy(truth), 3).float() * 0.7 + 0.1  # rows sum to 1
    wrong = [0, 21, 45, 46]  # confidently predicted as the next class
    for i in wrong:
        probs[i] = torch.roll(probs[i], 1)
    assert (probs.argmax(1).numpy() != truth).sum() == len(wrong)
    assert (centroid_labels(feats, probs) == truth).all()


def test_pseudo_flip_clusters_each_image_with_its_mirror_and_measures_the_target_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """--pseudo-flip: SHOT's pseudo-labels come from the mean features and probabilities of each image and its
    mirror image (both aligned), while the target statistics are still those of the unmirrored images only."""
    import edgetl.adapt as adapt
    from edgetl.adapt import AdaptOptions, centroid_labels, shot_pseudo_labels

    torch.manual_seed(0)
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.BatchNorm2d(8),
                                   nn.ReLU(), nn.AdaptiveAvgPool2d((1, 2)), nn.Flatten())  # keeps left from right  # fmt: skip
    model.head = nn.Linear(16, 3)
    model.eval()
    x = torch.randn(48, 3, 12, 12)
    x[:, :, :, :6] += 1.0  # the left half differs from the right: mirroring changes the features
    batches = [(chunk, torch.zeros(len(chunk))) for chunk in x.split(16)]
    monkeypatch.setattr(adapt, "_loader", lambda *args: batches)
    source = _measure(model.backbone, torch.randn(64, 3, 12, 12))
    with BatchAlignment(model.backbone, source) as align, torch.no_grad():
        images = list(range(len(x)))  # only its length is read: _loader is replaced
        plain = shot_pseudo_labels(model, align, images, None, torch.device("cpu"), 16)  # type: ignore[arg-type]
        counts_plain = {k: v.count for k, v in align.target.items()}
        flipped = shot_pseudo_labels(model, align, images, None, torch.device("cpu"), 16, flip=True)  # type: ignore[arg-type]
        assert {k: v.count for k, v in align.target.items()} == counts_plain  # the mirrors were not measured
        f = torch.cat([model.backbone(b) for b, _ in batches])
        f_m = torch.cat([model.backbone(b.flip(-1)) for b, _ in batches])
        p, p_m = torch.softmax(model.head(f), 1), torch.softmax(model.head(f_m), 1)
    assert (f - f_m).abs().mean() > 0.1 * f.abs().mean()
    assert (flipped == centroid_labels((f + f_m) / 2, (p + p_m) / 2)).all()
    assert (plain == centroid_labels(f, p)).all() and (plain != flipped).any()
    with pytest.raises(EdgetlError, match="--pseudo-flip"):
        AdaptOptions(method="tent", pseudo_flip=True)


def test_reliable_entropy_leaves_uncertain_images_out_of_the_entropy_loss() -> None:
    """--reliable-entropy 0.4 (EATA/SAR): an image whose entropy is above 0.4 ln(C) adds nothing to the loss
    and gets no gradient; with 0 every image counts; a share outside [0, 1] is refused."""
    from edgetl.adapt import AdaptOptions, mean_entropy

    logits = torch.tensor([[6.0, 0.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0]], requires_grad=True)  # confident, near-uniform
    probs = torch.softmax(logits, 1)
    per_image = -(probs * probs.log()).sum(1).detach()
    assert per_image[0] < 0.4 * np.log(4) < per_image[1]
    assert float(mean_entropy(probs).detach()) == pytest.approx(float(per_image.mean()))
    filtered = mean_entropy(probs, 0.4)
    assert float(filtered.detach()) == pytest.approx(float(per_image[0]))
    filtered.backward()
    assert logits.grad is not None and logits.grad[1].abs().max() == 0 and logits.grad[0].abs().max() > 0
    assert float(mean_entropy(probs.detach()[1:], 0.4)) == 0.0  # no reliable image: no entropy loss, not nan
    with pytest.raises(EdgetlError, match="--reliable-entropy"):
        AdaptOptions(reliable_entropy=1.5)


def test_int8_judge_takes_the_larger_of_the_validation_drop_and_the_expected_drop_on_target_images() -> None:
    from edgetl.int8_judge import JudgeSet
    from edgetl.parity import ParityData

    def data(n: int, labels: np.ndarray | None = None) -> ParityData:
        return ParityData(np.zeros((n, 4, 4, 3), np.uint8), np.zeros((n, 3, 4, 4), np.float32),
                          np.zeros(n, np.int64) if labels is None else labels, [str(i) for i in range(n)], "t")  # fmt: skip

    sure, tie = np.log([0.98, 0.01, 0.01]), np.log([0.5, 0.49, 0.01])  # fp32 logits: a confident prediction, a near tie
    val = data(4, np.array([0, 1, 2, 0]))
    onehot = np.eye(3)
    fp32_val, int8_val = onehot[[0, 1, 2, 1]], onehot[[0, 1, 2, 1]]  # 3 of 4 validation hits, the same in int8
    # Four target images: int8 changes the class of the confident one (costs 0.98 - 0.01) and of the tie (0.5 - 0.49).
    fp32 = np.concatenate([fp32_val, [sure, tie, sure, tie]])
    int8 = np.concatenate([int8_val, onehot[[1, 1, 0, 0]]])
    plain = JudgeSet(val).score(fp32[:4], int8[:4])
    assert plain["drop_points"] == plain["val_drop_points"] == 0.0 and "target_changed_points" not in plain
    both = JudgeSet(val, data(4)).score(fp32, int8)
    assert both["fp32_top1"] == both["top1"] == 0.75 and both["target_changed_points"] == 50.0
    assert both["target_expected_drop_points"] == pytest.approx(100 * (0.97 + 0.01) / 4) == both["drop_points"]
    worse_on_val = JudgeSet(val, data(4)).score(fp32, np.concatenate([onehot[[1, 1, 2, 1]], int8[4:]]))
    assert worse_on_val["val_drop_points"] == 25.0 == worse_on_val["drop_points"]


def test_openvino_accuracy_control_metric_is_one_minus_the_judged_drop_on_any_subset() -> None:
    from edgetl.int8_judge import JudgeSet
    from edgetl.parity import ParityData
    from edgetl.quantize import accuracy_control_items, accuracy_control_metric

    def data(x: np.ndarray, labels: np.ndarray) -> ParityData:
        return ParityData(np.zeros((len(x), 1, 1, 3), np.uint8), x, labels, [str(i) for i in range(len(x))], "t")

    eye = np.eye(3, dtype=np.float32)
    # "Models" are their input: row i of x is the logits. Validation: 3 images, labels 0, 1, 2; 2 target images.
    judge = JudgeSet(data(eye[[0, 1, 2]], np.array([0, 1, 2])), data(eye[[0, 1]] * 10, np.zeros(2, np.int64)))
    fp32_out = np.concatenate([eye[[0, 1, 2]], eye[[0, 1]] * 10])
    items = accuracy_control_items(judge, fp32_out, step=2)  # chunks of 2, the last of each set padded
    assert [(len(x), len(y), len(ref), t) for x, y, ref, t in items] == [(2, 2, 2, False), (2, 1, 1, False), (2, 2, 2, True)]
    metric = accuracy_control_metric(judge)
    assert metric(lambda x: [x], items) == 1.0  # the fp32 model itself
    swap = [1, 0, 2]  # a model that swaps classes 0 and 1 everywhere
    target_drop = judge.expected_target_drop(fp32_out[3:], fp32_out[3:, swap]) / 100  # two confident flips: ~1
    assert metric(lambda x: [x[:, swap]], items) == pytest.approx(1 - max(2 / 3, target_drop))
    assert metric(lambda x: [x[:, swap]], items[2:]) == pytest.approx(1 - target_drop)  # NNCF's subsets: target images only
    assert metric(lambda x: [x[:, swap]], items[:1]) == pytest.approx(0.0)  # validation images 0 and 1, both lost
    # A validation gain does not hide a target loss: the judged drop is the larger, not the sum.
    better_on_val = JudgeSet(data(eye[[0, 1, 2]], np.array([0, 1, 1])), judge.target)
    gain_items = accuracy_control_items(better_on_val, fp32_out, step=2)

    def fixes_val_breaks_target(x: np.ndarray) -> list[np.ndarray]:
        if x.max() > 5:  # the target images: classes 0 and 1 swapped
            return [x[:, swap]]
        y = x.copy()
        y[:, 1] += 2 * x[:, 2]  # validation image 2 (label 1) now right: 3 of 3 where fp32 has 2 of 3
        return [y]

    assert accuracy_control_metric(better_on_val)(fixes_val_breaks_target, gain_items[:2]) == pytest.approx(1 + 1 / 3)
    assert accuracy_control_metric(better_on_val)(fixes_val_breaks_target, gain_items) == pytest.approx(1 - target_drop)
