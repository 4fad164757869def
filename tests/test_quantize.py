"""int8 for ONNX Runtime and OpenVINO on the tiny backbone: files, metadata, budget, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgetl import metadata
from edgetl import quantize as q
from edgetl.backends.openvino import read_metadata
from edgetl.errors import EdgetlError
from edgetl.export import ExportOptions, export_run
from edgetl.metadata import read_onnx_metadata
from edgetl.progress import Reporter
from edgetl.quantize import QuantizeOptions, quantize_run

QUIET = Reporter(quiet=True)


@pytest.fixture(scope="module")
def exported_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("q") / "run"
    shutil.copytree(tiny_run, run)
    export_run(run, ExportOptions(), QUIET)
    return run


@pytest.fixture(scope="module")
def quantized(exported_run: Path) -> dict:
    return quantize_run(exported_run, QuantizeOptions(calib_size=20, latency_runs=30, max_drop=100.0), QUIET)


def test_both_runtimes_get_int8_models(quantized: dict, exported_run: Path) -> None:
    assert set(quantized["results"]) == {"onnxruntime", "openvino"}
    ops = {n.op_type for n in onnx.load(str(exported_run / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    import openvino as ov

    ov_ops = {o.get_type_name() for o in ov.Core().read_model(str(exported_run / "openvino-int8" / "model.xml")).get_ops()}
    assert "FakeQuantize" in ov_ops
    for r in quantized["results"].values():
        assert 0 <= r["drop_points"] <= 100 and r["latency"]["int8"]["median_ms"] > 0
        assert r["size_ratio"] < 1.0
    saved = json.loads((exported_run / "quantize.json").read_text())
    assert saved["calibration"]["n"] == 20 and len(saved["calibration"]["files"]) == 20


def test_the_runtimes_really_execute_int8(quantized: dict, exported_run: Path) -> None:
    # What the runtimes run after their own optimisation, not what the file says.
    from edgetl.executed_ops import openvino_executed_layers, ort_executed_ops

    ort_ex, ov_ex = quantized["results"]["onnxruntime"]["executed"], quantized["results"]["openvino"]["executed"]
    assert ort_ex["compute_ops"] > 0 and ort_ex["int8_compute_ops"] == ort_ex["compute_ops"], ort_ex["ops"]
    # NNCF leaves the squeeze-excitation 1x1 convolutions (on pooled 1x1 maps) in float; everything else is int8.
    float_kernels = [k for k in ov_ex["kernels"] if k.endswith("f32")]
    assert ov_ex["int8_compute_ops"] > ov_ex["compute_ops"] / 2 and all("1x1" in k for k in float_kernels), ov_ex["kernels"]
    fp32_ort, fp32_ov = ort_executed_ops(exported_run / "model.onnx"), openvino_executed_layers(exported_run / "openvino" / "model.xml")
    int8 = {name: r["executed"]["compute_ops"] for name, r in quantized["results"].items()}
    assert fp32_ort["int8_compute_ops"] == 0 and fp32_ort["float_compute_ops"] == int8["onnxruntime"]
    assert fp32_ov["int8_compute_ops"] == 0 and fp32_ov["compute_ops"] == int8["openvino"]


def test_slow_int8_reason_names_float_fallbacks_first() -> None:
    mixed = q.slow_int8_reason({"compute_ops": 10, "int8_compute_ops": 7, "float_compute_ops": 3})
    assert "3 of 10 compute ops still run in float" in mixed
    all_int8 = q.slow_int8_reason({"compute_ops": 10, "int8_compute_ops": 10, "float_compute_ops": 0})
    assert ("no VNNI" in all_int8) == (not q.has_vnni())


def test_one_image_in_a_hundred_is_exactly_one_point_of_drop() -> None:
    # 84% - 83% in floating point is 1.0000000000000142 points: a --max-drop 1 budget must not refuse it.
    from edgetl.int8_judge import JudgeSet
    from edgetl.parity import ParityData

    labels = np.zeros(100, np.int64)
    judge = JudgeSet(ParityData(np.zeros((100, 1, 1, 3), np.uint8), np.zeros((100, 3, 1, 1), np.float32), labels, ["x"] * 100, "test"))
    fp32, int8 = np.zeros((100, 2), np.float32), np.zeros((100, 2), np.float32)
    fp32[84:, 1] = 1.0  # 84 right
    int8[83:, 1] = 1.0  # 83 right
    judged = judge.score(fp32, int8)
    assert (judged["fp32_top1"], judged["top1"]) == (0.84, 0.83)
    assert judged["drop_points"] == 1.0


def test_metadata_is_kept_and_the_quantization_recorded(quantized: dict, exported_run: Path) -> None:
    fp32 = read_onnx_metadata(str(exported_run / "model.onnx"))
    int8 = read_onnx_metadata(str(exported_run / "model.int8.onnx"))
    assert {k: int8[k] for k in metadata.KEYS} == fp32
    rec = json.loads(int8["quantization"])
    assert rec["backend"] == "onnxruntime" and rec["parent"] == "model.onnx" and len(rec["parent_sha256"]) == 64
    assert rec["method"] == "minmax" and rec["calibration"]["n"] == 20
    # The portable default: 7-bit weights whatever CPU quantized it, so it cannot saturate on AVX2-only CPUs.
    assert rec["int8_target"] == "portable" and rec["types"]["reduce_range"] is True
    ov_meta = read_metadata(exported_run / "openvino-int8" / "model.xml")
    assert json.loads(ov_meta["quantization"])["backend"] == "openvino-nncf"
    assert ov_meta["labels"] == fp32["labels"]


def test_impossible_budget_fails_clearly_and_leaves_no_int8_file(exported_run: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    run = tmp_path / "run"
    shutil.copytree(exported_run, run, ignore=shutil.ignore_patterns("*int8*", "quantize.json"))
    # Make every int8 candidate look 50 points worse than fp32, whatever nodes stay in float.
    real_predict = q.OrtModel.predict

    def worse(self: q.OrtModel, x: np.ndarray, batch: int = 32) -> np.ndarray:
        out = real_predict(self, x, batch)
        if "int8" in Path(self.path).name:
            out = -out
        return out

    monkeypatch.setattr(q.OrtModel, "predict", worse)
    with pytest.raises(EdgetlError, match="cannot meet --max-drop") as info:
        quantize_run(run, QuantizeOptions(format="onnx", calib_size=10, max_drop=0.0), QUIET)
    assert info.value.exit_code != 0
    assert not (run / "model.int8.onnx").exists()
    assert not list(run.glob(".quantize-*")), "the work folder must be cleaned up"


def test_too_small_calibration_split_warns(exported_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(exported_run, run, ignore=shutil.ignore_patterns("*int8*", "quantize.json"))
    logs: list[str] = []
    rep = Reporter()
    rep.log = logs.append  # type: ignore[method-assign]
    report = quantize_run(run, QuantizeOptions(format="onnx", calib_size=10_000, latency_runs=10, max_drop=100), rep)
    assert any("fewer than --calib-size" in m for m in logs)
    assert report["calibration"]["warning"] and report["calibration"]["n"] == 30


def test_model_without_the_expected_input_is_refused(exported_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(exported_run, run, ignore=shutil.ignore_patterns("*int8*", "quantize.json"))
    meta = read_onnx_metadata(str(run / "model.onnx"))
    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 10])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["features"], ["logits"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=9)  # fmt: skip
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(run / "model.onnx"))
    with pytest.raises(EdgetlError, match=r"metadata names input 'input', the graph's is 'features'"):
        quantize_run(run, QuantizeOptions(format="onnx"), QUIET)


def test_not_onnx_and_no_export(tmp_path: Path, tiny_run: Path) -> None:
    with pytest.raises(EdgetlError, match="neither an edgetl run folder nor an export folder"):
        quantize_run(tmp_path, QuantizeOptions(), QUIET)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with pytest.raises(EdgetlError, match="no exported model"):
        quantize_run(run, QuantizeOptions(), QUIET)
    (run / "model.onnx").write_text("hello")
    with pytest.raises(EdgetlError, match="not an ONNX model"):
        quantize_run(run, QuantizeOptions(), QUIET)


def test_budget_keeps_the_worst_node_in_float_until_met(exported_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The keep-in-float loop itself: the fully quantized candidate misses the budget, the next one
    (the node with the worst SQNR kept in float) meets it, and that is the model written."""
    run = tmp_path / "run"
    shutil.copytree(exported_run, run, ignore=shutil.ignore_patterns("*int8*", "quantize.json"))
    real_predict = q.OrtModel.predict

    def first_candidate_is_bad(self: q.OrtModel, x: np.ndarray, batch: int = 32) -> np.ndarray:
        out = real_predict(self, x, batch)
        return -out if Path(self.path).name == "int8-0.onnx" else out

    monkeypatch.setattr(q.OrtModel, "predict", first_candidate_is_bad)
    report = quantize_run(run, QuantizeOptions(format="onnx", calib_size=10, max_drop=0.0, latency_runs=6), QUIET)
    res = report["results"]["onnxruntime"]
    assert [len(a["kept_in_float"]) for a in res["attempts"]] == [0, 1]
    assert res["attempts"][0]["drop_points"] > 0 >= res["attempts"][1]["drop_points"] - 1e-9
    kept = res["kept_in_float"]
    assert kept == [res["worst_tensors"][0]["node"]]
    rec = json.loads(read_onnx_metadata(str(run / "model.int8.onnx"))["quantization"])
    assert rec["kept_in_float"] == kept


