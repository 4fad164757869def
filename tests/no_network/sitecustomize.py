"""Runs at the start of every Python process the test suite starts: tests/conftest.py puts this folder on
PYTHONPATH, so the children (bench workers, the LiteRT converter, torchrun's workers, the CLI) are guarded
like the suite's own process."""

import edgetl_network_guard

edgetl_network_guard.install()
