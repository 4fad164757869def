"""ExecuTorch programs (.pte) in ExecuTorch's Python runtime, with their edgetl metadata in a sidecar.

A .pte file has no table for producer metadata, so the metadata contract (the same flat keys as the
ONNX metadata_props) lives beside it in `<file>.json` ("model.pte" -> "model.pte.json"); the sidecar
is written before the program, so a program never appears without its description.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import EdgetlError
from edgetl.native_stderr import dropping_native_lines

EXTRA_HINT = "pip install 'edgetl[executorch]'"


class ExecuTorchLoadError(EdgetlError, ValueError):
    """A file ExecuTorch's runtime cannot load."""


def sidecar(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".json")


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The edgetl metadata of a .pte file, from its sidecar ({} when there is none)."""
    side = sidecar(path)
    if not side.is_file():
        return {}
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        raise ExecuTorchLoadError(f"{side} is not readable JSON") from None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ExecuTorchLoadError(f"{side} is not a map of strings (edgetl metadata)")
    return meta


def runtime() -> Any:
    try:
        from executorch.runtime import Runtime
    except ImportError:
        raise EdgetlError(f"running a .pte program needs ExecuTorch: {EXTRA_HINT}") from None
    rt = Runtime.get()
    _threadpool()
    return rt


# The C++ lines ExecuTorch's CPU probe prints when its thread pool starts, on every host that is not ARM
# ("[cpuinfo_utils.cpp:87] Failed to open midr file ..."): about ARM core types, nothing a user can act on.
_CPU_PROBE_LINES = "[cpuinfo_utils.cpp:"


@functools.cache
def _threadpool() -> Any:
    """ExecuTorch's pybindings, with XNNPACK's process-wide thread pool started: it starts at its first use,
    which happens here (once a process) with the CPU probe's lines dropped."""
    from executorch.extension.pybindings import portable_lib

    with dropping_native_lines(_CPU_PROBE_LINES):
        portable_lib._threadpool_get_thread_count()
    return portable_lib


def set_threads(threads: int | None) -> None:
    """XNNPACK's thread pool is process-wide in ExecuTorch; `_unsafe_reset_threadpool` is the runtime's
    own (and only) knob for its size, safe while no program is executing."""
    if not threads:
        return
    portable_lib = _threadpool()
    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)


class ExecuTorchModel:
    """The `forward` method of a .pte program: called on float NCHW numpy batches like the other runners.
    edgetl exports programs for batch 1 (XNNPACK's mobile case); larger batches run row by row."""

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        import torch

        self.path = str(path)
        p = Path(path)
        if not p.is_file():
            raise ExecuTorchLoadError(f"no model file at {p}")
        self.metadata = read_metadata(p)
        rt = runtime()
        set_threads(threads)
        try:
            self.method = rt.load_program(p).load_method("forward")
        except Exception as exc:
            detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise ExecuTorchLoadError(f"{p} is not a program ExecuTorch can load: {detail}") from None
        sizes = list(self.method.metadata.input_tensor_meta(0).sizes())
        self.input_shape: list[Any] = sizes
        self.fixed_batch = int(sizes[0]) if sizes else None
        self.precision = "int8" if "quantization" in self.metadata else "fp32"
        self._torch = torch

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.fixed_batch and len(x) != self.fixed_batch:
            from edgetl.runners import run_in_chunks

            return run_in_chunks(self, x, self.fixed_batch)
        out = self.method.execute([self._torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))])
        return out[0].numpy().copy()

    def predict(self, x: np.ndarray, batch: int = 32) -> np.ndarray:
        return self(x)
