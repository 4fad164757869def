"""edgetl bench on the tiny model over the CPU targets: files, sane numbers, skipped targets, errors."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgetl.bench.reference import AGREEMENT_MARGIN, agreement_verdict
from edgetl.bench.runner import BenchOptions, bench
from edgetl.bench.timing import interleaved_latency
from edgetl.cli.main import app
from edgetl.errors import EdgetlError
from edgetl.export import ExportOptions, export_run
from edgetl.progress import Reporter
from edgetl.report import VERDICT_MARK, pareto_front

QUIET = Reporter(quiet=True)


@pytest.fixture(scope="module")
def bench_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("bench") / "run"
    shutil.copytree(tiny_run, run)
    export_run(run, ExportOptions(embed_preprocess=True), QUIET)
    return run


@pytest.fixture(scope="module")
def report(bench_run: Path) -> dict:
    targets = ("torch-cpu", "ort-cpu", "openvino-cpu", "ort-cuda", "torch-cuda-graph")
    return bench([bench_run], BenchOptions(targets=targets, batches=(1, 4), min_time=0.1, warmup=2), QUIET)


def test_all_four_files_are_written(report: dict, bench_run: Path) -> None:
    for ext in ("json", "csv", "md", "png"):
        assert (bench_run / f"bench.{ext}").stat().st_size > 0
    saved = json.loads((bench_run / "bench.json").read_text())
    assert len(saved["results"]) == len(report["results"]) and saved["host"]["cpu_model"]
    rows = list(csv.DictReader((bench_run / "bench.csv").open()))
    assert {r["variant"] for r in rows} == {r["variant"] for r in report["results"]}
    assert "| variant |" in (bench_run / "bench.md").read_text()


def test_every_model_of_the_run_on_every_cpu_target(report: dict) -> None:
    names = {r["variant"] for r in report["results"]}
    assert {"torch-cpu/fp32", "ort-cpu/fp32", "ort-cpu/fp32 (uint8 input)", "openvino-cpu/fp32"} <= names


def test_numbers_are_sane(report: dict) -> None:
    for r in report["results"]:
        lat = r["latency"]
        assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] and lat["runs"] >= 3
        acc = r["accuracy"]
        assert 0 <= acc["top1"] <= 1 and acc["top5"] is None and 0 <= acc["macro_f1"] <= 1  # 3 classes: no top-5
        assert acc["agreement_with"] == "torch-cpu/fp32" and 0.99 <= acc["top1_agreement"] <= 1.0  # fp32 exports agree
        assert r["throughput"]["4"] > 0 and r["bytes"] > 0
        assert r["process"]["load_seconds"] > 0 and r["process"]["peak_rss_mb"] > 10
    ort = next(r for r in report["results"] if r["variant"] == "ort-cpu/fp32")
    u8 = next(r for r in report["results"] if r["variant"] == "ort-cpu/fp32 (uint8 input)")
    # Another model against the runtime's fp32 reference, from the same interleaved rounds.
    assert u8["ratio_to_fp32_same_target"] == pytest.approx(u8["latency"]["p50_ms"] / ort["latency"]["p50_ms"])
    ov = next(r for r in report["results"] if r["variant"] == "openvino-cpu/fp32")
    assert ov["ratio_to_fp32_same_target"] == pytest.approx(1.0) and ov["model"] != ort["model"]


def test_each_ratio_is_also_taken_round_by_round(report: dict, bench_run: Path) -> None:
    """A shared machine drifts between rounds: bench.json keeps the ratio of each round and bench.md its range."""
    from edgetl.bench.timing import flatten_rounds, ratio_by_round, turns_by_round

    served = {"int8": iter([1.0, 2.0, 1.0, 1.0, 4.0]), "fp32": iter([2.0, 2.0, 4.0, 2.0, 4.0])}
    rounds = turns_by_round({k: (lambda s, n, it=it: [next(it)] * 3) for k, it in served.items()}, min_time=0.0, rounds=5)
    assert ratio_by_round(rounds["int8"], rounds["fp32"]) == [0.5, 1.0, 0.25, 0.5, 1.0]
    assert flatten_rounds(rounds)["int8"] == [1.0] * 3 + [2.0] * 3 + [1.0] * 6 + [4.0] * 3
    for r in report["results"]:
        assert len(r["ratio_to_fp32_by_round"]) == 5, r["variant"]
        if r["precision"] == "fp32" and r["input"] == "float32" and r["target"] == r["runtime"]:
            assert r["ratio_to_fp32_by_round"] == [1.0] * 5, "the reference against itself, round by round"
    u8 = next(r for r in report["results"] if r["variant"] == "ort-cpu/fp32 (uint8 input)")
    lo, hi = min(u8["ratio_to_fp32_by_round"]), max(u8["ratio_to_fp32_by_round"])
    row = next(line for line in (bench_run / "bench.md").read_text().splitlines() if line.startswith("| ort-cpu/fp32 (uint8 input) |"))
    assert f"{u8['ratio_to_fp32_same_target']:.2f} ({lo:.2f}-{hi:.2f})" in row or f"{lo:.2f}" == f"{hi:.2f}"


def test_unavailable_targets_are_listed_as_skipped(report: dict) -> None:
    skipped = {s["target"]: s["reason"] for s in report["skipped"]}
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "ort-cuda" in skipped and "CUDA" in skipped["ort-cuda"]
    import torch

    if not torch.cuda.is_available():
        assert skipped.get("torch-cuda-graph") == "no CUDA device"
    else:  # on a GPU machine the graph replay is timed, and test_numbers_are_sane holds it to the CPU model's answers
        assert {"torch-cuda-graph/fp32", "torch-cuda-graph/fp16"} <= {r["variant"] for r in report["results"]}


def test_pareto_front() -> None:
    pts = [(10.0, 0.9), (5.0, 0.85), (12.0, 0.88), (5.0, 0.80), (2.0, 0.5)]
    assert sorted(pareto_front(pts)) == [0, 1, 4]


def test_interleaved_latency_fixed_runs_alternate_between_models() -> None:
    calls: list[str] = []
    runners = {name: (lambda x, name=name: calls.append(name) or x) for name in ("a", "b")}
    samples = interleaved_latency(runners, np.zeros(1), min_time=0.0, warmup=2, rounds=3, runs_per_round=4, turn_warmup=1)
    assert {k: len(v) for k, v in samples.items()} == {"a": 12, "b": 12}  # the per-turn warm-up runs are not samples
    assert all(ms >= 0 for v in samples.values() for ms in v)
    assert calls[:4] == ["a", "a", "b", "b"]  # 2 warm-up calls each
    # Rounds alternate, so drift hits both models alike; each turn opens with one untimed run (caches after a switch).
    assert calls[4:] == (["a"] * (1 + 4) + ["b"] * (1 + 4)) * 3


runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["bench", "README.md"], "not a model"),
        (["bench", "/nope/model.onnx"], "does not exist"),
        (["bench", "--targets", "tpu-9000", "{run}"], "unknown target"),
        (["bench", "--batch", "1,x", "{run}"], "--batch"),
    ],
)
def test_bench_errors(args: list[str], fragment: str, bench_run: Path) -> None:
    args = [a.replace("{run}", str(bench_run)) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output


def test_model_without_metadata_needs_the_preprocessing(bench_run: Path, tmp_path: Path) -> None:
    import onnx

    proto = onnx.load(str(bench_run / "model.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    with pytest.raises(EdgetlError, match="--input-size"):
        bench([tmp_path / "plain.onnx"], BenchOptions(targets=("ort-cpu",)), QUIET)
    opts = BenchOptions(targets=("ort-cpu",), input_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, min_time=0.2, batches=(1,),
                        isolation="in-process", out=str(tmp_path))  # fmt: skip
    rep = bench([tmp_path / "plain.onnx"], opts, QUIET)
    assert rep["results"][0]["latency"]["p50_ms"] > 0 and "accuracy" not in rep["results"][0]


def test_each_variant_ran_in_a_worker_process_of_its_own(report: dict) -> None:
    """One runtime's idle threads must not slow another's numbers: every variant is timed in its own
    process (turns interleaved in rounds), never in the process that runs the others."""
    import os

    pids = [r["process"]["pid"] for r in report["results"]]
    assert len(set(pids)) == len(pids) and os.getpid() not in pids
    assert "worker process of its own" in report["method"]
    ov = next(r for r in report["results"] if r["variant"] == "openvino-cpu/fp32")
    assert ov["executed_precision"] == "fp32"  # what the plugin says it runs, not only what was asked


def test_in_process_isolation_is_the_old_single_process_method(bench_run: Path, tmp_path: Path) -> None:
    import os

    rep = bench([bench_run], BenchOptions(targets=("ort-cpu", "openvino-cpu"), batches=(1,), min_time=0.1, warmup=1,
                                          isolation="in-process", out=str(tmp_path)), QUIET)  # fmt: skip
    assert {r["process"]["pid"] for r in rep["results"]} == {os.getpid()}
    with pytest.raises(EdgetlError, match="--isolation"):
        BenchOptions(isolation="threads")


@pytest.mark.parametrize(("option", "value"), [("threads", 0), ("warmup", -1), ("min_time", 0.0), ("min_time", float("nan")),
                                               ("max_images", 0)])  # fmt: skip
def test_out_of_range_bench_options_are_user_errors(option: str, value: float) -> None:
    with pytest.raises(EdgetlError, match="--" + option.replace("_", "-")):
        BenchOptions(**{option: value})


@pytest.fixture(scope="module")
def reference_bench(bench_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str | None]:
    """`edgetl bench --check-reference` run as a user runs it, under strace where it can be
    (no_network/syscall_trace.py): the runtimes' own tools are native programs (OpenVINO's benchmark_app is C++),
    which the Python guard cannot see. Gives the output folder and why it ran untraced (None: traced)."""
    import syscall_trace  # tests/no_network, on sys.path since conftest's pytest_configure

    out = tmp_path_factory.mktemp("reference")
    bench_cli = [sys.executable, "-m", "edgetl", "bench", str(bench_run), "--targets", "ort-cpu,openvino-cpu", "--batch", "1",
                 "--min-time", "0.1", "--warmup", "1", "--check-reference", "--out", str(out)]  # fmt: skip
    cmd = syscall_trace.then_mark_the_end(bench_cli)
    untraced = syscall_trace.why_not_traceable()
    if untraced is None:
        cmd = syscall_trace.traced(cmd, out / "network.strace")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, untraced


def test_check_reference_runs_both_runtimes_own_tools(reference_bench: tuple[Path, str | None]) -> None:
    out, _ = reference_bench
    saved = json.loads((out / "bench.json").read_text())
    tools = {}
    for r in saved["results"]:
        ref = r["reference"]
        assert ref["p50_ms"] > 0 and ref["edgetl_over_reference"] == pytest.approx(r["latency"]["p50_ms"] / ref["p50_ms"]), ref
        tools[r["target"]] = ref["tool"]
        assert ref["turns"] == 2 and ref["interleaved"], "2 s of reference: a turn in the first and the last round"
    assert tools == {"ort-cpu": "InferenceSession.run loop", "openvino-cpu": "benchmark_app"}
    assert "-api sync" in next(r["reference"]["command"] for r in saved["results"] if r["target"] == "openvino-cpu")
    md = (out / "bench.md").read_text()
    assert "ref p50 ms" in md and "taking turns inside the same rounds" in md
    ort_fp32 = next(r for r in saved["results"] if r["target"] == "ort-cpu" and r["precision"] == "fp32")
    low, high = min(ort_fp32["reference"]["turn_p50_ms"]), max(ort_fp32["reference"]["turn_p50_ms"])
    assert f"{ort_fp32['reference']['p50_ms']:.2f} ({low:.2f}-{high:.2f})" in md, "the turns' range beside the tool's p50"
    for r in saved["results"]:
        ref = r["reference"]
        assert ref["verdict"] == agreement_verdict(r["latency"]["p50_ms"], ref["turn_p50_ms"])
        cell = f"| {ref['edgetl_over_reference']:.2f}{VERDICT_MARK.get(ref['verdict'], '')} |"
        assert cell in md, (cell, ref["verdict"])


def test_the_reference_tools_address_no_other_machine_from_native_code(reference_bench: tuple[Path, str | None]) -> None:
    """benchmark_app and the other children of `bench --check-reference` ran under strace: none of their calls
    addressed another machine (the real Lite0 build's trace covers training and the exports)."""
    from syscall_trace import calls_to_other_machines, shows_the_end_mark

    out, untraced = reference_bench
    assert untraced is None, untraced
    trace = (out / "network.strace").read_text()
    assert shows_the_end_mark(trace), "the trace did not follow the bench to its end"
    openvino = [r["reference"] for r in json.loads((out / "bench.json").read_text())["results"] if r["target"] == "openvino-cpu"]
    assert openvino and all(ref["tool"] == "benchmark_app" and ref.get("p50_ms") for ref in openvino), "benchmark_app ran, traced"
    assert calls_to_other_machines(trace) == []


def test_reference_verdict_allows_the_tools_own_spread_and_a_margin() -> None:
    turns = [2.0, 4.0, 3.0]
    assert agreement_verdict(3.3, turns) == "agrees"
    assert agreement_verdict(4.0 * (1 + AGREEMENT_MARGIN) - 0.01, turns) == "agrees", "inside the widened range"
    assert agreement_verdict(4.0 * (1 + AGREEMENT_MARGIN) + 0.01, turns) == "edgetl-slower"
    assert agreement_verdict(2.0 * (1 - AGREEMENT_MARGIN) + 0.01, turns) == "agrees"
    assert agreement_verdict(2.0 * (1 - AGREEMENT_MARGIN) - 0.01, turns) == "edgetl-faster"
    assert agreement_verdict(5.0, [5.2]) == "agrees", "one turn: only the margin"
    assert agreement_verdict(6.0, [5.2]) == "edgetl-slower"


def test_reference_tools_take_their_turns_inside_the_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drift must hit edgetl's figure and the tool's alike: the tool runs between edgetl's turns, spread over the rounds."""
    from edgetl.bench import reference
    from edgetl.bench.timing import rounds_of_turns

    order: list[str] = []
    medians = iter([2.0, 4.0, 3.0])
    monkeypatch.setattr(reference, "reference_for", lambda *a: order.append("tool") or {"tool": "fake", "p50_ms": next(medians)})
    turns = reference.ReferenceTurns("ort-cpu", Path("m.onnx"), 2, "fp32", "float32", (1, 3, 8, 8), seconds=3.0, total_rounds=5)

    def edgetl_turn(seconds: float, runs: int | None) -> list[float]:
        order.append("edgetl")
        return [1.0]

    samples = rounds_of_turns({"edgetl": edgetl_turn, "tool": turns}, min_time=0.0, rounds=5)
    assert samples == {"edgetl": [1.0] * 5, "tool": []}
    assert order == ["edgetl", "tool", "edgetl", "edgetl", "tool", "edgetl", "edgetl", "tool"], "rounds 1, 3 and 5"
    ref = turns.result(edgetl_p50_ms=1.5)
    assert ref["p50_ms"] == 3.0 and ref["turn_p50_ms"] == [2.0, 4.0, 3.0] and ref["edgetl_over_reference"] == 0.5
    assert ref["verdict"] == "edgetl-faster", "1.5 ms is below every turn (2-4 ms) even with the margin"
    failing = reference.ReferenceTurns("ort-cpu", Path("m.onnx"), 2, "fp32", "float32", (1, 3, 8, 8), 1.0, 5)
    monkeypatch.setattr(reference, "reference_for", lambda *a: {"tool": "fake", "error": "boom"})
    rounds_of_turns({"tool": failing}, min_time=0.0, rounds=5)
    assert failing.result(1.0) == {"tool": "fake", "error": "boom"}, "one turn, in the middle round, and its error kept"


def test_a_missing_benchmark_app_is_reported_not_fatal(bench_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("edgetl.bench.reference.find_benchmark_app", lambda: None)
    rep = bench([bench_run], BenchOptions(targets=("openvino-cpu", "ort-cpu"), batches=(1,), min_time=0.1, warmup=1,
                                          check_reference=True, isolation="in-process", out=str(tmp_path)), QUIET)  # fmt: skip
    ov = [r for r in rep["results"] if r["target"] == "openvino-cpu"]
    assert ov and all("benchmark_app is not installed" in r["reference"]["error"] for r in ov)
    assert all(r["reference"]["p50_ms"] > 0 for r in rep["results"] if r["target"] == "ort-cpu")


def test_a_worker_that_dies_is_a_clear_error_not_a_hang(bench_run: Path, tmp_path: Path) -> None:
    import os
    import signal

    from edgetl.bench.base import Variant
    from edgetl.bench.isolation import ArrayFiles, ProcessWorker

    w = ProcessWorker(Variant("ort-cpu", bench_run / "model.onnx", "onnx", "fp32"), (1, 3, 64, 64), 1, ArrayFiles(tmp_path))
    assert w.error is None and w.info["pid"] != os.getpid()
    os.kill(w.proc.pid, signal.SIGKILL)
    with pytest.raises(EdgetlError, match="worker for ort-cpu/fp32 failed during time"):
        w.time(np.zeros((1, 3, 64, 64), np.float32), 0.1)
    w.close()


def test_plot_labels_of_nearby_points_do_not_collide() -> None:
    """Four fp32 variants within 0.2 ms and 0.3 points of each other (what used to print as one smear):
    every label gets a box of its own."""
    from edgetl.plots import _pyplot
    from edgetl.report import _overlap, place_labels

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    from matplotlib.text import Text

    # What bench.png showed for Lite0 on clothing-small: four fp32 rows within 0.4 ms at one accuracy.
    pts = [(3.41, 0.9382), (3.64, 0.9382), (3.68, 0.9382), (3.78, 0.9382), (2.27, 0.9382), (2.71, 0.9409), (1.78, 0.9462), (3.53, 0.9274)]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    ax.set_xlim(0.8, 4.8)
    ax.set_ylim(0.917, 0.957)
    texts = place_labels(ax, pts, [f"executorch-cpu/fp32 #{i}" for i in range(len(pts))])
    renderer = fig.canvas.get_renderer()
    boxes = [(b.x0, b.y0, b.x1, b.y1) for b in (Text.get_window_extent(t, renderer) for t in texts)]
    assert len(boxes) == len(pts)
    assert not [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if _overlap(boxes[i], boxes[j])]
    plt.close(fig)


def test_two_runs_side_by_side_keep_every_row_apart(bench_run: Path, tmp_path: Path) -> None:
    """Two run folders in one bench (a tuned pick beside its probe): every model gets its own row and worker,
    named after its run, and its agreement and speed ratio are against its own run's fp32 models."""
    other = tmp_path / "other"
    shutil.copytree(bench_run, other)
    rep = bench([bench_run, other], BenchOptions(targets=("torch-cpu", "openvino-cpu"), batches=(1,), min_time=0.1, warmup=1,
                                                 out=str(tmp_path / "out")), QUIET)  # fmt: skip
    from edgetl.hostinfo import has_bf16

    names = [r["variant"] for r in rep["results"]]
    # On a CPU with bf16 instructions OpenVINO also runs the fp32 IR in bf16: a variant of its own.
    variants = ("torch-cpu/fp32", "openvino-cpu/fp32", *(("openvino-cpu/bf16",) if has_bf16() else ()))
    assert sorted(names) == sorted(f"{v} [{run}]" for v in variants for run in (bench_run.name, "other"))
    assert len({r["process"]["pid"] for r in rep["results"]}) == len(names), "a worker was replaced by another run's"
    for r in rep["results"]:
        run = r["variant"].split(" [")[1].rstrip("]")
        assert r["accuracy"]["agreement_with"] == f"torch-cpu/fp32 [{run}]"
        if r["precision"] == "fp32":
            assert r["ratio_to_fp32_same_target"] == pytest.approx(1.0)  # each fp32 row is its own run's reference
    # The console table names each row's run too ("[run]" is not swallowed as rich markup).
    from rich.console import Console

    from edgetl.report import print_bench_table

    console = Console(record=True, width=200)
    print_bench_table(rep, console)
    shown = console.export_text()
    assert all(name in shown for name in names)


def test_runs_of_different_input_sizes_are_each_scored_and_timed_at_their_own(bench_run: Path, tiny_run: Path, tmp_path: Path) -> None:
    """A tuned pick at another input size beside the default (Lite1 at 192 px against Lite0 at 224): one bench,
    interleaved, each model scored on the same images prepared its own way and timed on its own input size."""
    from dataclasses import replace

    from conftest import tiny_run_config

    from edgetl.train import train

    big = train(tiny_run.parent / "data", tiny_run_config(input_size=96), out=str(tmp_path / "big"), reporter=QUIET).run_dir
    export_run(big, ExportOptions(embed_preprocess=True), QUIET)
    # In one process: what is under test is how the images and inputs are prepared, not the worker processes.
    opts = BenchOptions(targets=("torch-cpu", "ort-cpu"), batches=(1, 2), min_time=0.1, warmup=1, out=str(tmp_path / "out"),
                        isolation="in-process")  # fmt: skip
    rep = bench([bench_run, big], opts, QUIET)
    assert not rep["skipped"]
    rows = {r["variant"]: r for r in rep["results"]}
    for run, size in ((bench_run, 64), (big, 96)):
        mine = {n: r for n, r in rows.items() if n.endswith(f"[{run.name}]")}
        # checkpoint, float ONNX and uint8-input ONNX: every one ran, at its run's size, against its own run's fp32 model.
        assert len(mine) == 3 and {r["input_size"] for r in mine.values()} == {size}
        assert all(r["accuracy"]["agreement_with"] == f"torch-cpu/fp32 [{run.name}]" for r in mine.values())
        assert all(r["accuracy"]["top1_agreement"] >= 0.9 and r["latency"]["runs"] >= 3 for r in mine.values())
        assert all(r["ratio_to_fp32_same_target"] == pytest.approx(1.0) for r in mine.values() if r["input"] == "float32")
        # The same accuracy as in a bench of that run alone: its images were prepared its own way.
        alone = bench([run], replace(opts, targets=("torch-cpu",), batches=(1,), out=str(tmp_path / run.name)), QUIET)
        assert mine[f"torch-cpu/fp32 [{run.name}]"]["accuracy"]["top1"] == alone["results"][0]["accuracy"]["top1"]
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "| input px |" in md and "each model on its own preprocessing" in md
    assert {line.split(" | ")[1] for line in md.splitlines() if line.startswith("| ort-cpu")} == {"64", "96"}


def test_runs_validated_on_different_images_are_not_scored_together(bench_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(bench_run, other)
    record = json.loads((other / "splits.json").read_text())
    record["splits"]["train"].append(record["splits"]["val"].pop())  # the other run trained on one of these images
    (other / "splits.json").write_text(json.dumps(record))
    with pytest.raises(EdgetlError, match="recorded different validation images"):
        bench([bench_run, other], BenchOptions(targets=("openvino-cpu",), batches=(1,), min_time=0.1, out=str(tmp_path / "out")), QUIET)
