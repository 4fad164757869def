"""ONNX and OpenVINO export: parity with PyTorch on real images, metadata, the uint8 variant, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgetl import export as export_mod
from edgetl import metadata
from edgetl.backbones import list_backbones
from edgetl.backends.onnxruntime import OrtModel
from edgetl.backends.openvino import OpenVinoModel, read_metadata
from edgetl.errors import EdgetlError
from edgetl.export import ExportOptions, _export_onnx, export_run
from edgetl.metadata import read_onnx_metadata
from edgetl.model import build_classifier
from edgetl.progress import Reporter

QUIET = Reporter(quiet=True)

# One backbone per operator family; every registered entry must belong to a tested family.
FAMILY = {
    "tiny": "tiny", "efficientnet_lite0": "lite", "efficientnet_lite1": "lite", "efficientnet_lite2": "lite",
    "mobilenetv2_100": "mobilenetv2", "mobilenetv3_large_100": "mobilenetv3", "mobilenetv3_small_100": "mobilenetv3",
    "efficientnet_b0": "efficientnet",
}  # fmt: skip
REPRESENTATIVES = ["tiny", "mobilenetv2_100", "mobilenetv3_small_100", "efficientnet_b0"]  # lite: exported below from a real run


def test_every_backbone_has_an_exported_family() -> None:
    assert {e.name for e in list_backbones()} == set(FAMILY)
    assert {FAMILY[n] for n in [*REPRESENTATIVES, "efficientnet_lite0"]} == set(FAMILY.values())


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_backbone_family_exports_with_dynamic_batch(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_classifier(name, 4).eval()
    path = tmp_path / "m.onnx"
    _export_onnx(model, torch.zeros(2, 3, 64, 64), path, 18, None)
    ort_model = OrtModel(path)
    for batch in (1, 5):  # the batch axis is dynamic
        x = np.random.default_rng(batch).normal(size=(batch, 3, 64, 64)).astype(np.float32)
        np.testing.assert_allclose(ort_model(x), model(torch.from_numpy(x)).detach().numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export")
    report = export_run(tiny_run, ExportOptions(out=str(out), embed_preprocess=True, fp16=True), QUIET)
    return out, report


def test_every_file_passes_the_parity_gate(exported: tuple[Path, dict]) -> None:
    out, report = exported
    assert report["ok"]
    for key in ("onnx", "onnx_uint8", "openvino"):
        p = report["parity"][key]
        assert p["gate"] == "pass" and p["top1_agreement"] >= 0.995 and p["max_abs_diff"] <= 1e-3
    assert report["parity"]["openvino"]["precision"] == "fp32"
    assert report["parity_images"]["n"] == 6  # the whole validation split: 2 of 12 per class, fewer than the sample size
    saved = json.loads((out / "export.json").read_text())  # beside the models, naming the run
    assert saved["run"] == report["run"] and not (Path(report["run"]) / "export.json").exists()
    assert saved["parity"]["onnx"]["max_abs_diff"] == report["parity"]["onnx"]["max_abs_diff"]
    assert (out / "labels.txt").read_text().split() == ["blue", "green", "red"]


def test_onnx_graph_is_valid_and_named(exported: tuple[Path, dict]) -> None:
    out, _ = exported
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.opset_import[0].version >= 17
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param, "batch axis should be dynamic"


def test_metadata_round_trips_through_onnxruntime_and_openvino(exported: tuple[Path, dict], tiny_run: Path) -> None:
    out, report = exported
    meta = read_onnx_metadata(str(out / "model.onnx"))
    assert tuple(meta) == metadata.KEYS or set(meta) == set(metadata.KEYS)
    assert metadata.labels_from(meta) == ["blue", "green", "red"]
    ckpt = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    spec = metadata.spec_from(meta)
    assert spec.to_dict() == ckpt["config"]["preprocess"]
    assert meta["checkpoint_sha256"] == report["checkpoint_sha256"] and meta["layout"] == "NCHW"
    assert json.loads(meta["validation_metrics"])["n"] == 6
    ov_meta = read_metadata(out / "openvino" / "model.xml")
    assert ov_meta == meta
    u8 = read_onnx_metadata(str(out / "model.uint8.onnx"))
    assert (u8["layout"], u8["dtype"], u8["preprocessing_in_graph"], u8["input_name"]) == ("NHWC", "uint8", "true", "pixels")


def test_metadata_keys_are_a_stable_contract() -> None:
    # Changing this list breaks apps: bump metadata.METADATA_VERSION and document it in the README.
    assert metadata.METADATA_VERSION == "1"
    assert metadata.KEYS == (
        "edgetl_metadata_version", "edgetl_version", "labels", "input_name", "output_name", "input_size",
        "resize_shorter_side", "interpolation", "layout", "dtype", "channel_order", "pixel_scale", "mean", "std",
        "preprocessing_in_graph", "backbone", "checkpoint_sha256", "validation_metrics",
    )  # fmt: skip


def test_uint8_model_matches_the_plain_one_on_preprocessed_input(exported: tuple[Path, dict]) -> None:
    out, _ = exported
    spec = metadata.spec_from(read_onnx_metadata(str(out / "model.onnx")))
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, spec.input_size, spec.input_size, 3), dtype=np.uint8)
    from edgetl.preprocess import normalize

    plain = OrtModel(out / "model.onnx")(normalize(pixels, spec))
    embedded = OrtModel(out / "model.uint8.onnx")(pixels)
    np.testing.assert_allclose(embedded, plain, atol=1e-4)
    # The same graph behind the preprocessing, not a second trace: every node and weight of model.onnx follows it.
    import onnx

    g8, g32 = onnx.load(str(out / "model.uint8.onnx")).graph, onnx.load(str(out / "model.onnx")).graph
    assert [n.op_type for n in g8.node] == ["Transpose", "Cast", "Mul", "Sub", *(n.op_type for n in g32.node)]
    assert {i.name for i in g32.initializer} < {i.name for i in g8.initializer}
    assert [d.dim_param or d.dim_value for d in g8.input[0].type.tensor_type.shape.dim] == ["batch", spec.input_size, spec.input_size, 3]


def test_openvino_agrees_with_onnx(exported: tuple[Path, dict]) -> None:
    out, _ = exported
    x = np.random.default_rng(1).normal(size=(3, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(OpenVinoModel(out / "openvino" / "model.xml")(x), OrtModel(out / "model.onnx")(x), atol=1e-4)


@pytest.mark.slow
def test_lite0_export_passes_parity_on_real_photos(real_export_report: tuple[Path, dict]) -> None:
    out, report = real_export_report
    assert report["ok"] and report["parity_images"]["n"] == 100
    for key in ("onnx", "onnx_uint8", "openvino"):
        assert report["parity"][key]["top1_agreement"] >= 0.995
        assert report["parity"][key]["top1"] == pytest.approx(report["parity"]["pytorch"]["top1"], abs=0.011)
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert not ops & {"Shape", "Gather", "Pad"}, "TF 'same' padding should be folded into the convolutions"


def test_a_failed_openvino_only_export_leaves_no_temporary_onnx(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An OpenVINO-only export converts from an ONNX file in a temporary folder: a failure must remove it at once.
    def failing(*args: object, **kw: object) -> None:
        raise EdgetlError("OpenVINO failed")

    monkeypatch.setattr(export_mod, "_save_openvino", failing)
    with pytest.raises(EdgetlError, match="OpenVINO failed"):
        export_run(tiny_run, ExportOptions(format="openvino", out=str(tmp_path / "out")), QUIET)
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_parity_failure_moves_the_file_aside_and_fails(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_mod, "PARITY_MAX_ABS_DIFF", -1.0)  # nothing can pass
    with pytest.raises(EdgetlError, match="parity check failed") as info:
        export_run(tiny_run, ExportOptions(format="onnx", out=str(tmp_path)), QUIET)
    assert info.value.exit_code != 0
    assert not (tmp_path / "model.onnx").exists() and (tmp_path / "model.failed.onnx").exists()


@pytest.mark.parametrize(
    ("opts", "fragment"),
    [
        (dict(format="tflite"), "unknown format"),
        (dict(opset=11), "too old"),
        (dict(opset=99), "newer than"),
        (dict(batch="many"), "--batch"),
        (dict(format="openvino", embed_preprocess=True), "--embed-preprocess writes the uint8-input ONNX model"),
        (dict(format="litert", embed_preprocess=True), "add it"),
        (dict(parity_samples=0), "--parity-samples must be at least 1"),
        (dict(parity_samples=-3), "--parity-samples must be at least 1"),
    ],
)
def test_bad_options(tiny_run: Path, tmp_path: Path, opts: dict, fragment: str) -> None:
    with pytest.raises(EdgetlError, match=fragment):
        export_run(tiny_run, ExportOptions(out=str(tmp_path), **opts), QUIET)


def test_existing_output_needs_force(exported: tuple[Path, dict], tiny_run: Path) -> None:
    out, _ = exported
    before = (out / "model.onnx").read_bytes()
    with pytest.raises(EdgetlError, match="--force"):
        export_run(tiny_run, ExportOptions(out=str(out)), QUIET)
    assert (out / "model.onnx").read_bytes() == before


def test_missing_and_corrupt_runs(tmp_path: Path, tiny_run: Path) -> None:
    with pytest.raises(EdgetlError, match="run folder not found"):
        export_run(tmp_path / "nope", ExportOptions(), QUIET)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(EdgetlError, match="not an edgetl run folder"):
        export_run(tmp_path / "photos", ExportOptions(), QUIET)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "checkpoint.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(EdgetlError, match="not a readable"):
        export_run(bad, ExportOptions(), QUIET)


def test_fixed_batch_export(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    # OpenVINO too: its parity check feeds validation images in chunks of the fixed batch (a batch of 32
    # into a batch-4 IR used to fail inside the CPU plugin).
    report = export_run(run, ExportOptions(format="onnx,openvino", batch="4"), QUIET)
    assert report["ok"]
    proto = onnx.load(str(run / "model.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
    from edgetl.backends.openvino import OpenVinoModel

    ov_model = OpenVinoModel(run / "openvino" / "model.xml")
    assert ov_model.fixed_batch == 4
    assert ov_model.predict(np.zeros((6, 3, 64, 64), np.float32)).shape[0] == 6


def test_openvino_compiles_a_static_batch_per_call_size_with_the_same_logits(tiny_run: Path, tmp_path: Path) -> None:
    from edgetl.backends.openvino import OpenVinoModel

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    export_run(run, ExportOptions(format="openvino"), QUIET)
    xml = run / "openvino" / "model.xml"
    x = np.random.default_rng(0).standard_normal((5, 3, 64, 64)).astype(np.float32)
    dynamic = OpenVinoModel(xml, static_batches=False)
    static = OpenVinoModel(xml)
    assert static.settings["static_batch_compile"] == "True" and dynamic.settings["static_batch_compile"] == "False"
    for n in (1, 2, 3, 5, 1):
        np.testing.assert_allclose(static(x[:n]), dynamic(x[:n]), atol=1e-4)
    assert sorted(static._requests) == [1, 3, 5]  # the three most recent sizes, each compiled for its static shape
    assert all(r.model_inputs[0].get_partial_shape().is_static for r in static._requests.values())
