"""LiteRT (.tflite) and ExecuTorch (.pte) exports: parity in their own runtimes, metadata, int8 under the
budget, the torch-free runtime on a .tflite, bench targets, and the messages without the extras."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import one_node_onnx, run_with_imports_blocked
from typer.testing import CliRunner

from edgetl.backends.executorch import read_metadata as read_pte_metadata
from edgetl.backends.executorch import sidecar
from edgetl.backends.litert import LiteRtLoadError, LiteRtModel, metadata_of, read_metadata, schema, with_metadata
from edgetl.backends.onnxruntime import read_metadata as read_onnx_metadata
from edgetl.cli.main import app
from edgetl.errors import EdgetlError
from edgetl.export import PARITY_MAX_ABS_DIFF, PARITY_MIN_AGREEMENT, ExportOptions, export_run
from edgetl.formats import parse_formats
from edgetl.progress import Reporter
from edgetl.quantize import QuantizeOptions, quantize_run
from edgetl.runtime import Classifier

QUIET = Reporter(quiet=True)


def io_names(tflite: bytes) -> tuple[str, str]:
    """The names of the file's first input and output tensors, read from the graph itself (not the metadata)."""
    graph = schema().Model.GetRootAs(tflite, 0).Subgraphs(0)
    return graph.Tensors(graph.Inputs(0)).Name().decode(), graph.Tensors(graph.Outputs(0)).Name().decode()
# The file's own contract differs from the ONNX one only where the format does: LiteRT takes NHWC.
LITERT_OWN_KEYS = {"layout"}


