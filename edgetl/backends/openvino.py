"""OpenVINO on the CPU (or GPU): compile with an explicit precision, read and save IR metadata."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgetl import metadata
from edgetl.errors import EdgetlError
from edgetl.fileio import make_temp_dir, replace_dir
from edgetl.runners import run_in_chunks

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}  # int8 IRs keep f32 for what is not int8


def read_model(path_or_model: Any) -> Any:
    import openvino as ov

    if not isinstance(path_or_model, (str, os.PathLike)):
        return path_or_model
    try:
        return ov.Core().read_model(str(path_or_model))
    except Exception as exc:
        raise EdgetlError(f"{path_or_model} is not an OpenVINO model: {str(exc).splitlines()[0][:160] if str(exc) else ''}") from None


# Properties edgetl sets on the CPU beyond the LATENCY hint, threads and precision: none. Pinning and
# denormal flushing measured no change (benchmarks/runtime_settings.py); the static-batch compile below
# is what was faster. Keys are OpenVINO properties, passed as they are.
CPU_LATENCY_DEFAULTS: dict[str, str] = {}


def compile_model(path_or_model: Any, precision: str = "f32", threads: int | None = None, device: str = "CPU",
                  latency_hint: bool = True, settings: Mapping[str, str] | None = None) -> Any:  # fmt: skip
    """Compile for `device` with an explicit inference precision (OpenVINO would pick bf16 by itself
    on CPUs that have it), the LATENCY performance hint (one stream: batch-1 requests use every
    thread), and `settings`: OpenVINO properties (ENABLE_CPU_PINNING, NUM_STREAMS, ...) as given."""
    import openvino as ov

    config: dict[str, object] = {"INFERENCE_PRECISION_HINT": precision}
    if latency_hint:
        config["PERFORMANCE_HINT"] = "LATENCY"
    if threads and device == "CPU":
        config["INFERENCE_NUM_THREADS"] = threads
    if device == "CPU":
        config.update(CPU_LATENCY_DEFAULTS)
    config.update(settings or {})
    try:
        return ov.Core().compile_model(read_model(path_or_model), device, config)
    except RuntimeError as exc:
        if settings and "property" in str(exc).lower():
            raise EdgetlError(f"OpenVINO refused a setting of {dict(settings)}: {str(exc).splitlines()[-1][:160]}") from None
        raise


class OpenVinoModel:
    """An OpenVINO model compiled with an explicit precision; says which precision the plugin chose.

    A dynamic-batch model is also compiled once per batch size it is called with, reshaped to that
    static batch (OpenVINO's Model.reshape): the CPU plugin then plans its memory and kernels for the
    exact shape. Measured on Lite0, batch 1, 2 threads: 0.95x the dynamic model's latency in fp32,
    0.96x in int8 (benchmarks/results/runtime_settings_lite0.md). The few most recent batch sizes are
    kept (each costs one compile, 0.2-0.4 s for Lite0)."""

    STATIC_BATCHES_KEPT = 3

    def __init__(self, path: Any, precision: str = "f32", threads: int | None = None, device: str = "CPU",
                 settings: Mapping[str, str] | None = None, static_batches: bool = True) -> None:  # fmt: skip
        self.model = read_model(path)
        hint_name = PRECISION_HINTS.get(precision, precision)
        self._compile = lambda model: compile_model(model, hint_name, threads, device, settings=settings)
        self.compiled = self._compile(self.model)
        # What the plugin resolved the hints to (recorded by bench in bench.json).
        self.settings = {k: _property(self.compiled, k) for k in SETTINGS_REPORTED}
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(hint.to_string(), hint.to_string())
        self.request = self.compiled.create_infer_request()
        # A model exported with a fixed batch (--batch 1) takes exactly that many rows: predict pads to it.
        batch_dim = self.compiled.input(0).get_partial_shape()[0]
        self.fixed_batch = batch_dim.get_length() if batch_dim.is_static else None
        self.static_batches = static_batches and self.fixed_batch is None
        self.settings["static_batch_compile"] = str(self.static_batches)
        self._requests: dict[int, Any] = {}

    def _request_for(self, n: int) -> Any:
        if not self.static_batches:
            return self.request
        request = self._requests.pop(n, None)
        if request is None:
            import openvino as ov

            shape = self.model.input(0).get_partial_shape()
            static = self.model.clone()
            static.reshape({0: ov.PartialShape([ov.Dimension(n)] + [shape[i] for i in range(1, shape.rank.get_length())])})
            request = self._compile(static).create_infer_request()
            if len(self._requests) >= self.STATIC_BATCHES_KEPT:
                self._requests.pop(next(iter(self._requests)))
        self._requests[n] = request  # most recent last
        return request

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # The caller's array becomes the request's input tensor without a copy, and the request runs
        # with no Python-side input dictionary to convert (what benchmark_app does): measured 3.55 ms
        # against 3.65 ms for infer({0: x}) on Lite0 fp32, 2 threads.
        import openvino as ov

        request = self._request_for(len(x))
        request.set_input_tensor(ov.Tensor(np.ascontiguousarray(x), shared_memory=True))
        request.infer()
        return request.get_output_tensor(0).data.copy()

    def predict(self, x: np.ndarray, batch: int = 32) -> np.ndarray:
        return run_in_chunks(self, x, self.fixed_batch, batch)


SETTINGS_REPORTED = ("PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS", "ENABLE_CPU_PINNING", "INFERENCE_PRECISION_HINT")


def _property(compiled: Any, key: str) -> str:
    try:
        value = compiled.get_property(key)
        return value.to_string() if hasattr(value, "to_string") else str(value)
    except RuntimeError:  # a property another device (GPU) does not have
        return "n/a"


def read_metadata(xml: str | os.PathLike[str]) -> dict[str, str]:
    model = read_model(xml)
    out = {}
    for key in (*metadata.KEYS, *metadata.QUANTIZATION_KEYS):
        path = [metadata.RT_INFO_SECTION, key]
        if model.has_rt_info(path):
            out[key] = model.get_rt_info(path).astype(str)
    return out


def save_model(model: Any, target_xml: Path, meta: dict[str, str], compress_to_fp16: bool = False) -> None:
    """Save an OpenVINO model with `meta` in its rt_info, atomically: the IR pair (.xml + .bin) is
    written to a temporary folder beside the target folder, which then replaces it."""
    import openvino as ov

    for k, v in meta.items():
        model.set_rt_info(v, [metadata.RT_INFO_SECTION, k])
    final_dir = target_xml.parent
    tmp_dir = make_temp_dir(final_dir.parent, final_dir.name)
    try:
        ov.save_model(model, str(tmp_dir / target_xml.name), compress_to_fp16=compress_to_fp16)
        replace_dir(tmp_dir, final_dir)
    except BaseException:
        import shutil

        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
