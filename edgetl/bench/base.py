"""What a benchmark target is: something that can say whether it is usable here, load a model file
in a precision, and run a numpy batch. Targets register themselves by name (see targets/)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Variant:
    """One thing to measure: a model file, in a precision, on a target."""

    target: str
    model: Path
    kind: str  # "checkpoint" | "onnx" | "openvino" | "litert" | "executorch"
    precision: str  # fp32 | fp16 | bf16 | int8
    input_dtype: str = "float32"  # or "uint8" for models with preprocessing in the graph
    note: str = ""
    # Runtime settings beyond edgetl's defaults (the runtime's own option names), as (key, value) pairs.
    settings: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return f"{self.target}/{self.precision}" + (f" ({self.note})" if self.note else "")

    @property
    def runtime(self) -> str:
        """Variants of one runtime share an fp32 reference for the speed ratio: torch.compile is
        compared with eager PyTorch on the same device."""
        return self.target.replace("-compile", "")


@dataclass
class Target:
    name: str
    kinds: tuple[str, ...]  # model kinds it can run
    available: Callable[[], tuple[bool, str]]  # (usable here?, reason when not)
    precisions: Callable[[str], list[str]]  # precisions offered for a model kind+precision on this host
    load: Callable[[Variant, int], Runner]  # variant, threads -> a callable on numpy batches
    description: str = ""
    extra: dict[str, str] = field(default_factory=dict)


TARGETS: dict[str, Target] = {}


def register(target: Target) -> Target:
    if target.name in TARGETS:
        raise ValueError(f"target {target.name!r} registered twice")
    TARGETS[target.name] = target
    return target