def test_budget_tries_the_earliest_convolutions_when_the_worst_activations_do_not_help(
    exported_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(exported_run, run, ignore=shutil.ignore_patterns("*int8*", "quantize.json"))
    real_predict = q.OrtModel.predict

    def two_bad_candidates(self: q.OrtModel, x: np.ndarray, batch: int = 32) -> np.ndarray:
        out = real_predict(self, x, batch)
        return -out if Path(self.path).name in ("int8-0.onnx", "int8-1.onnx") else out

    monkeypatch.setattr(q.OrtModel, "predict", two_bad_candidates)
    report = quantize_run(run, QuantizeOptions(format="onnx", calib_size=10, max_drop=0.0, latency_runs=6), QUIET)
    res = report["results"]["onnxruntime"]
    assert [a["chosen_by"] for a in res["attempts"]] == ["-", "worst SQNR", "earliest"]
    first_conv = q.compute_nodes_in_order(run / "model.onnx")[0]
    assert res["kept_in_float"] == [first_conv] != res["attempts"][1]["kept_in_float"]


def test_fallback_plan_alternates_orders_doubles_and_skips_repeats() -> None:
    plan = list(q.fallback_plan(["c", "a", "x"], ["a", "b", "c", "d", "e"]))
    assert plan == [("worst SQNR", ["c"]), ("earliest", ["a"]), ("worst SQNR", ["c", "a"]), ("earliest", ["a", "b"]),
                    ("earliest", ["a", "b", "c", "d"])]  # fmt: skip
    assert list(q.fallback_plan(["a", "b"], ["b", "a"])) == [("worst SQNR", ["a"]), ("earliest", ["b"]), ("worst SQNR", ["a", "b"])]


def test_vnni_target_uses_full_range_weights(exported_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(exported_run, run, ignore=shutil.ignore_patterns("*int8*", "quantize.json"))
    report = quantize_run(run, QuantizeOptions(calib_size=10, max_drop=100, latency_runs=6, int8_target="vnni"), QUIET)
    rec = json.loads(read_onnx_metadata(str(run / "model.int8.onnx"))["quantization"])
    assert rec["int8_target"] == "vnni" and rec["types"]["reduce_range"] is False
    ov = json.loads(read_metadata(run / "openvino-int8" / "model.xml")["quantization"])
    assert ov["int8_target"] == "vnni" and ov["overflow_fix"] == "disable"
    assert report["int8_target"] == "vnni"
    with pytest.raises(EdgetlError, match="--int8-target"):
        QuantizeOptions(int8_target="avx2")


def test_bad_options() -> None:
    with pytest.raises(EdgetlError, match="--calib-method"):
        QuantizeOptions(calib_method="kl")
    for bad in (-1.0, float("nan"), float("inf")):  # NaN compared false with every drop: it ran everything, then failed
        with pytest.raises(EdgetlError, match="--max-drop is a number of top-1 points, 0 or more"):
            QuantizeOptions(max_drop=bad)


def test_quantize_never_imports_torch() -> None:
    """quantize works on exported files only; importing it must not pull in the training stack."""
    import subprocess
    import sys

    code = "import sys, edgetl.quantize; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_quantize_json_keeps_the_records_of_formats_not_redone(tmp_path: Path) -> None:
    """`quantize --format litert` after `export --quantize int8`: the ONNX Runtime record stays in
    quantize.json (its file is still there, same checkpoint); a record of another checkpoint or of a
    removed file does not."""
    from edgetl.quantize import _earlier_results

    (tmp_path / "model.int8.onnx").write_bytes(b"x")
    old = {"checkpoint_sha256": "abc", "calibration": {"files_sha256": "f00"},
           "results": {"onnxruntime": {"file": str(tmp_path / "model.int8.onnx"), "drop_points": 0.3},
                       "openvino": {"file": str(tmp_path / "openvino-int8" / "model.xml"), "drop_points": 0.1},
                       "litert": {"file": str(tmp_path / "model.int8.tflite"), "drop_points": 0.2}}}  # fmt: skip
    (tmp_path / "quantize.json").write_text(json.dumps(old))
    kept = _earlier_results(tmp_path, "abc", {"litert"})
    assert set(kept) == {"onnxruntime"} and kept["onnxruntime"]["drop_points"] == 0.3
    assert kept["onnxruntime"]["calibration_files_sha256"] == "f00"
    assert _earlier_results(tmp_path, "other checkpoint", {"litert"}) == {}


def test_fixed_batch_openvino_model_is_calibrated_and_judged_in_its_batch(tiny_run: Path, tmp_path: Path) -> None:
    # An IR exported with --batch 4 takes exactly 4 rows: NNCF's calibration items, the accuracy-control
    # validation and the top-1 judge all feed it padded chunks of 4 (batch-1 items and batches of 32 crashed
    # inside the CPU plugin). A zero budget on random weights forces the accuracy-control path too.
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    export_run(run, ExportOptions(format="openvino", batch="4"), QUIET)
    try:
        res = quantize_run(run, QuantizeOptions(format="openvino", calib_size=10, latency_runs=5, max_drop=0.0), QUIET)
        assert res["results"]["openvino"]["drop_points"] <= 0.0
        assert (run / "openvino-int8" / "model.xml").is_file()
    except EdgetlError as exc:  # the budget may be out of reach; the message says so, not a plugin shape error
        assert "cannot meet --max-drop" in str(exc)
    chunks = q._padded_chunks(np.arange(10, dtype=np.float32).reshape(10, 1), 4)
    assert [c.shape for c in chunks] == [(4, 1)] * 3 and chunks[-1][2:].sum() == 0
