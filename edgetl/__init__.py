"""edgetl: a folder of labelled images to a fast, small classifier for the edge."""

from edgetl.no_telemetry import keep_telemetry_off

__version__ = "0.1.0"

keep_telemetry_off()  # before any edgetl module imports openvino, nncf or onnxruntime
