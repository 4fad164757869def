"""The house rule "no network at run time" below Python: the system calls that address another machine, seen with strace.

The audit hook (edgetl_network_guard.py) sees what Python code tries. Native code reaches the network without
Python: a C++ runtime's telemetry, a converter's downloader, a resolver called from a library. strace sees those
calls in every thread and child of the command it runs. tests/conftest.py runs the suite's widest child under it,
the real Lite0 build (training from the packaged ImageNet weights, then the exports to every format with their
parity runs in ONNX Runtime, OpenVINO, LiteRT and ExecuTorch), and tests/test_network_guard.py reads the trace.

Traced: the calls that name where data goes. connect (a TCP handshake, or the default peer of a UDP socket) and
sendto/sendmsg/sendmmsg with an address. Loopback is this machine and stays allowed (torch.distributed's
rendezvous uses it), except port 53: that is a name lookup, which a local resolver (127.0.0.53) sends on.
Only those calls stop the traced process (`--seccomp-bpf`), so tracing costs the build almost nothing.
"""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from edgetl_network_guard import is_local_host  # the Python guard's own idea of this machine

SYSCALLS = "connect,sendto,sendmsg,sendmmsg"
INSTALL_HINT = "install strace (Debian/Ubuntu: apt-get install strace; .ci/run installs it)"
# strace's rendering of a socket address (strace 5.x and 6.x):
#   {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("192.0.2.1")}
#   {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "2001:db8::1", &sin6_addr), ...}
_IPV4 = re.compile(r'sin_port=htons\((\d+)\), sin_addr=inet_addr\("([^"]+)"\)')
_IPV6 = re.compile(r'sin6_port=htons\((\d+)\)[^}]*?inet_pton\(AF_INET6, "([^"]+)"')
NAME_LOOKUP_PORT = 53
END_MARK = ("127.0.0.1", 9)  # the discard port of this machine


def mark_the_trace_end() -> None:
    """Connect a UDP socket to END_MARK, which sends nothing; its line in a trace shows that strace followed the
    traced program to this point (an empty trace alone could also mean that nothing was traced)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(END_MARK)


def shows_the_end_mark(trace: str) -> bool:
    host, port = END_MARK
    return f'sin_port=htons({port}), sin_addr=inet_addr("{host}")' in trace


def then_mark_the_end(cmd: list[str]) -> list[str]:
    """`cmd`, then the end mark from a child Python, with `cmd`'s exit status: for a command that cannot call
    `mark_the_trace_end` itself (a CLI run as a user would)."""
    mark = shlex.join([sys.executable, __file__, "--mark-the-end"])
    return ["sh", "-c", f'status=0; "$@" || status=$?; {mark}; exit $status', "sh", *cmd]


def traced(cmd: list[str], log: Path) -> list[str]:
    """`cmd` run under strace, every thread and child followed, the addressed calls written to `log`."""
    return ["strace", "-f", "-qq", "--seccomp-bpf", "-e", f"trace={SYSCALLS}", "-e", "signal=none", "-o", str(log), *cmd]


def why_not_traceable() -> str | None:
    """None where strace can trace a command here; otherwise why not (not installed, or ptrace refused, as a
    container without the ptrace permission does)."""
    if shutil.which("strace") is None:
        return f"strace is not installed: {INSTALL_HINT}"
    try:
        probe = subprocess.run(traced(["true"], Path("/dev/null")), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"strace did not run: {e}"
    if probe.returncode != 0:
        return f"strace cannot trace here (exit {probe.returncode}): {probe.stderr.strip()[-300:]}"
    return None


def calls_to_other_machines(trace: str) -> list[str]:
    """The lines of a trace whose call addresses another machine or asks for a name."""
    found = []
    for line in trace.splitlines():
        for port, host in _IPV4.findall(line) + _IPV6.findall(line):
            if int(port) == NAME_LOOKUP_PORT or not is_local_host(host):
                found.append(line.strip())
                break
    return found


if __name__ == "__main__" and sys.argv[1:] == ["--mark-the-end"]:
    mark_the_trace_end()
