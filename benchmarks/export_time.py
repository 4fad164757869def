"""Wall time of `edgetl export RUN --format all,litert,executorch --embed-preprocess` and then of
`edgetl quantize OUT --format all,litert,executorch`, the way they work now against the way they worked
before, alternating in one session:

- now: the LiteRT child process starts as soon as model.onnx is written and converts while this
  process makes model.uint8.onnx, the OpenVINO IR and the ExecuTorch program; model.uint8.onnx is
  model.onnx behind four preprocessing nodes.
- before: the LiteRT conversion waited for (it ran after OpenVINO, before ExecuTorch, with nothing
  beside it), and model.uint8.onnx was a second dynamo trace of the model wrapped in its preprocessing.
- quantize now: LiteRT's int8 conversion runs in its child process while ONNX Runtime, OpenVINO and
  ExecuTorch are quantized and judged; every latency is timed after it. Before: the conversion waited for.

    python benchmarks/export_time.py RUN --label lite0 [--repeats 2]

Writes results/export_time_<label>.{json,md}: per mode and command the median and range of the wall
time, each format's own seconds from export.json, and the ratio now / before.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import result_name, save

from edgetl import export as export_module
from edgetl import quantize as quantize_module
from edgetl.export import ExportOptions, export_run
from edgetl.progress import Reporter
from edgetl.quantize import QuantizeOptions, quantize_run

FORMATS = "all,litert,executorch"
saved_start_litert = quantize_module.start_litert


class _WaitingLiteRt(export_module._LiteRtExport):
    """Before: the conversion ran alone, the export going on only once it had finished."""

    def __init__(self, onnx_path: Path, target: Path) -> None:
        super().__init__(onnx_path, target)
        self.conversion.wait()


def _traced_pixel_input(fp32_onnx: Path, target: Path, spec: Any) -> None:
    """Before: model.uint8.onnx traced again from the PyTorch model wrapped in its preprocessing."""
    import torch
    from torch import nn

    model = _traced_pixel_input.model  # type: ignore[attr-defined]

    class PixelsToLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("mul", (1.0 / (torch.tensor(spec.std) * 255.0)).view(1, 3, 1, 1))
            self.register_buffer("sub", (torch.tensor(spec.mean) / torch.tensor(spec.std)).view(1, 3, 1, 1))

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.model(pixels.permute(0, 3, 1, 2).to(torch.float32) * self.mul - self.sub)

    wrapper = PixelsToLogits().eval()
    c = spec.input_size
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    program = torch.onnx.export(wrapper, (torch.zeros(2, c, c, 3, dtype=torch.uint8),), dynamo=True, opset_version=18,
                                input_names=["pixels"], output_names=["logits"], dynamic_shapes=dynamic, optimize=True)  # fmt: skip
    program.save(str(target))
    import onnx

    proto = onnx.load(str(target))
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(onnx.shape_inference.infer_shapes(proto, strict_mode=True), str(target))


def _waiting_litert_int8(run_dir: Path, calib: Any, reporter: Reporter) -> Any:
    """Before: the int8 conversion ran alone, quantize going on only once it had finished."""
    job = saved_start_litert(run_dir, calib, reporter)
    job.wait()
    return job


def export_once(run: Path, mode: str, with_quantize: bool) -> dict[str, Any]:
    from edgetl import checkpoint

    saved = export_module._LiteRtExport, export_module._with_pixel_input, quantize_module.start_litert
    if mode == "before":
        _traced_pixel_input.model = checkpoint.load_model(run)[0]  # type: ignore[attr-defined]
        export_module._LiteRtExport, export_module._with_pixel_input = _WaitingLiteRt, _traced_pixel_input  # type: ignore[misc]
        quantize_module.start_litert = _waiting_litert_int8  # type: ignore[assignment]
    out = Path(tempfile.mkdtemp(prefix=f"export-{mode}-"))
    try:
        t0 = time.perf_counter()
        report = export_run(run, ExportOptions(format=FORMATS, out=str(out), embed_preprocess=True), Reporter(quiet=True))
        wall = time.perf_counter() - t0
        row = {"wall_s": wall, "ok": report["ok"], "files_s": {k: v["export_seconds"] for k, v in report["files"].items()},
               "uint8_parity": report["parity"]["onnx_uint8"]}  # fmt: skip
        if with_quantize:
            t0 = time.perf_counter()
            q = quantize_run(out, QuantizeOptions(format=FORMATS, max_drop=100.0), Reporter(quiet=True))
            row["quantize_wall_s"] = time.perf_counter() - t0
            row["int8_over_fp32"] = {k: r["latency"]["int8_over_fp32"] for k, r in q["results"].items()}
    finally:
        export_module._LiteRtExport, export_module._with_pixel_input, quantize_module.start_litert = saved  # type: ignore[misc]
        shutil.rmtree(out, ignore_errors=True)
    return row


def _spread(values: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--label", required=True)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-quantize", action="store_true", help="time the export only")
    args = ap.parse_args()
    run = Path(args.run)
    export_once(run, "now", with_quantize=False)  # warm-up: first imports of the exporters and the file cache
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "now": []}
    for _ in range(args.repeats):
        for mode in ("before", "now"):
            runs[mode].append(export_once(run, mode, with_quantize=not args.no_quantize))
            print(mode, {k: v for k, v in runs[mode][-1].items() if k != "uint8_parity"}, flush=True)
    summary = {m: {"export": _spread([r["wall_s"] for r in rs]),
                   **({"quantize": _spread([r["quantize_wall_s"] for r in rs])} if not args.no_quantize else {})}
               for m, rs in runs.items()}  # fmt: skip
    ratios = {step: summary["now"][step]["median_s"] / summary["before"][step]["median_s"] for step in summary["now"]}
    lines = [f"# Export and quantize wall time, `--format {FORMATS}` (export with --embed-preprocess), {run.name}", "",
             "| mode | step | median s | range s |", "|---|---|---|---|"]  # fmt: skip
    for m in runs:
        for step, sp in summary[m].items():
            lines.append(f"| {m} | {step} | {sp['median_s']:.1f} | {sp['min_s']:.1f}-{sp['max_s']:.1f} |")
    p = runs["now"][-1]["uint8_parity"]
    lines += ["", "now / before: " + ", ".join(f"{step} **{r:.2f}x**" for step, r in ratios.items())
              + f" ({args.repeats} alternating repeats after one warm-up export).",
              f"model.uint8.onnx (now) against PyTorch: top-1 agreement {p['top1_agreement']:.1%}, "
              f"max |logit diff| {p['max_abs_diff']:.1e}."]  # fmt: skip
    save(result_name("export_time", args.label), {"run": str(run), "formats": FORMATS, "runs": runs, "summary": summary,
                                                 "now_over_before": ratios}, "\n".join(lines))  # fmt: skip


if __name__ == "__main__":
    main()
