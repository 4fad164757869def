"""PyTorch targets: eager on the CPU, torch.compile on the CPU, and CUDA (fp32, fp16), eager and as CUDA graphs."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import numpy as np

from edgetl.bench.base import Runner, Target, Variant, register

if TYPE_CHECKING:
    import torch  # annotations only: the targets import torch when a variant loads, not at registration


def _torch_available() -> tuple[bool, str]:
    return (True, "") if importlib.util.find_spec("torch") else (False, "torch is not installed")


def _cuda_available() -> tuple[bool, str]:
    ok, why = _torch_available()
    if not ok:
        return ok, why
    import torch

    return (True, "") if torch.cuda.is_available() else (False, "no CUDA device")


def _model_on(v: Variant, threads: int, device: str) -> tuple[torch.nn.Module, torch.dtype]:
    """The variant's checkpoint in eval mode on `device`, in its precision, channels_last (every torch target)."""
    import torch

    from edgetl import checkpoint

    torch.set_num_threads(threads)
    model, _ = checkpoint.load_model(v.model)
    dtype = torch.float16 if v.precision == "fp16" else torch.float32
    return model.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval(), dtype


def _load(device: str, compile_model: bool = False):
    def load(v: Variant, threads: int) -> Runner:
        import torch

        model, dtype = _model_on(v, threads, device)
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


def _load_cuda_graph(v: Variant, threads: int) -> Runner:
    """The model captured as a CUDA graph per input shape (PyTorch's documented whole-network capture): a replay
    launches every kernel at once, where eager mode pays the CPU's launch cost per operator. At batch 1 that
    cost is most of the time (Lite0 on an H100: 3.3-4.2 ms eager, 0.8 ms replayed; benchmarks/results/gpu_h100/)."""
    import torch

    model, dtype = _model_on(v, threads, "cuda")
    graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    @torch.inference_mode()
    def capture(shape: tuple[int, ...]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_in = torch.zeros(shape, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        side = torch.cuda.Stream()  # warm-up on a side stream before capture, as the CUDA-graph docs require
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                model(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_in).float()
        return graph, static_in, static_out

    @torch.inference_mode()
    def run(x: np.ndarray) -> np.ndarray:
        if x.shape not in graphs:
            graphs[x.shape] = capture(x.shape)
        graph, static_in, static_out = graphs[x.shape]
        static_in.copy_(torch.from_numpy(x))  # host to device, cast and layout in one copy
        graph.replay()
        return static_out.cpu().numpy()  # waits for the replay: clocks are read after the GPU has finished

    return run


register(Target("torch-cpu", ("checkpoint",), _torch_available, lambda _p: ["fp32"], _load("cpu"), "PyTorch eager, channels_last"))
register(Target("torch-cpu-compile", ("checkpoint",), _torch_available, lambda _p: ["fp32"], _load("cpu", True),
                "torch.compile (inductor) on the CPU; compile time counts as load time"))  # fmt: skip
register(Target("torch-cuda", ("checkpoint",), _cuda_available, lambda _p: ["fp32", "fp16"], _load("cuda"), "PyTorch eager on CUDA"))
register(Target("torch-cuda-graph", ("checkpoint",), _cuda_available, lambda _p: ["fp32", "fp16"], _load_cuda_graph,
                "PyTorch on CUDA, replayed as a CUDA graph per input shape (capture counts as the first run)"))  # fmt: skip
