"""Keep the runtimes' usage telemetry off in any process that imports edgetl: no network at run time.

Two of edgetl's dependencies send usage events by default; edgetl turns each off the way the library
itself provides:

- OpenVINO and NNCF: `import openvino` (and every `convert_model`, every NNCF quantization) queues an
  event for Google Analytics, posted from a forked process. Both tools fall back to their own no-op
  stub when `openvino_telemetry` cannot be imported (openvino.tools.ovc.telemetry_stub, nncf's
  NNCFTelemetryStub), so edgetl blocks that import. The user's consent file is never written.
- ONNX Runtime (1.29 and later on Linux and macOS): a 1DS uploader posts to Microsoft some seconds
  after the first session. `ORT_DISABLE_TELEMETRY=1`, set before ONNX Runtime starts, turns it off
  entirely; edgetl sets it, so the processes it starts (bench workers, tools) inherit it.

This runs on `import edgetl`, so before edgetl imports any of them. It leaves alone what the user
decided: an `ORT_DISABLE_TELEMETRY` already set, an `openvino_telemetry` an app imported before edgetl,
and everything when EDGETL_ALLOW_TELEMETRY=1 (the libraries' own defaults and settings then apply).
"""

from __future__ import annotations

import os
import sys

ALLOW_ENV = "EDGETL_ALLOW_TELEMETRY"
OPENVINO_TELEMETRY_PACKAGE = "openvino_telemetry"
ORT_OPT_OUT_ENV = "ORT_DISABLE_TELEMETRY"


def keep_telemetry_off() -> None:
    """Turn off what is still on, unless the user allowed telemetry."""
    if os.environ.get(ALLOW_ENV) == "1":
        return
    if OPENVINO_TELEMETRY_PACKAGE not in sys.modules:
        sys.modules[OPENVINO_TELEMETRY_PACKAGE] = None  # type: ignore[assignment] - Python's documented import block
    os.environ.setdefault(ORT_OPT_OUT_ENV, "1")
