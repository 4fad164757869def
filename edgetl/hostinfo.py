"""What machine and libraries produced a result, for manifests and benchmark files."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from functools import cache
from typing import Any

_LIBRARIES = (
    "edgetl", "torch", "torchvision", "timm", "numpy", "pillow", "onnx", "onnxruntime", "onnxruntime-gpu",
    "openvino", "nncf", "ai-edge-litert", "tensorflow", "onnx2tf", "executorch", "torchao",
)  # fmt: skip


@cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def has_vnni() -> bool:
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


def has_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def has_amx_bf16() -> bool:
    """bf16 matrix tiles (Sapphire Rapids and later): where bf16 training on a CPU is faster than fp32."""
    return "amx_bf16" in cpu_flags()


def library_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in _LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def gpu_record() -> list[dict[str, Any]]:
    """The CUDA devices torch sees (empty without one), so a GPU timing names the card it ran on. Only asked of torch
    when it is imported already: a host record must not pull torch into a process that does not use it."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                    "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda})  # fmt: skip
    return out


def gpu_summary(host: dict[str, Any]) -> str:
    """'; GPU <name> (<memory> GiB, CUDA <version>)' per device of a host record, for one-line host descriptions."""
    return "".join(f"; GPU {g['name']} ({g['memory_gib']} GiB, CUDA {g['cuda']})" for g in host.get("gpus", []))


def host_lines(host: dict[str, Any]) -> list[str]:
    """A host record as the two lines every report ends with: the CPU (and GPUs), then the library versions."""
    return [
        f"Host: {host['cpu_model']}, {host['cores_available']} cores, flags {' '.join(host['cpu_flags'])} "
        f"(VNNI: {host['vnni']}, bf16: {host['bf16']})" + gpu_summary(host) + ".",
        "Libraries: " + ", ".join(f"{k} {v}" for k, v in host["libraries"].items()) + ".",
    ]


def host_record() -> dict[str, Any]:
    flags = cpu_flags()
    interesting = sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c", "sse4_2"))
    try:
        physical = len(os.sched_getaffinity(0))
    except AttributeError:
        physical = os.cpu_count() or 1
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": interesting,
        "vnni": has_vnni(),
        "bf16": has_bf16(),
        "cores_available": physical,
        "platform": platform.platform(),
        "libraries": library_versions(),
        "gpus": gpu_record(),
    }


def physical_cores() -> int:
    """Physical cores this process may run on: the default thread count of every runtime edgetl drives."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:
        n = None
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n or avail, avail))
