"""The model formats edgetl exports, and how a --format value names them. Torch-free."""

from __future__ import annotations

from edgetl.errors import EdgetlError

FORMATS = ("onnx", "openvino", "litert", "executorch")
# "all" is the core formats; LiteRT and ExecuTorch need their extras and are asked for by name ("all,litert").
ALL_FORMATS = ("onnx", "openvino")


def parse_formats(text: str) -> tuple[str, ...]:
    """'all', one format, or a comma-separated list ('onnx,litert') -> the formats, in FORMATS order."""
    asked: set[str] = set()
    for word in (w.strip() for w in text.split(",")):
        if word == "all":
            asked.update(ALL_FORMATS)
        elif word in FORMATS:
            asked.add(word)
        else:
            raise EdgetlError(f"unknown format {word!r}: choose from {', '.join(FORMATS)} or all (comma-separated for several)")
    return tuple(f for f in FORMATS if f in asked)
