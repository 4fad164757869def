"""ONNX Runtime targets: CPU, and CUDA when onnxruntime-gpu provides it."""

from __future__ import annotations

import importlib.util

from edgetl.bench.base import Runner, Target, Variant, register


def _cpu_available() -> tuple[bool, str]:
    return (True, "") if importlib.util.find_spec("onnxruntime") else (False, "onnxruntime is not installed")


def _cuda_available() -> tuple[bool, str]:
    ok, why = _cpu_available()
    if not ok:
        return ok, why
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu on a CUDA machine)"
    return True, ""


def _load(provider: str):
    def load(v: Variant, threads: int) -> Runner:
        from edgetl.backends.onnxruntime import OrtModel

        return OrtModel(v.model, threads=threads, providers=[provider], settings=dict(v.settings))

    return load


register(Target("ort-cpu", ("onnx",), _cpu_available, lambda p: [p], _load("CPUExecutionProvider"), "ONNX Runtime, CPU provider"))
register(Target("ort-cuda", ("onnx",), _cuda_available, lambda p: [p], _load("CUDAExecutionProvider"), "ONNX Runtime, CUDA provider"))
