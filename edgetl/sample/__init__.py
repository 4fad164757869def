"""The bundled demo sample (CC0 clothing photos), shipped as package data."""

from pathlib import Path


def sample_path() -> Path:
    return Path(__file__).resolve().parent / "clothing"
