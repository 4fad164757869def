"""The suite's check of "no network at run time" (tests/no_network): it must see and refuse each way out, leave
loopback open, and reach the suite's own process and its children."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NETWORK_GUARD, new_network_attempts


def _guarded_child(tmp_path: Path, code: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """Runs `code` in a fresh interpreter guarded with a log of its own; returns the process and that log."""
    log = tmp_path / "attempts.log"
    env = {**os.environ, "EDGETL_TEST_NETWORK_LOG": str(log), "PYTHONPATH": str(NETWORK_GUARD)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    return proc, (log.read_text() if log.exists() else "")


@pytest.mark.parametrize(
    ("code", "logged"),
    [
        (
            "import urllib.request; urllib.request.urlopen('https://example.com/weights.pth', timeout=5)",
            "requests https://example.com/weights.pth",
        ),
        ("import socket; socket.getaddrinfo('pypi.org', 443)", "looks up 'pypi.org'"),
        ("import socket; socket.socket().connect(('192.0.2.1', 80))", "connects to ('192.0.2.1', 80)"),
        ("import subprocess; subprocess.run(['curl', '-sO', 'https://example.com/schema.fbs'])", "runs ['curl'"),
        ("import subprocess; subprocess.run('wget -q https://example.com/x', shell=True)", "runs ['/bin/sh', '-c', 'wget"),
    ],
    ids=["urllib", "lookup", "connect", "curl", "shell-wget"],
)
def test_each_way_out_is_refused_and_logged(tmp_path: Path, code: str, logged: str) -> None:
    proc, log = _guarded_child(tmp_path, code)
    assert proc.returncode != 0
    assert "no network at run time" in proc.stderr
    assert logged in log
    assert log.startswith("pid ")  # each line names the process


def test_loopback_stays_open(tmp_path: Path) -> None:
    # torch.distributed's rendezvous and local servers connect to this machine.
    code = """
import socket
server = socket.create_server(("127.0.0.1", 0))
port = server.getsockname()[1]
for host in ("127.0.0.1", "localhost"):
    socket.create_connection((host, port), timeout=5).close()
print("connected")
"""
    proc, log = _guarded_child(tmp_path, code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "connected"
    assert log == ""


def test_the_suite_and_its_children_are_guarded() -> None:
    with pytest.raises(OSError, match="no network at run time"):
        socket.getaddrinfo("example.invalid", 80)
    child = subprocess.run([sys.executable, "-c", "import socket; socket.getaddrinfo('example.org', 80)"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert child.returncode != 0 and "no network at run time" in child.stderr
    attempts = new_network_attempts()  # taken here, so the suite's check does not fail this test for them
    assert "looks up 'example.invalid'" in attempts
    assert "looks up 'example.org'" in attempts