@pytest.fixture(scope="module")
def edge_exports(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """A default-style ONNX export first, then LiteRT and ExecuTorch into the same folder without
    --force: LiteRT converts the ONNX file already there (it belongs to the current checkpoint)."""
    out = tmp_path_factory.mktemp("edge")
    first = export_run(tiny_run, ExportOptions(format="onnx", out=str(out)), QUIET)
    onnx_bytes = (out / "model.onnx").read_bytes()
    second = export_run(tiny_run, ExportOptions(format="litert,executorch", out=str(out)), QUIET)
    assert (out / "model.onnx").read_bytes() == onnx_bytes
    return out, first, second


@pytest.fixture(scope="module")
def edge_export(edge_exports: tuple[Path, dict, dict]) -> Path:
    return edge_exports[0]


def _child_cmdlines() -> list[list[str]]:
    """The command lines of this process's live children (a finished child not yet waited for has none).
    Direct children only: the real Lite0 build (conftest) may be converting to LiteRT in a child of its own."""
    import psutil

    lines = []
    for p in psutil.Process().children():
        try:
            lines.append(p.cmdline())
        except psutil.Error:  # a zombie or gone
            continue
    return lines


def _converting() -> bool:
    """Whether a LiteRT conversion child of this process is running."""
    return any("edgetl.litert_convert" in cmd for cmd in _child_cmdlines())


@pytest.fixture(scope="module")
def edge_int8(edge_export: Path) -> dict:
    """ONNX Runtime, LiteRT and ExecuTorch int8 from one calibration sample (a generous budget: the
    mechanics are under test here; the budget itself in test_int8_over_budget_...). Records, for
    test_litert_int8_converts_beside_the_others_and_no_timing_shares_the_cores, whether the LiteRT
    child was running while ExecuTorch quantized and while each latency was timed."""
    from edgetl import executorch_export, litert_convert, quantize

    seen: dict[str, list] = {"lowering": [], "timing": [], "events": []}
    real_lower, real_time, real_wait = executorch_export.lower_int8, quantize.time_pair, litert_convert.Conversion.wait
    real_start = quantize.start_litert

    def lower(*args: object, **kw: object) -> object:
        seen["lowering"].append(list(seen["events"]))
        return real_lower(*args, **kw)

    def wait(self: litert_convert.Conversion) -> dict:
        seen["events"].append("waited")
        return real_wait(self)

    def time_pair(*args: object, **kw: object) -> object:
        seen["timing"].append(_converting())
        return real_time(*args, **kw)

    opts = QuantizeOptions(format="onnx,litert,executorch", calib_size=24, max_drop=100.0, latency_runs=12)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(executorch_export, "lower_int8", lower)
        mp.setattr(quantize, "time_pair", time_pair)
        mp.setattr(litert_convert.Conversion, "wait", wait)
        mp.setattr(quantize, "start_litert", lambda *a: seen["events"].append("started") or real_start(*a))
        report = quantize_run(edge_export, opts, QUIET)
    return {**report, "seen": seen}


def test_litert_int8_converts_beside_the_others_and_no_timing_shares_the_cores(edge_int8: dict) -> None:
    assert edge_int8["seen"]["lowering"] == [["started"]], "the LiteRT child is started, not yet waited for, while ExecuTorch quantizes"
    assert edge_int8["seen"]["timing"] == [False, False, False], "one timing per format, none beside the conversion"


def _parity_passes(report: dict, key: str) -> None:
    p = report["parity"][key]
    assert p["gate"] == "pass", p
    assert p["top1_agreement"] >= PARITY_MIN_AGREEMENT and p["max_abs_diff"] <= PARITY_MAX_ABS_DIFF, p


def test_format_names() -> None:
    assert parse_formats("all") == ("onnx", "openvino")
    assert parse_formats("executorch, litert,all") == ("onnx", "openvino", "litert", "executorch")
    with pytest.raises(EdgetlError, match="unknown format 'tflite'"):
        parse_formats("onnx,tflite")


def test_tiny_export_in_both_formats_passes_parity_and_carries_the_metadata(edge_exports: tuple[Path, dict, dict]) -> None:
    edge_export, first, report = edge_exports
    _parity_passes(first, "onnx")
    for key in ("litert", "executorch"):
        _parity_passes(report, key)
    assert report["reused"] == {"onnx": str(edge_export / "model.onnx")} and "onnx" not in report["files"]
    assert report["files"]["executorch"]["delegation"]["xnnpack_subgraphs"] >= 1
    onnx_meta = read_onnx_metadata(edge_export / "model.onnx")
    tflite_meta = read_metadata(edge_export / "model.tflite")
    assert tflite_meta["layout"] == "NHWC" and onnx_meta["layout"] == "NCHW"
    assert {k: v for k, v in tflite_meta.items() if k not in LITERT_OWN_KEYS} == {
        k: v for k, v in onnx_meta.items() if k not in LITERT_OWN_KEYS
    }
    # The file's own tensors carry the ONNX names (the converter calls them input/Identity), as the metadata says.
    assert io_names((edge_export / "model.tflite").read_bytes()) == ("input", "logits")
    assert (tflite_meta["input_name"], tflite_meta["output_name"]) == ("input", "logits")
    assert LiteRtModel(edge_export / "model.tflite", threads=1).input_name == "input"
    assert read_pte_metadata(edge_export / "model.pte") == onnx_meta
    assert json.loads(tflite_meta["labels"]) == (edge_export / "labels.txt").read_text().split()


@pytest.mark.slow
def test_lite0_exports_in_both_formats_pass_parity_on_real_images(real_export_report: tuple[Path, dict]) -> None:
    """Lite0 (the real operator mix: depthwise convolutions, ReLU6, folded 'same' padding) converted by
    onnx2tf and lowered to XNNPACK, each checked against PyTorch on the bundled sample's photos."""
    out, report = real_export_report
    assert report["parity"]["pytorch"]["n"] == 100
    for key in ("litert", "executorch"):
        _parity_passes(report, key)
    assert {"model.tflite", "model.pte"} <= {p.name for p in out.iterdir()}
    assert read_metadata(out / "model.tflite")["backbone"] == read_pte_metadata(out / "model.pte")["backbone"] == "efficientnet_lite0"


def test_a_tensor_name_already_taken_is_not_given_twice(edge_export: Path) -> None:
    blob = (edge_export / "model.tflite").read_bytes()
    graph = schema().Model.GetRootAs(blob, 0).Subgraphs(0)
    inner = next(graph.Tensors(i).Name().decode() for i in range(graph.TensorsLength()) if i not in (graph.Inputs(0), graph.Outputs(0)))
    renamed = with_metadata(blob, {**read_metadata(edge_export / "model.tflite"), "input_name": "pixels", "output_name": inner})
    assert io_names(renamed) == ("pixels", "logits")  # the free name is taken, the taken one is not
    meta = metadata_of(renamed, "renamed")
    assert (meta["input_name"], meta["output_name"]) == ("pixels", "logits")
    # The schema lets a tensor have no name at all (a file from another converter): still renamed, no TypeError.
    import flatbuffers

    model = schema().ModelT.InitFromPackedBuf(bytearray(blob), 0)
    model.subgraphs[0].tensors[model.subgraphs[0].inputs[0]].name = None
    builder = flatbuffers.Builder(len(blob) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    assert io_names(with_metadata(bytes(builder.Output()), {"input_name": "input", "output_name": "logits"})) == ("input", "logits")


def test_int8_in_both_formats_shares_the_calibration_and_runs_in_int8(edge_export: Path, edge_int8: dict) -> None:
    results = edge_int8["results"]
    assert set(results) == {"onnxruntime", "litert", "executorch"}
    calib = {k: v for k, v in edge_int8["calibration"].items() if k != "files"}
    for name, path in (("litert", "model.int8.tflite"), ("executorch", "model.int8.pte")):
        r = results[name]
        assert Path(r["file"]) == edge_export / path and r["int8_bytes"] < r["fp32_bytes"]
        assert r["executed"]["int8_compute_ops"] == r["executed"]["compute_ops"] > 0
        assert r["latency"]["int8"]["median_ms"] > 0
    q_tflite = json.loads(read_metadata(edge_export / "model.int8.tflite")["quantization"])
    q_pte = json.loads(read_pte_metadata(edge_export / "model.int8.pte")["quantization"])
    q_onnx = json.loads(read_onnx_metadata(edge_export / "model.int8.onnx")["quantization"])
    assert q_tflite["calibration"] == q_pte["calibration"] == q_onnx["calibration"] == calib
    assert q_tflite["backend"] == "litert-tfliteconverter" and q_pte["backend"] == "executorch-pt2e-xnnpack"
    # The same tensor names as fp32 (TFLiteConverter calls them serving_default_input:0 / PartitionedCall:0).
    int8_meta = read_metadata(edge_export / "model.int8.tflite")
    int8_names = io_names((edge_export / "model.int8.tflite").read_bytes())
    assert int8_names == (int8_meta["input_name"], int8_meta["output_name"]) == ("input", "logits")
    # The int8 .tflite is full-integer: every compute op takes int8, the float input is quantized once.
    ops = results["litert"]["executed"]["ops"]
    assert ops.get("QUANTIZE") == 1 and ops.get("DEQUANTIZE") == 1


def test_classifier_on_a_tflite_without_torch_agrees_with_the_onnx_model(edge_export: Path, tiny_run: Path) -> None:
    root = Path(json.loads((tiny_run / "manifest.json").read_text())["dataset"]["root"])
    images = sorted(str(p) for p in root.rglob("*.png"))[:12]
    blocked = ("torch", "torchvision", "timm", "tensorflow", "onnx", "onnxruntime", "openvino", "executorch", "typer", "rich")
    proc = run_with_imports_blocked(blocked, f"""
import json
from edgetl.runtime import Classifier
clf = Classifier({str(edge_export / "model.tflite")!r}, threads=1)
print(json.dumps([p.label for p in clf.predict({images!r})]))
""")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "XNNPACK delegate" not in proc.stderr  # LiteRT's C++ note on making its default delegate (edgetl.native_stderr)
    labels = json.loads(proc.stdout.strip().splitlines()[-1])
    assert labels == [p.label for p in Classifier(edge_export / "model.onnx").predict(images)]  # type: ignore[union-attr]


def test_running_a_program_prints_no_native_noise_and_keeps_other_lines(edge_export: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """ExecuTorch's thread pool probes the CPU from C++ when it starts and, on a host that is not ARM, prints five
    lines ("Failed to open midr file ...") into every `edgetl export/bench/predict` of a .pte: they are dropped,
    while anything else native code prints in that block still reaches the user."""
    proc = subprocess.run([sys.executable, "-c", f"""
import numpy as np
from edgetl.backends.executorch import ExecuTorchModel
model = ExecuTorchModel({str(edge_export / "model.pte")!r}, threads=1)
print(model(np.zeros((1, *model.input_shape[1:]), dtype=np.float32)).shape)
"""], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cpuinfo_utils" not in proc.stderr and proc.stdout.strip().endswith("3)")
    from edgetl.native_stderr import dropping_native_lines

    with dropping_native_lines("[cpuinfo_utils.cpp:"):
        os.write(2, b"[cpuinfo_utils.cpp:87] Failed to open midr file\nE0000 a real error from C++\n")
    err = capfd.readouterr().err
    assert "a real error from C++" in err and "midr" not in err


def test_predict_cli_on_a_tflite(edge_export: Path, tiny_run: Path) -> None:
    root = Path(json.loads((tiny_run / "manifest.json").read_text())["dataset"]["root"])
    rows = {}
    for name in ("model.tflite", "model.onnx"):
        result = CliRunner().invoke(app, ["predict", str(edge_export / name), str(root / "red"), "--json"])
        assert result.exit_code == 0, result.output
        rows[name] = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert len(rows["model.tflite"]) == len(list((root / "red").iterdir())) > 0
    assert [r["label"] for r in rows["model.tflite"]] == [r["label"] for r in rows["model.onnx"]]
    for a, b in zip(rows["model.tflite"], rows["model.onnx"], strict=True):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)


def test_tflite_metadata_round_trip_and_bad_files(edge_export: Path, tmp_path: Path) -> None:
    blob = (edge_export / "model.tflite").read_bytes()
    path = tmp_path / "m.tflite"
    path.write_bytes(with_metadata(blob, {"labels": '["a"]', "checkpoint_sha256": "x"}))
    # The tensor names are always recorded: the file's real ones.
    assert read_metadata(path) == {"labels": '["a"]', "checkpoint_sha256": "x", "input_name": "input", "output_name": "logits"}
    # The weights are untouched: the same logits as the original file.
    size = int(read_metadata(edge_export / "model.tflite")["input_size"])
    x = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)
    np.testing.assert_array_equal(LiteRtModel(path, 1)(x), LiteRtModel(edge_export / "model.tflite", 1)(x))
    fake = tmp_path / "fake.tflite"
    fake.write_text("not a model")
    with pytest.raises(LiteRtLoadError, match="not a LiteRT"):
        read_metadata(fake)
    with pytest.raises(ValueError, match="not a LiteRT"):
        Classifier(fake)
    result = CliRunner().invoke(app, ["predict", str(fake), str(tmp_path)])
    assert result.exit_code == 2 and "not a LiteRT" in result.output
    # A file cut short (a copy that did not finish) is one clear error too, not a flatbuffer traceback.
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(blob[: len(blob) // 2])
    result = CliRunner().invoke(app, ["predict", str(cut), str(tmp_path)])
    assert result.exit_code == 2 and "truncated or corrupt" in result.output and "Traceback" not in result.output


def test_bench_has_litert_and_executorch_rows(edge_export: Path, edge_int8: dict, tmp_path: Path) -> None:
    from edgetl.bench.runner import BenchOptions, bench

    opts = BenchOptions(targets=("ort-cpu", "litert-cpu", "executorch-cpu"), batches=(1,), min_time=0.1, warmup=2, out=str(tmp_path),
                        threads=1)  # fmt: skip
    report = bench([edge_export], opts, QUIET)
    rows = {r["variant"]: r for r in report["results"]}
    for name in ("litert-cpu/fp32", "litert-cpu/int8", "executorch-cpu/fp32", "executorch-cpu/int8"):
        assert name in rows, list(rows)
        assert rows[name]["latency"]["p50_ms"] > 0 and rows[name]["accuracy"]["n"] > 0
    # fp32 files agree with the fp32 ONNX model on every validation image.
    assert rows["litert-cpu/fp32"]["accuracy"]["top1_agreement"] == 1.0
    assert rows["executorch-cpu/fp32"]["accuracy"]["top1_agreement"] == 1.0
    assert (tmp_path / "bench.md").read_text().count("litert-cpu") >= 2


def test_int8_over_budget_leaves_no_int8_file(edge_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The candidate scores 30 points under its fp32 model: the budget refuses it and nothing is written."""
    import shutil

    folder = tmp_path / "exp"
    shutil.copytree(edge_export, folder)
    for name in ("model.int8.tflite", "model.int8.pte", "model.int8.pte.json"):
        (folder / name).unlink(missing_ok=True)
    from edgetl.int8_judge import JudgeSet

    real_score = JudgeSet.score

    def worse_int8(self: JudgeSet, fp32_logits: np.ndarray, int8_logits: np.ndarray) -> dict:
        judged = real_score(self, fp32_logits, int8_logits)  # the candidate is always the second argument
        return {**judged, "top1": judged["top1"] - 0.3, "val_drop_points": judged["val_drop_points"] + 30,
                "drop_points": judged["drop_points"] + 30}  # fmt: skip

    monkeypatch.setattr(JudgeSet, "score", worse_int8)
    # The refusal is under test, not PT2E lowering (edge_int8 covers that, ~12 s): the fp32 program stands in.
    fp32_program = (folder / "model.pte").read_bytes()
    monkeypatch.setattr("edgetl.executorch_export.lower_int8", lambda *a, **kw: (fp32_program, {}))
    for fmt, name in (("litert", "model.int8.tflite"), ("executorch", "model.int8.pte")):
        with pytest.raises(EdgetlError, match=r"cannot meet --max-drop 1\.0") as err:
            quantize_run(folder, QuantizeOptions(format=fmt, calib_size=8, max_drop=1.0, latency_runs=6), QUIET)
        assert err.value.exit_code == 1
        assert not (folder / name).exists() and not sidecar(folder / name).exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_without_the_extras_the_message_names_them(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    missing = {"onnx2tf", "executorch"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real_find_spec(name, *a))
    for fmt, extra in (("litert", "edgetl[litert]"), ("executorch", "edgetl[executorch]")):
        out = tmp_path / fmt
        result = CliRunner().invoke(app, ["export", str(tiny_run), "--format", fmt, "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert extra in result.output and "Traceback" not in result.output
        assert not out.exists() or not [p for p in out.iterdir() if p.suffix in (".onnx", ".tflite", ".pte")]


def test_litert_conversion_names_the_operator_it_lacks(tmp_path: Path) -> None:
    """A graph with an operator onnx2tf has no converter for: the error names it, in one line."""
    from edgetl.litert_convert import start_conversion

    model = one_node_onnx(tmp_path / "model.onnx", "EdgetlMadeUpOp", domain="ai.edgetl.test")
    missing = "no converter for the ONNX operator 'EdgetlMadeUpOp'"
    with start_conversion(model, tmp_path / "work") as conversion, pytest.raises(EdgetlError, match=missing):
        conversion.wait()


def test_the_litert_conversion_calls_no_download_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # onnx2tf shells out to curl (and wget) for what it downloads; stand-ins on the PATH record any call.
    from edgetl.litert_convert import start_conversion

    fake_bin, calls = tmp_path / "bin", tmp_path / "downloads.log"
    fake_bin.mkdir()
    for tool in ("curl", "wget"):
        (fake_bin / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\nexit 1\n')
        (fake_bin / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    with start_conversion(one_node_onnx(tmp_path / "model.onnx"), tmp_path / "work") as conversion:
        assert all(f.stat().st_size > 0 for f in conversion.wait().values())
    assert not calls.exists(), calls.read_text()


def test_a_file_failing_parity_is_moved_aside(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LiteRT and ExecuTorch files whose logits drift past 1e-3 fail the export (exit 1) and are moved
    aside with their sidecar, so nothing later takes them for good models."""
    from edgetl import export as export_module

    real_runner = export_module.parity_runner

    class Drifting:
        def __init__(self, runner: object) -> None:
            self.runner, self.precision = runner, "fp32"

        def predict(self, x: np.ndarray) -> np.ndarray:
            return self.runner.predict(x) + 0.01  # type: ignore[attr-defined]

    def drifting_edge_runner(path: Path, threads: int | None = None) -> object:
        runner = real_runner(path, threads)
        return Drifting(runner) if path.suffix in (".tflite", ".pte") else runner

    monkeypatch.setattr(export_module, "parity_runner", drifting_edge_runner)
    with pytest.raises(EdgetlError, match="parity check failed for litert") as err:
        export_run(tiny_run, ExportOptions(format="litert,executorch", out=str(tmp_path)), QUIET)
    assert err.value.exit_code == 1
    names = {p.name for p in tmp_path.iterdir()}
    assert {"model.failed.tflite", "model.failed.pte", "model.failed.pte.json", "model.onnx"} <= names
    assert not names & {"model.tflite", "model.pte", "model.pte.json"}
    report = json.loads((tmp_path / "export.json").read_text())
    assert report["parity"]["litert"]["gate"] == report["parity"]["executorch"]["gate"] == "fail"
    assert report["parity"]["onnx"]["gate"] == "pass"


def test_litert_converts_beside_the_other_formats_and_never_outlives_a_failed_export(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TensorFlow child is already converting while ExecuTorch lowers in this process; when that
    lowering fails, the export fails in one line, the child is stopped and its work folder goes."""
    from edgetl import executorch_export

    seen: list[list[str]] = []

    def lowering_that_fails(model: object, input_size: int) -> tuple[bytes, dict]:
        seen.extend(_child_cmdlines())
        raise EdgetlError("lowering failed on purpose")

    monkeypatch.setattr(executorch_export, "lower_fp32", lowering_that_fails)
    with pytest.raises(EdgetlError, match="on purpose"):
        export_run(tiny_run, ExportOptions(format="litert,executorch", out=str(tmp_path)), QUIET)
    assert any("edgetl.litert_convert" in cmd for cmd in seen), seen
    assert not _converting(), _child_cmdlines()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp") or p.suffix in (".tflite", ".pte")]
