"""The house rule "no network at run time", checked in every Python process of the test suite.

An audit hook (PEP 578) sees each attempt to reach another machine from Python: a name lookup, a
connect to an address that is not this machine, a urllib request, or a `curl`/`wget` started as a
child. It refuses the attempt (an OSError, which libraries already treat as "offline") and appends
one line naming it, the process and where it came from to the file in EDGETL_TEST_NETWORK_LOG, which
tests/conftest.py checks after every test. Loopback stays open: torch.distributed's rendezvous and
the tests' own local servers use it.

What it cannot see: connections made from C or C++ without Python (ONNX Runtime's telemetry
uploader). edgetl turns that one off by its setting, which tests/test_no_telemetry.py checks, and
syscall_trace.py sees such calls in the real Lite0 build, which the suite runs under strace.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import traceback
import urllib.parse

LOG_VARIABLE = "EDGETL_TEST_NETWORK_LOG"
_DOWNLOADERS = {"curl", "wget"}
_LOCAL_NAMES = {"", "localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def is_local_host(host: object) -> bool:
    """Whether `host` (a name or an address, as a socket call or strace gives it) is this machine."""
    if host is None:
        return True  # getaddrinfo(None, port): the wildcard or loopback address of a local server
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).split("%")[0]  # an IPv6 scope
    if host.lower() in _LOCAL_NAMES or host == socket.gethostname():
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name of another machine
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1, an IPv6 socket reaching IPv4 loopback
    return address.is_loopback or address.is_unspecified


def _attempt(event: str, args: tuple) -> str | None:
    """What `event` reaches outside this machine, or None."""
    if event in ("socket.getaddrinfo", "socket.gethostbyname") and not is_local_host(args[0]):
        return f"looks up {args[0]!r}"
    if event == "socket.connect":
        sock, address = args
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_local_host(address[0]):
            return f"connects to {address!r}"
    if event == "urllib.Request":
        url = urllib.parse.urlsplit(str(args[0]))
        if url.scheme != "file" and not is_local_host(url.hostname):
            return f"requests {args[0]}"
    if event == "subprocess.Popen":  # CPython passes the resolved executable and the argv (["/bin/sh", "-c", CMD] for a shell)
        executable, argv = os.fsdecode(args[0]), [os.fsdecode(a) for a in args[1]]
        programs = [os.path.basename(executable)]
        if len(argv) >= 3 and argv[1] == "-c":
            programs += [os.path.basename(word) for word in argv[2].split()[:1]]
        if _DOWNLOADERS.intersection(programs):
            return f"runs {argv!r}"
    return None


def install() -> None:
    """Start refusing and logging (once per process; a no-op where EDGETL_TEST_NETWORK_LOG is unset)."""
    log = os.environ.get(LOG_VARIABLE)
    if not log or getattr(sys, "_edgetl_network_guard", False):
        return
    sys._edgetl_network_guard = True
    watched = {"socket.getaddrinfo", "socket.gethostbyname", "socket.connect", "urllib.Request", "subprocess.Popen"}

    def hook(event: str, args: tuple) -> None:
        if event not in watched:  # every other audited event (open, import, ...) costs this one lookup
            return
        what = _attempt(event, args)
        if what is None:
            return
        where = "".join(traceback.format_stack(limit=8)[:-2]).replace("\n", " | ")
        # The variable as it is now: a pytest-xdist worker, guarded from its start by sitecustomize with the
        # controller's log, points it at its own in pytest_configure.
        with open(os.environ.get(LOG_VARIABLE) or log, "a", encoding="utf-8") as f:
            f.write(f"pid {os.getpid()} ({' '.join(sys.argv)[:200]}) {what}; from: {where}\n")
        raise OSError(f"no network at run time (edgetl's tests refuse this): {what}")

    sys.addaudithook(hook)
