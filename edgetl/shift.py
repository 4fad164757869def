"""The shift report: how far target images are from the training images, as the model sees them,
measured without labels, so a user can tell whether adapting helped before labelling anything.

- feature shift: the Fréchet distance between diagonal Gaussians fitted to the pooled backbone
  features of the training images (seen by the trained model) and of the images in question,
  divided by the training features' total variance. Images of the training domain score near the
  in-domain reference (the validation split), a shifted domain well above it.
- mean confidence: the average top softmax probability (a shifted model is usually less sure).
- predicted classes against the training prior: the share of images given each class, and its
  total-variation distance to the training split's class shares (a collapsing model piles onto one class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from edgetl.decoded import DecodedImages
from edgetl.preprocess import PreprocessSpec


@dataclass
class Outputs:
    features: np.ndarray  # (N, D) pooled backbone features
    logits: np.ndarray  # (N, C)

    @property
    def probabilities(self) -> np.ndarray:
        z = self.logits - self.logits.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)


@dataclass(frozen=True)
class FeatureReference:
    """Per-dimension mean and variance of the training images' pooled features."""

    mean: np.ndarray
    var: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureReference:
        f = features.astype(np.float64)
        return cls(f.mean(0), f.var(0))

    def distance(self, features: np.ndarray) -> float:
        f = features.astype(np.float64)
        mean, std = f.mean(0), f.std(0)
        fd = ((mean - self.mean) ** 2).sum() + ((std - np.sqrt(self.var)) ** 2).sum()
        return float(fd / max(self.var.sum(), 1e-12))


@torch.no_grad()
def run_model(model: nn.Module, images: DecodedImages, spec: PreprocessSpec, device: torch.device,
              batch_size: int = 64) -> Outputs:  # fmt: skip
    """Pooled features and logits of an EdgeClassifier (eval mode) on every image, with the evaluation preprocessing."""
    from edgetl.train import EvalImages

    model.eval()
    feats, logits = [], []
    for x, _ in DataLoader(EvalImages(images, spec), batch_size=batch_size, shuffle=False):
        f = model.backbone(x.to(device))
        feats.append(f.float().cpu().numpy())
        logits.append(model.head(f).float().cpu().numpy())
    return Outputs(np.concatenate(feats), np.concatenate(logits))


def describe(outputs: Outputs, reference: FeatureReference, prior: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """The label-free shift numbers of one set of images (and top-1 when `labels` are given)."""
    p = outputs.probabilities
    pred = p.argmax(1)
    shares = np.bincount(pred, minlength=len(prior)) / max(len(pred), 1)
    out: dict[str, Any] = {
        "images": len(pred),
        "feature_shift": reference.distance(outputs.features),
        "mean_confidence": float(p.max(1).mean()),
        "mean_entropy": float(-(p * np.log(np.clip(p, 1e-12, 1))).sum(1).mean()),
        "predicted_shares": shares.round(4).tolist(),
        "prior_distance": float(0.5 * np.abs(shares - prior).sum()),
    }
    if labels is not None:
        out["top1"] = float((pred == labels).mean())
    return out
