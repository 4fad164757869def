"""Edge runtimes on this CPU: LiteRT (the ai-edge-litert interpreter with its XNNPACK delegate) and
ExecuTorch (its Python runtime, XNNPACK delegate). Both run float NCHW batches like the others; each
sets its own thread count (LiteRT per interpreter, ExecuTorch for its process-wide XNNPACK pool)."""

from __future__ import annotations

import importlib.util

from edgetl.bench.base import Runner, Target, Variant, register


def _available(module: str, extra: str):
    def check() -> tuple[bool, str]:
        if importlib.util.find_spec(module) is None:
            return False, f"{module} is not installed (pip install 'edgetl[{extra}]')"
        return True, ""

    return check


def _load_litert(v: Variant, threads: int) -> Runner:
    from edgetl.backends.litert import LiteRtModel

    return LiteRtModel(v.model, threads=threads)


def _load_executorch(v: Variant, threads: int) -> Runner:
    from edgetl.backends.executorch import ExecuTorchModel

    return ExecuTorchModel(v.model, threads=threads)


register(Target("litert-cpu", ("litert",), _available("ai_edge_litert", "litert"), lambda p: [p], _load_litert,
                "LiteRT interpreter, XNNPACK delegate"))  # fmt: skip
register(Target("executorch-cpu", ("executorch",), _available("executorch", "executorch"), lambda p: [p], _load_executorch,
                "ExecuTorch runtime, XNNPACK delegate (batch-1 program)"))  # fmt: skip
