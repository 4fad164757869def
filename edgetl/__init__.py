"""edgetl: a folder of labelled images to a fast, small classifier for the edge."""

import logging

from edgetl.no_telemetry import keep_telemetry_off

__version__ = "0.1.0"

keep_telemetry_off()  # before any edgetl module imports openvino, nncf or onnxruntime

# NNCF tells a PyTorch model from others by importing nncf.torch, which imports torch.utils.cpp_extension: on a
# host with a CUDA toolkit (nvcc on PATH or CUDA_HOME) and no GPU, that logs "No CUDA runtime is found" in the
# middle of `edgetl quantize`. It is about compiling CUDA extensions, which edgetl never does.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
# torchao (under ExecuTorch's int8 lowering) registers an Enum with torch's pytree at import, which logs a
# deprecation warning about torch.compile's own handling of Enums into `edgetl export --format executorch`.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
