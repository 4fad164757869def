"""Feeding numpy batches to any runner (see edgetl.backends for the runtimes). Torch-free."""

from __future__ import annotations

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
