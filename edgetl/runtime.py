"""Classify images with an exported edgetl model using only numpy, Pillow and onnxruntime.

    from edgetl.runtime import Classifier
    clf = Classifier("model.onnx")          # or "model.tflite" (ai-edge-litert instead of onnxruntime)
    print(clf.predict("photo.jpg").label)

Everything the model needs (labels, resize and crop, interpolation, mean/std, layout) is read from
its metadata, and the pixels are prepared by edgetl.preprocess: the same code training used for
evaluation, so the app sees what the trained model saw. Importing this module never imports torch
(a test runs it with torch blocked); an app installs edgetl with --no-deps plus numpy, Pillow and
onnxruntime (or ai-edge-litert for a .tflite), as the README says.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from edgetl import metadata
from edgetl.preprocess import decode_image, normalize, resize_and_crop
from edgetl.runners import run_in_chunks

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]  # noqa: UP007 - a runtime alias


@dataclass(frozen=True)
class Prediction:
    label: str
    probability: float
    top_k: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"label": self.label, "probability": self.probability,
                "top_k": [{"label": lb, "probability": p} for lb, p in self.top_k]}  # fmt: skip


# Exported edgetl models that need a runtime of their own (and torch, for ExecuTorch's Python bindings).
_OTHER_RUNTIMES = {".pte": "an ExecuTorch program (ExecuTorch's runtime)", ".xml": "an OpenVINO model (OpenVINO's runtime)",
                   ".bin": "the weights of an OpenVINO model (OpenVINO's runtime, from its .xml)"}  # fmt: skip


class Classifier:
    """An exported edgetl model, ONNX (onnxruntime) or LiteRT .tflite (the ai-edge-litert interpreter),
    ready to classify images. ONNX models are safe to call from several threads (onnxruntime sessions
    are, and nothing here is mutated after construction); a LiteRT interpreter is not: use one
    Classifier per thread."""

    def __init__(self, model_path: str | os.PathLike[str], providers: Sequence[str] | None = None, threads: int | None = None) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"no model file at {path}")
        other = _OTHER_RUNTIMES.get(path.suffix.lower())
        if other is not None:  # not a file onnxruntime's protobuf parser should be the one to refuse
            raise ValueError(f"{path} is {other}: this runtime (and `edgetl predict`) runs edgetl's .onnx and .tflite models; "
                             f"`edgetl bench {path} --data DIR` scores it in its own runtime")  # fmt: skip
        if path.suffix.lower() == ".tflite":
            from edgetl.backends.litert import LiteRtModel

            self.model: Any = LiteRtModel(path, threads=threads)
            self.session = None
        else:
            from edgetl.backends.onnxruntime import OrtModel

            self.model = OrtModel(path, threads=threads, providers=providers)
            self.session = self.model.session
        self.metadata = self.model.metadata
        # Checked once here against the graph: a model with untrustworthy metadata fails now with one
        # message (a ValueError), not later on every image.
        self.spec = metadata.validate(self.metadata, str(path), self.model.input_name, self.model.input_shape,
                                      self.model.input_type, self.model.output_shape)  # fmt: skip
        self.labels = metadata.labels_from(self.metadata)
        self.pixels_in = self.metadata.get("preprocessing_in_graph") == "true"
        self.input_name = self.model.input_name
        self.fixed_batch = self.model.fixed_batch

    def prepare(self, image: ImageInput) -> np.ndarray:
        """One image -> the model's input row (uint8 HWC crop, or float CHW normalised)."""
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3, 4):
                raise ValueError("arrays must be uint8 HxWxC (C = 1, 3 or 4) RGB pixels")
            image = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
        img = decode_image(image)
        crop = np.asarray(resize_and_crop(img, self.spec))
        return crop if self.pixels_in else normalize(crop, self.spec)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        if not self.fixed_batch:
            return self.model(batch)
        return run_in_chunks(self.model, batch, self.fixed_batch)

    def predict(self, images: ImageInput | list[ImageInput], top_k: int = 5) -> Prediction | list[Prediction]:
        """Labels with probabilities for one image (a Prediction) or a list (a list, run as one batch)."""
        single = not isinstance(images, list)
        out = self.predict_prepared(np.stack([self.prepare(im) for im in ([images] if single else images)]), top_k)  # type: ignore[list-item]
        return out[0] if single else out

    def predict_prepared(self, batch: np.ndarray, top_k: int = 5) -> list[Prediction]:
        """Predictions for rows already made by `prepare` (stacked)."""
        probs = softmax(self.logits(batch))
        k = max(1, min(top_k, len(self.labels)))
        out = []
        for p in probs:
            order = np.argsort(-p)[:k]
            out.append(Prediction(self.labels[order[0]], float(p[order[0]]), [(self.labels[i], float(p[i])) for i in order]))
        return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
