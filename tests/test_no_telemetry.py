"""OpenVINO's and NNCF's usage telemetry stays off in edgetl's processes: no network at run time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

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
"""


def _relu_model(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _forks_while_converting(tmp_path: Path, name: str, extra_env: dict[str, str]) -> tuple[int, str]:
    home = tmp_path / f"home-{name}"  # no consent file: OpenVINO's default (telemetry on) applies
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL", "EDGETL_OPENVINO_TELEMETRY")}
    env.update(HOME=str(home), **extra_env)  # those variables would turn OpenVINO's telemetry off by themselves
    log = tmp_path / f"forks-{name}.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log), str(_relu_model(tmp_path / "relu.onnx"))],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return (len(log.read_text().splitlines()) if log.exists() else 0), proc.stdout.strip()


def test_openvino_and_nncf_telemetry_are_off_once_edgetl_is_imported(tmp_path: Path) -> None:
    forks, nncf_state = _forks_while_converting(tmp_path, "edgetl", {})
    assert forks == 0
    assert nncf_state == "nncf-stub"


def test_the_user_can_have_openvinos_own_telemetry_setting_back(tmp_path: Path) -> None:
    # Also shows the check above can see telemetry: with OpenVINO's own default it forks its sender.
    forks, nncf_state = _forks_while_converting(tmp_path, "own", {"EDGETL_OPENVINO_TELEMETRY": "1"})
    assert forks >= 1
    assert nncf_state == "nncf-live"
