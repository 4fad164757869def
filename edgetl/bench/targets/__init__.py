"""Built-in targets. Each module registers one or more targets on import; a new target is a sibling module."""

from edgetl.bench.targets import edge, openvino, ort, torch_targets  # noqa: F401 - imported for registration
