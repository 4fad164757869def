"""PyTorch targets: eager on the CPU, torch.compile on the CPU, and CUDA (fp32, fp16)."""

from __future__ import annotations

import importlib.util

import numpy as np

from edgetl.bench.base import Runner, Target, Variant, register


def _torch_available() -> tuple[bool, str]:
    return (True, "") if importlib.util.find_spec("torch") else (False, "torch is not installed")


def _cuda_available() -> tuple[bool, str]:
    ok, why = _torch_available()
    if not ok:
        return ok, why
    import torch

    return (True, "") if torch.cuda.is_available() else (False, "no CUDA device")


def _load(device: str, compile_model: bool = False):
    def load(v: Variant, threads: int) -> Runner:
        import torch

        from edgetl import checkpoint

        torch.set_num_threads(threads)
        model, _ = checkpoint.load_model(v.model)
        dtype = torch.float16 if v.precision == "fp16" else torch.float32
        model = model.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
        if compile_model:
            model = torch.compile(model)

        @torch.inference_mode()
        def run(x: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(x).to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            out = model(t).float()
            if device == "cuda":
                torch.cuda.synchronize()  # clocks are read after the GPU has finished
            return out.cpu().numpy()

        return run

    return load


register(Target("torch-cpu", ("checkpoint",), _torch_available, lambda _p: ["fp32"], _load("cpu"), "PyTorch eager, channels_last"))
register(Target("torch-cpu-compile", ("checkpoint",), _torch_available, lambda _p: ["fp32"], _load("cpu", True),
                "torch.compile (inductor) on the CPU; compile time counts as load time"))  # fmt: skip
register(Target("torch-cuda", ("checkpoint",), _cuda_available, lambda _p: ["fp32", "fp16"], _load("cuda"), "PyTorch eager on CUDA"))
