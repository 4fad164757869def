"""Lines that native libraries print straight to the process's stderr (file descriptor 2, below Python's
logging and warnings), caught where edgetl knows they are noise: ExecuTorch's CPU probe on hosts that are not
ARM, LiteRT's note that it made its XNNPACK delegate. Everything else such code prints in the block is passed
on, so an error message from the library still reaches the user."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def dropping_native_lines(*prefixes: str) -> Iterator[None]:
    """Run the block with file descriptor 2 caught; afterwards write to stderr the caught lines that start with
    none of `prefixes`. The block is short (a library's first call): another thread's stderr in that time
    is caught too, and passed on after it."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as caught:
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode("utf-8", errors="replace").splitlines(keepends=True)
            other = "".join(line for line in lines if not line.startswith(prefixes))
            if other:
                sys.stderr.write(other)
                sys.stderr.flush()
