"""The runtimes' usage telemetry (OpenVINO, NNCF, ONNX Runtime) stays off in edgetl's processes: no network at run time
(and importing NNCF's PyTorch side logs nothing about a CUDA toolkit)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import one_node_onnx

# Records every fork in this process (OpenVINO's telemetry sender forks one to post each event) and refuses every
# connection, so the test itself never reaches the network.
SCRIPT = """
import os, socket, sys
fork_log, model_path = sys.argv[1], sys.argv[2]
os.register_at_fork(before=lambda: open(fork_log, "a").write("fork\\n"))
def refuse(*args, **kwargs):
    raise OSError("no network in this test")
socket.socket.connect = refuse
import edgetl
import openvino as ov
import nncf.telemetry.wrapper as nncf_telemetry
ov.convert_model(model_path)
print("nncf-stub" if isinstance(nncf_telemetry.telemetry, nncf_telemetry.NNCFTelemetryStub) else "nncf-live")
print("ORT_DISABLE_TELEMETRY=" + os.environ.get("ORT_DISABLE_TELEMETRY", "unset"))  # what ONNX Runtime and children see
import nncf.torch  # what nncf.quantize imports to ask whether a model is PyTorch's (CUDA_HOME is set: see below)
"""


def _forks_while_converting(tmp_path: Path, name: str, extra_env: dict[str, str]) -> tuple[int, list[str]]:
    home = tmp_path / f"home-{name}"  # no consent file: OpenVINO's default (telemetry on) applies
    home.mkdir()
    # CI and the others would turn OpenVINO's telemetry off by themselves; this process's ORT setting is edgetl's own.
    unset = ("CI", "TF_BUILD", "JENKINS_URL", "EDGETL_ALLOW_TELEMETRY", "ORT_DISABLE_TELEMETRY")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    # A CUDA toolkit without a GPU (or a CPU-only torch): torch.utils.cpp_extension logs at import unless quietened.
    env.update(HOME=str(home), CUDA_HOME=str(tmp_path), **extra_env)
    if env.get("EDGETL_ALLOW_TELEMETRY") == "1":
        # This case provokes OpenVINO's telemetry on purpose (the script refuses its connection itself), so the
        # suite's network guard (tests/no_network) stays off in it.
        env.pop("EDGETL_TEST_NETWORK_LOG", None)
    log = tmp_path / f"forks-{name}.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log), str(one_node_onnx(tmp_path / "relu.onnx"))],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "No CUDA runtime is found" not in proc.stderr  # edgetl's output carries no log about building CUDA code
    return (len(log.read_text().splitlines()) if log.exists() else 0), proc.stdout.split()


def test_telemetry_is_off_once_edgetl_is_imported(tmp_path: Path) -> None:
    forks, said = _forks_while_converting(tmp_path, "edgetl", {})
    assert forks == 0
    # ONNX Runtime's own opt-out (it posts from C++, some seconds after the first session: checked with strace).
    assert said == ["nncf-stub", "ORT_DISABLE_TELEMETRY=1"]


def test_the_user_can_have_the_libraries_own_settings_back(tmp_path: Path) -> None:
    # Also shows the check above can see telemetry: with OpenVINO's own default it forks its sender.
    forks, said = _forks_while_converting(tmp_path, "own", {"EDGETL_ALLOW_TELEMETRY": "1"})
    assert forks >= 1
    assert said == ["nncf-live", "ORT_DISABLE_TELEMETRY=unset"]


def test_an_onnxruntime_setting_of_the_users_is_kept(tmp_path: Path) -> None:
    _, said = _forks_while_converting(tmp_path, "ort", {"ORT_DISABLE_TELEMETRY": "0"})
    assert said == ["nncf-stub", "ORT_DISABLE_TELEMETRY=0"]
