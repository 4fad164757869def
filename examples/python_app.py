"""Classify images with an exported edgetl model: onnxruntime + numpy + Pillow, no training stack.

    python examples/python_app.py models/<run>/model.onnx photo.jpg [more.jpg ...]
"""

import sys

from edgetl.runtime import Classifier

if len(sys.argv) < 3:
    sys.exit(__doc__)
clf = Classifier(sys.argv[1])  # labels, resize/crop, interpolation and mean/std come from the model file
for path, pred in zip(sys.argv[2:], clf.predict(sys.argv[2:], top_k=3), strict=True):
    alternatives = ", ".join(f"{label} {p:.0%}" for label, p in pred.top_k[1:])
    print(f"{path}: {pred.label} ({pred.probability:.1%}; then {alternatives})")
