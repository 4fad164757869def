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


# ----------------------------------------------------------------------------- below Python: the syscall trace

_NATIVE_CALLS = """
import ctypes, socket, struct, subprocess, sys, threading

def native_udp_connect(host, port):
    # libc's connect, as native code calls it: no Python audit event. A UDP connect sends nothing; it only sets
    # the socket's default peer, so no packet leaves this machine.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    address = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(host) + bytes(8)
    ctypes.CDLL(None, use_errno=True).connect(s.fileno(), address, len(address))
    s.close()

worker = threading.Thread(target=native_udp_connect, args=("192.0.2.1", 443))  # TEST-NET-1, in a thread
worker.start(); worker.join()
native_udp_connect("127.0.0.1", 8080)  # this machine: allowed
lookup = "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).connect(('127.0.0.53', 53))"  # a resolver's query
subprocess.run([sys.executable, "-c", lookup], check=True)
print("done")
"""


def test_the_syscall_trace_sees_native_calls_in_threads_and_children(tmp_path: Path) -> None:
    """What the Python guard cannot see (libc's connect from native code) is in the trace, from a thread and from
    a child process; a call to this machine is not reported, one to its name resolver (port 53) is."""
    from syscall_trace import calls_to_other_machines, traced, why_not_traceable

    assert why_not_traceable() is None, why_not_traceable()
    log = tmp_path / "trace"
    proc = subprocess.run(traced([sys.executable, "-c", _NATIVE_CALLS], log), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-2000:]
    found = calls_to_other_machines(log.read_text())
    assert len(found) == 2, found
    assert '"192.0.2.1"' in found[0] and "htons(443)" in found[0]
    assert '"127.0.0.53"' in found[1] and "htons(53)" in found[1]
    assert new_network_attempts() == ""  # the guard saw none of it: the trace is the only witness


def test_the_syscall_trace_reads_ipv6_and_message_addresses() -> None:
    from syscall_trace import calls_to_other_machines

    def ipv6(pid: int, port: int, host: str) -> str:
        address = f'sin6_port=htons({port}), sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "{host}", &sin6_addr), sin6_scope_id=0'
        return f"{pid} connect(5, {{sa_family=AF_INET6, {address}}}, 28) = -1 ENETUNREACH"

    trace = "\n".join([
        ipv6(101, 443, "2001:db8::1"),
        ipv6(102, 29500, "::1"),  # torch.distributed's rendezvous on this machine
        ipv6(102, 80, "::ffff:127.0.0.1"),
        '103 sendmsg(8, {msg_name={sa_family=AF_INET, sin_port=htons(123), sin_addr=inet_addr("198.51.100.7")}, ...}, 0) = 48',
        '104 sendto(9, "x", 1, 0, {sa_family=AF_INET, sin_port=htons(5000), sin_addr=inet_addr("0.0.0.0")}, 16) = 1',
        '105 connect(10, {sa_family=AF_UNIX, sun_path="/run/nscd/socket"}, 110) = -1 ENOENT',
    ])  # fmt: skip
    found = calls_to_other_machines(trace)
    assert [line.split()[0] for line in found] == ["101", "103"]
    assert "2001:db8::1" in found[0]


def test_the_real_lite0_build_addresses_no_other_machine_from_native_code(real_run: Path) -> None:
    """The real Lite0 build (training from the packaged weights, exports to every format with their parity runs in
    each runtime) ran under strace: no call of any of its threads or children addressed another machine."""
    from syscall_trace import calls_to_other_machines, shows_the_end_mark

    root = real_run.parent
    assert not (root / "untraced").exists(), (root / "untraced").read_text()
    trace = (root / "network.strace").read_text()
    assert shows_the_end_mark(trace), "the trace did not follow the build to its end"
    assert calls_to_other_machines(trace) == []
