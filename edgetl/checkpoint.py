"""Checkpoints: weights plus everything needed to rebuild and preprocess for the model.

Saved with torch.save of plain containers and tensors only, so loading uses weights_only=True and
never unpickles code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from edgetl import run
from edgetl.errors import EdgetlError
from edgetl.fileio import write_with
from edgetl.model import EdgeClassifier, build_classifier
from edgetl.preprocess import PreprocessSpec

FORMAT = "edgetl.checkpoint"
FORMAT_VERSION = 1
BEST_NAME = run.CHECKPOINT  # the run folder's layout lives in edgetl.run
LAST_NAME = run.LAST


def save(target: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    write_with(target, lambda p: torch.save(payload, p))


def resolve(run_or_file: str | os.PathLike[str], name: str = BEST_NAME) -> Path:
    path = Path(run_or_file)
    if path.is_dir():
        path = path / name
    if not path.exists():
        raise EdgetlError(f"no checkpoint at {path}: is {run_or_file} an edgetl run folder?")
    return path


def read(run_or_file: str | os.PathLike[str], name: str = BEST_NAME) -> dict[str, Any]:
    path = resolve(run_or_file, name)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EdgetlError(f"{path} is not a readable edgetl checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise EdgetlError(f"{path} is not an edgetl checkpoint")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise EdgetlError(f"{path} was written by a newer edgetl (format {ckpt['format_version']}); upgrade edgetl")
    ckpt["path"] = str(path)
    return ckpt


def build_model(ckpt: dict[str, Any]) -> EdgeClassifier:
    cfg = ckpt["config"]
    model = build_classifier(cfg["backbone"], len(cfg["labels"]), cfg["head"]["hidden"], cfg["head"]["dropout"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def load_model(run_or_file: str | os.PathLike[str]) -> tuple[EdgeClassifier, dict[str, Any]]:
    ckpt = read(run_or_file)
    return build_model(ckpt), ckpt


def spec_of(ckpt: dict[str, Any]) -> PreprocessSpec:
    return PreprocessSpec.from_dict(ckpt["config"]["preprocess"])
