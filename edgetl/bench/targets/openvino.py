"""OpenVINO targets: CPU (fp32, and bf16 as a precision of its own where the CPU has it) and GPU."""

from __future__ import annotations

import importlib.util

from edgetl.bench.base import Runner, Target, Variant, register
from edgetl.hostinfo import has_bf16


def _available(device: str):
    def check() -> tuple[bool, str]:
        if not importlib.util.find_spec("openvino"):
            return False, "openvino is not installed"
        import openvino as ov

        if device not in ov.Core().available_devices:
            return False, f"OpenVINO sees no {device} device"
        return True, ""

    return check


def _cpu_precisions(stored: str) -> list[str]:
    # An fp32 IR can also run with bf16 inference precision; OpenVINO picks bf16 by default where the
    # CPU has it, so edgetl always names the precision and measures each separately.
    return ["fp32", "bf16"] if stored == "fp32" and has_bf16() else [stored]


def _load(device: str):
    def load(v: Variant, threads: int) -> Runner:
        from edgetl.backends.openvino import OpenVinoModel

        # int8 IRs run their non-int8 parts in f32; the precision of a float IR is named, never left to OpenVINO.
        model = OpenVinoModel(v.model, precision=v.precision, threads=threads, device=device, settings=dict(v.settings))
        if v.precision == "int8":  # the plugin reports the hint (f32): say what runs, int8 layers and f32 for the rest
            model.precision = f"int8+{model.precision}"
        return model

    return load


register(Target("openvino-cpu", ("openvino",), _available("CPU"), _cpu_precisions, _load("CPU"), "OpenVINO CPU plugin"))
register(Target("openvino-gpu", ("openvino",), _available("GPU"), lambda p: [p], _load("GPU"), "OpenVINO GPU plugin"))
