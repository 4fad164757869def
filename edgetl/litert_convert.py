"""ONNX -> LiteRT (.tflite) conversion through onnx2tf and TensorFlow's TFLiteConverter, in a child process.

Why this route: litert-torch (PyTorch -> LiteRT directly) requires torch < 2.15 and edgetl runs on
the current torch; onnx2tf converts the ONNX file edgetl already exports and parity-checks (the route
Ultralytics takes for its TFLite export), turning NCHW into the NHWC layout LiteRT kernels want, and
TensorFlow's own converter makes the full-integer int8 model from a representative dataset.

Why a child process: TensorFlow is large (about 1 GB resident once imported) and shares C++ runtime
libraries with torch; converting in `python -m edgetl.litert_convert` keeps it out of the edgetl
process, frees its memory when done, and turns any crash of the converter into one clear error.
The child never reaches the network: onnx2tf's sample-image download (used only for its own
self-check of fixed-batch image models) is replaced with the caller's images, and its renaming of
the tensors (which downloads a schema first) is not asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgetl.errors import EdgetlError

EXTRA_HINT = "pip install 'edgetl[litert]'"
NEEDED = ("tensorflow", "onnx2tf", "onnx_graphsurgeon", "ai_edge_litert")
FLOAT_FILE = "model_float32.tflite"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
INT8_FILE = "model_int8.tflite"


def require_extra() -> None:
    """The litert extra is installed, or one clear message (exit 2) naming what to install."""
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        raise EdgetlError(f"LiteRT export needs the litert extra ({', '.join(missing)} not installed): {EXTRA_HINT}")


class Conversion:
    """A LiteRT conversion running in its child process: `start_conversion` returns at once, so the
    caller can do other work (the exports of other formats) while TensorFlow converts; `wait()` gives
    the files. It owns its work folder: `close()` (or leaving a `with` block, on an error or Ctrl-C too)
    stops the child and removes the folder, so a conversion never outlives its caller."""

    def __init__(self, onnx_path: Path, work: Path, cmd: list[str], files: dict[str, Path], timeout_s: float) -> None:
        self.onnx_path, self.work, self.files, self.timeout_s = onnx_path, work, files, timeout_s
        self.log = work / "convert.log"
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "-1", "PYTHONWARNINGS": "ignore"}
        with open(self.log, "wb") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.started = time.monotonic()

    def wait(self) -> dict[str, Path]:
        try:
            returncode = self.proc.wait(timeout=max(0.0, self.timeout_s - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.stop()
            raise EdgetlError(f"LiteRT conversion took longer than {self.timeout_s:.0f} s and was stopped (log: {self.log})") from None
        if returncode != 0 or not all(p.is_file() for p in self.files.values()):
            raise EdgetlError(f"LiteRT conversion of {self.onnx_path.name} failed: {failure_reason(self.log)}")
        return self.files

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> Conversion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_conversion(onnx_path: Path, parent: Path, calib_nchw: np.ndarray | None = None, prefix: str = "litert",
                     timeout_s: float = 3600) -> Conversion:  # fmt: skip
    """Start converting `onnx_path` in a child process (see `Conversion`), working in a temporary folder
    in `parent`: the fp32 .tflite and, given calibration images (float NCHW, preprocessed as for the
    model), the full-integer int8 .tflite (float input/output)."""
    from edgetl.fileio import make_temp_dir

    require_extra()
    work = make_temp_dir(parent, prefix)
    try:
        # onnx2tf rewrites its input file with its own graph optimisations: it gets a copy, never the
        # parity-checked model.onnx.
        source = work / "model.onnx"  # onnx2tf names its outputs after the input file: model_float32.tflite
        shutil.copyfile(onnx_path, source)
        cmd = [sys.executable, "-m", "edgetl.litert_convert", str(source), str(work)]
        files = {"fp32": work / "tf" / FLOAT_FILE}
        if calib_nchw is not None:
            np.save(work / "calib.npy", np.ascontiguousarray(calib_nchw.transpose(0, 2, 3, 1), dtype=np.float32))
            cmd += ["--calib", str(work / "calib.npy")]
            files["int8"] = work / "tf" / INT8_FILE
        return Conversion(onnx_path, work, cmd, files, timeout_s)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def failure_reason(log: Path) -> str:
    """The converter's own words, naming the operator when it can: an ONNX operator onnx2tf has no
    converter for, else the ONNX node whose conversion failed and the error, else the last error line."""
    try:
        text = ANSI.sub("", log.read_text(errors="replace"))
    except OSError:
        return "no log"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        missing = re.search(r"(\S+) OP is not yet implemented", ln)
        if missing:
            return f"onnx2tf has no converter for the ONNX operator {missing.group(1)!r}"
    marked = [ln.removeprefix("edgetl-litert-error:").strip() for ln in lines if ln.startswith("edgetl-litert-error:")]
    error = marked[-1] if marked and not marked[-1].startswith("SystemExit") else None
    nodes = [ln.split("onnx_op_name:", 1)[1].strip() for ln in lines if "onnx_op_name:" in ln]
    if nodes:
        return f"converting the ONNX node {nodes[-1]!r} failed" + (f": {error[:300]}" if error else "")
    if error:
        return error[:400]
    errors = [ln for ln in lines if "ERROR" in ln or "Error" in ln]
    return (errors[-1] if errors else lines[-1] if lines else "the converter exited without output")[:400]


# ----------------------------------------------------------------------------- the child process


def _offline_onnx2tf(onnx_path: str, sample: np.ndarray | None) -> None:
    """onnx2tf downloads 20 MS-COCO images to check fixed-batch image models against ONNX Runtime:
    give it images instead (the caller's calibration images, else a deterministic pattern of the
    model's input size)."""
    import onnx

    dims = [d.dim_value for d in onnx.load(onnx_path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim]
    height, width = (dims[2], dims[3]) if len(dims) == 4 and dims[2] > 0 and dims[3] > 0 else (224, 224)
    module = sys.modules["onnx2tf.onnx2tf"]

    def images() -> np.ndarray:
        if sample is not None:
            return sample[:20]
        return np.random.default_rng(0).random((20, height, width, 3), dtype=np.float32)

    module.download_test_image_data = images


def _convert_float(onnx_path: str, out_dir: Path, sample: np.ndarray | None) -> None:
    import onnx2tf

    _offline_onnx2tf(onnx_path, sample)
    # No onnxsim pass: torch.onnx.export(optimize=True) has already folded what onnxsim would. Measured on
    # efficientnet_lite0, efficientnet_b0, mobilenetv2_100 and mobilenetv3_large_100 at 224 px: the same
    # operators and bit-identical outputs with and without it, and 15-28% less conversion time (Lite0 24.6 s -> 17.7 s).
    # onnx2tf is not asked to copy the ONNX tensor names: it would run flatc after downloading TensorFlow's
    # schema.fbs with curl, a network call that failed silently offline. edgetl renames the input and output
    # tensors itself when it writes the metadata (backends.litert.with_metadata), online or not.
    onnx2tf.convert(
        input_onnx_file_path=onnx_path, output_folder_path=str(out_dir), non_verbose=True,
        copy_onnx_input_output_names_to_tflite=False, not_use_onnxsim=True,
    )  # fmt: skip


def _convert_int8(saved_model: Path, calib_nhwc: np.ndarray, target: Path) -> None:
    """Full-integer int8 (every op int8, TFLITE_BUILTINS_INT8 only) with float input and output, so the
    file takes the same normalised floats as the fp32 one; weights per-channel int8, activations int8
    with ranges from the representative dataset (TFLiteConverter's documented route)."""
    import tensorflow as tf

    def representative() -> object:
        for i in range(len(calib_nhwc)):
            yield [calib_nhwc[i : i + 1]]

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.float32
    converter.inference_output_type = tf.float32
    target.write_bytes(converter.convert())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgetl.litert_convert", description=__doc__.splitlines()[0])
    parser.add_argument("onnx")
    parser.add_argument("work")
    parser.add_argument("--calib", help=".npy of float NHWC calibration images")
    args = parser.parse_args(argv)
    out_dir = Path(args.work) / "tf"
    try:
        calib = np.load(args.calib) if args.calib else None
        with contextlib.redirect_stdout(sys.stderr):
            _convert_float(args.onnx, out_dir, calib)
            if calib is not None:
                _convert_int8(out_dir, calib, out_dir / INT8_FILE)
    except BaseException as exc:  # the parent reads this line; SystemExit from onnx2tf's error() included
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        print(f"edgetl-litert-error: {type(exc).__name__}: {first}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
