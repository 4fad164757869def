"""`edgetl tune` on the tiny backbone: probes as run folders, the candidate table, the pick within the
budget, the final full run, reuse of finished probes, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_folder
from typer.testing import CliRunner

from edgetl.cli.main import app
from edgetl.errors import EdgetlError
from edgetl.hostinfo import host_record
from edgetl.progress import Reporter
from edgetl.tune import Probe, TuneOptions, pick, reuse_refusal, tune

QUIET = Reporter(quiet=True)


def _opts(out: Path, **kw: object) -> TuneOptions:
    base = dict(max_latency_ms=1000.0, targets=("ort-cpu", "openvino-cpu"), backbones=("tiny",), sizes=(48, 64),
                precisions=("fp32", "int8"), out=str(out), pretrained=False, min_time=0.1)  # fmt: skip
    return TuneOptions(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    root = tmp_path_factory.mktemp("tune")
    data = make_folder(root / "data", per_class=10)
    report = tune(data, _opts(root / "tune"), QUIET)
    return report, data, root / "tune"


def test_pick_is_the_most_accurate_within_latency_and_size() -> None:
    rows = [
        {"p50_ms": 1.0, "mb": 5.0, "top1": 0.80}, {"p50_ms": 3.0, "mb": 5.0, "top1": 0.90},
        {"p50_ms": 2.0, "mb": 20.0, "top1": 0.95}, {"p50_ms": 9.0, "mb": 5.0, "top1": 0.99},
        {"p50_ms": 2.5, "mb": 5.0, "top1": 0.90},
    ]  # fmt: skip
    assert pick(rows, 5.0) == rows[2]  # size unlimited: 0.95 at 2 ms
    assert pick(rows, 5.0, max_size_mb=10.0) == rows[4]  # 0.90 twice: the faster one
    assert pick(rows, 1.5) == rows[0]
    assert pick(rows, 0.5) is None


def test_every_probe_is_a_run_folder_and_every_candidate_is_measured(tuned: tuple[dict, Path, Path]) -> None:
    report, _, folder = tuned
    assert [(p["backbone"], p["size"]) for p in report["probes"]] == [("tiny", 48), ("tiny", 64)]
    for p in report["probes"]:
        run = Path(p["run_dir"])
        assert json.loads((run / "manifest.json").read_text())["status"] == "finished"
        assert (run / "model.onnx").is_file() and (run / "model.int8.onnx").is_file() and (run / "openvino-int8" / "model.xml").is_file()
        assert json.loads((run / "metrics.json").read_text())["stages"].get("finetune") is None  # stage 1 only
    rows = report["candidates"]
    assert {(r["size"], r["target"], r["precision"]) for r in rows} == {
        (s, t, p) for s in (48, 64) for t in ("ort-cpu", "openvino-cpu") for p in ("fp32", "int8")
    }
    for r in rows:
        assert r["p50_ms"] > 0 and r["mb"] > 0 and 0.0 <= r["top1"] <= 1.0 and r["in_budget"]
    best = max(r["top1"] for r in rows)
    assert report["pick"]["top1"] == best
    saved = json.loads((folder / "tune.json").read_text())
    assert saved["pick"] == report["pick"] and (folder / "tune.png").stat().st_size > 10_000
    markdown = (folder / "tune.md").read_text()
    assert "**pick**" in markdown
    # The latencies are this machine's: the report names it, in the JSON and the table.
    assert saved["host"]["cpu_flags"] == host_record()["cpu_flags"] and saved["host"]["cpu_model"] in markdown


def test_the_pick_is_trained_in_full_and_exported(tuned: tuple[dict, Path, Path]) -> None:
    report, _, _ = tuned
    final = report["final"]
    run = Path(final["run_dir"])
    assert json.loads((run / "metrics.json").read_text())["stages"]["head"]["best_val_top1"] is not None
    want = "model.onnx" if report["pick"]["target"] == "ort-cpu" else "openvino/model.xml"
    assert (run / want).is_file() and final["p50_ms"] > 0 and 0.0 <= final["top1"] <= 1.0
    # Timed beside the probe it was picked from, in the same rounds, and judged against the budget again.
    assert final["probe_p50_ms_same_rounds"] > 0 and final["in_budget"] is (final["p50_ms"] <= report["options"]["max_latency_ms"])
    sources = {r["source"] for r in json.loads((run / "bench.json").read_text())["results"]}
    assert sources == {str(run), str(run.parent / "probes" / f"{report['pick']['backbone']}-{report['pick']['size']}")}


def test_a_second_tune_reuses_finished_probes_and_an_impossible_budget_is_one_clear_error(tuned: tuple[dict, Path, Path]) -> None:
    _, data, folder = tuned
    with pytest.raises(EdgetlError, match="no candidate fits the budget") as err:
        tune(data, _opts(folder, max_latency_ms=1e-6, final=False), QUIET)
    assert err.value.exit_code == 1
    saved = json.loads((folder / "tune.json").read_text())
    assert all(p["reused"] for p in saved["probes"]) and saved["pick"] is None
    assert all(not r["in_budget"] for r in saved["candidates"])


def test_dry_run_lists_candidates_and_estimates_without_running(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=3)
    report = tune(data, _opts(tmp_path / "tune", dry_run=True), QUIET)
    assert report["dry_run"] and [p["size"] for p in report["probes"]] == [48, 64]
    assert report["images"] == 9 and report["estimated_seconds"] > 0
    assert not (tmp_path / "tune").exists()


def test_cli_refuses_bad_options_in_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    for args, words in (
        (["--max-latency-ms", "5", "--sizes", "big"], "--sizes"),
        (["--max-latency-ms", "0"], "--max-latency-ms"),
        (["--max-latency-ms", "5", "--targets", "npu"], "unknown"),
        (["--max-latency-ms", "5", "--backbones", "resnet9000"], "unknown backbone"),
    ):
        res = runner.invoke(app, ["tune", str(tmp_path), *args])
        assert res.exit_code == 2, res.output
        assert words in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["tune", str(tmp_path / "missing"), "--max-latency-ms", "5"])
    assert res.exit_code == 2 and "no data" in res.output


def test_changed_data_makes_the_probes_again(tuned: tuple[dict, Path, Path], tmp_path: Path) -> None:
    import shutil

    _, data, folder = tuned
    changed = tmp_path / "data"
    shutil.copytree(data, changed)
    out = tmp_path / "tune"
    shutil.copytree(folder, out)
    make_folder(changed, per_class=11)  # one more image in every class: the recorded file lists no longer match
    # One target and precision (a subset of what the probe has): only the changed data can make it run again.
    report = tune(changed, _opts(out, sizes=(48,), targets=("ort-cpu",), precisions=("fp32",), final=False), QUIET)
    assert [p["reused"] for p in report["probes"]] == [False]
    assert json.loads((Path(report["probes"][0]["run_dir"]) / "splits.json").read_text())["root"] == str(changed.resolve())


def test_ctrl_c_keeps_finished_probes_and_says_how_to_go_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgetl.train

    data = make_folder(tmp_path / "data", per_class=6)
    real_train, calls = edgetl.train.train, []

    def train_then_interrupt(*args: object, **kw: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(edgetl.train, "train", train_then_interrupt)
    with pytest.raises(EdgetlError, match="1 finished probe") as err:
        tune(data, _opts(tmp_path / "tune", targets=("ort-cpu",), precisions=("fp32",)), QUIET)
    assert err.value.exit_code == 130
    probe = tmp_path / "tune" / "probes" / "tiny-48"
    assert (probe / "bench.json").is_file()
    # The finished probe serves a later fp32 tune, but not one that wants int8 candidates it never made.
    fp32_only = _opts(tmp_path / "tune", targets=("ort-cpu",), precisions=("fp32",))
    assert reuse_refusal(probe, data, Probe("tiny", 48), fp32_only) is None
    with_int8 = _opts(tmp_path / "tune", targets=("ort-cpu",), precisions=("fp32", "int8"))
    assert reuse_refusal(probe, data, Probe("tiny", 48), with_int8) == "made without int8 models"


def test_cli_dry_run_prints_the_probes_and_the_estimate(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=3)
    res = CliRunner().invoke(app, ["tune", str(data), "--max-latency-ms", "5", "--backbones", "tiny", "--sizes", "48,64",
                                   "--no-pretrained", "--dry-run", "--out", str(tmp_path / "t")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "tiny" in res.output and "48" in res.output and "64" in res.output and "estimated:" in res.output
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(("option", "value"), [("max_latency_ms", 0.0), ("max_latency_ms", float("nan")),
                                               ("max_latency_ms", float("inf")), ("max_size_mb", -1.0),
                                               ("max_size_mb", float("nan")), ("min_time", float("nan"))])  # fmt: skip
def test_budgets_out_of_range_are_user_errors(tmp_path: Path, option: str, value: float) -> None:
    with pytest.raises(EdgetlError, match="--" + option.replace("_", "-")):
        _opts(tmp_path, **{option: value})
