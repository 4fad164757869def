"""Keep OpenVINO's and NNCF's usage telemetry off in any process that imports edgetl.

`import openvino` alone (and every `convert_model`, every NNCF quantization) queues an event for
Google Analytics: a background thread forks a process that tries to post it, whatever the network.
edgetl makes no network call at run time, so the tools' events are dropped here the way both
tools provide for: each falls back to its own no-op stub when `openvino_telemetry` cannot be
imported (openvino.tools.ovc.telemetry_stub, nncf's NNCFTelemetryStub).

This runs on `import edgetl`, so before edgetl imports either tool. It leaves alone a process that
imported `openvino_telemetry` before edgetl (that app chose), and a user who sets
EDGETL_OPENVINO_TELEMETRY=1 gets OpenVINO's own setting back (`opt_in_out`). The user's consent
file is never written.
"""

from __future__ import annotations

import os
import sys

TELEMETRY_PACKAGE = "openvino_telemetry"
KEEP_ENV = "EDGETL_OPENVINO_TELEMETRY"


def keep_openvino_telemetry_off() -> bool:
    """Make `import openvino_telemetry` fail in this process, unless the user asked for it or it is
    already imported; True when it is now off."""
    if os.environ.get(KEEP_ENV) == "1" or TELEMETRY_PACKAGE in sys.modules:
        return False
    sys.modules[TELEMETRY_PACKAGE] = None  # type: ignore[assignment] - Python's documented import block
    return True
