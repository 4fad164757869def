"""Run exported models on numpy batches: ONNX Runtime and OpenVINO on the CPU. Torch-free."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np


def batches(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(x), size):
        yield x[i : i + size]


def run_in_chunks(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, fixed_batch: int | None, batch: int = 32) -> np.ndarray:
    """`run` over `x` in chunks. A model exported with a fixed batch gets chunks of exactly that size:
    the last one is padded with zeros and only its real rows are kept."""
    step = fixed_batch or batch
    out = []
    for chunk in batches(x, step):
        n = len(chunk)
        if fixed_batch and n < step:
            chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), dtype=chunk.dtype)])
        out.append(run(chunk)[:n])
    return np.concatenate(out)


class OrtModel:
    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = str(path)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.fixed_batch = self.session.get_inputs()[0].shape[0] if isinstance(self.session.get_inputs()[0].shape[0], int) else None
        self.precision = "fp32"  # ORT's CPU provider runs float graphs in fp32 (int8 graphs say so in their metadata)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def predict(self, x: np.ndarray, batch: int = 32) -> np.ndarray:
        return run_in_chunks(self, x, self.fixed_batch, batch)


class OpenVinoModel:
    """An OpenVINO model compiled for the CPU with an explicit inference precision.

    OpenVINO picks bf16 by default on CPUs that have it, which changes the numbers; edgetl always
    says which precision it asked for and reads back what the plugin chose.
    """

    def __init__(self, path: str | os.PathLike[str], precision: str = "f32", threads: int | None = None) -> None:
        import openvino as ov

        core = ov.Core()
        config: dict[str, object] = {"INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(hint.to_string(), hint.to_string())
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.array(self.request.infer({0: x})[0], copy=True)

    def predict(self, x: np.ndarray, batch: int = 32) -> np.ndarray:
        return np.concatenate([self(b) for b in batches(x, batch)])
