"""ONNX Runtime on the CPU (or another execution provider). Torch-free."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import EdgetlError
from edgetl.runners import run_in_chunks


class ModelLoadError(EdgetlError, ValueError):
    """A file onnxruntime cannot load (a ValueError too, for apps that only know the runtime)."""


# Settings edgetl applies beyond ONNX Runtime's defaults: none. benchmarks/runtime_settings.py measured
# every latency setting ORT's docs name against its defaults (Lite0, batch 1, 2 threads, AVX-512 VNNI)
# and none was faster: no spinning 1.16-1.26x, opt level "extended" 3.7x (fp32), the rest within 3%.
# A measured winner on another CPU goes here; keys are SessionOptions attributes or ORT config keys.
LATENCY_DEFAULTS: dict[str, str] = {}

_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def session_options(threads: int | None = None, spinning: bool | None = None, profile: bool = False,
                    optimized_model: str | None = None, settings: Mapping[str, str] | None = None) -> Any:  # fmt: skip
    """SessionOptions with the settings edgetl names: intra-op threads, whether idle intra-op threads
    spin (ONNX Runtime's default is to spin, which takes the cores from any other runtime in the same
    process; see bench), and `settings`: "graph_optimization_level" (disable|basic|extended|all),
    "enable_mem_pattern" / "enable_cpu_mem_arena" (true|false), or any ORT session config key
    ("session.intra_op.allow_spinning", "session.dynamic_block_base", ...)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    for key, value in (settings or {}).items():
        if key == "graph_optimization_level":
            if value not in _OPT_LEVELS:
                raise EdgetlError(f"graph_optimization_level must be one of {', '.join(_OPT_LEVELS)}, got {value!r}")
            opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[value])
        elif key in ("enable_mem_pattern", "enable_cpu_mem_arena"):
            setattr(opts, key, str(value).lower() in ("1", "true", "yes"))
        elif "." in key:
            opts.add_session_config_entry(key, str(value))
        else:
            raise EdgetlError(f"unknown ONNX Runtime setting {key!r}")
    if profile:
        opts.enable_profiling = True
    if optimized_model:
        opts.optimized_model_filepath = optimized_model
    return opts


def load_session(path: str | os.PathLike[str], opts: Any = None, providers: Sequence[str] | None = None) -> Any:
    """An InferenceSession, or one clear error for a file onnxruntime cannot load."""
    import onnxruntime as ort

    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"no model file at {p}")
    try:
        return ort.InferenceSession(str(p), opts or ort.SessionOptions(), providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types for unloadable files
        detail = str(exc).splitlines()[0][-160:] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"{p} is not an ONNX model onnxruntime can load: {detail}") from None


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The model's metadata_props as onnxruntime (what an app has) reads them."""
    return dict(load_session(path).get_modelmeta().custom_metadata_map)


class OrtModel:
    """An ONNX model in an ONNX Runtime session: call it on a numpy batch."""

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None, spinning: bool | None = None,
                 providers: Sequence[str] | None = None, settings: Mapping[str, str] | None = None) -> None:  # fmt: skip
        self.path = str(path)
        # What this session runs with, beyond ORT's defaults: recorded by bench (bench.json).
        self.settings = {**LATENCY_DEFAULTS, **(settings or {})}
        if threads:
            self.settings["intra_op_num_threads"] = str(threads)
        self.session = load_session(path, session_options(threads, spinning, settings=self.settings_for_ort()), providers)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = list(inp.shape)
        self.input_type = inp.type
        self.output_shape = list(self.session.get_outputs()[0].shape)
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        # ORT's CPU provider runs float graphs in fp32; int8 graphs say so in their metadata.
        self.precision = "int8" if "quantization" in self.metadata else "fp32"

    def settings_for_ort(self) -> dict[str, str]:
        return {k: v for k, v in self.settings.items() if k != "intra_op_num_threads"}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def predict(self, x: np.ndarray, batch: int = 32) -> np.ndarray:
        return run_in_chunks(self, x, self.fixed_batch, batch)
