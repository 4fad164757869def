"""`edgetl train --nproc-per-node N`: the same launcher as `torchrun --standalone --nproc-per-node N
-m edgetl train ...`, started from edgetl (torch.distributed.launcher, what torchrun itself calls).

Every worker prints its own errors; a failing worker makes the launcher stop the others (SIGTERM,
which edgetl treats like Ctrl-C), and the launcher's own report of that becomes one line here
instead of its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from edgetl.errors import EdgetlError

if TYPE_CHECKING:
    from edgetl.config import TrainConfig


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun (or launch_local) started. Here, not in
    edgetl.distributed, so the CLI can ask before importing torch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def strip_option(argv: list[str], option: str) -> list[str]:
    """`argv` without `option VALUE` / `option=VALUE` (the workers must not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def check_before_launch(run: TrainConfig | Path, nproc: int) -> None:
    """Refuse, before any process starts, what the process count cannot fit (see train.check_process_split):
    the options of a new run, or those a resumed run (`run`, its folder) recorded."""
    from edgetl.config import TrainConfig
    from edgetl.train import check_process_split, pick_device

    if nproc < 1:
        raise EdgetlError(f"--nproc-per-node must be at least 1, got {nproc}")
    if isinstance(run, Path):
        from edgetl.run import RunFolder

        config = RunFolder.open(run).manifest.get("config")
        if not isinstance(config, dict):
            return  # not a run folder edgetl can resume: each process says so in its own words
        run = TrainConfig.from_dict(config, f"{run / 'manifest.json'}: config")
    check_process_split(run, nproc, nproc, pick_device(run.device))


def launch_local(nproc: int, argv: list[str]) -> int:
    """Run `python -m edgetl *argv` in `nproc` processes on this machine; the exit code of the first to fail, else 0."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise EdgetlError(f"--nproc-per-node must be at least 1, got {nproc}")
    # As torchrun does: without a thread count, N processes each start one thread per core and fight over them.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    # The agent's log lines about stopping workers repeat what the workers already said.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)  # fmt: skip
    try:
        elastic_launch(config, sys.executable)("-m", "edgetl", *argv)
    except ChildFailedError as exc:
        rank, failure = min(exc.failures.items(), key=lambda kv: kv[1].timestamp)
        code = failure.exitcode
        if code < 0:  # killed by a signal: nothing of its own was printed
            print(f"error: training process {rank} was killed (signal {-code}); the others were stopped. "
                  "Continue with `edgetl train --resume RUN`", file=sys.stderr)  # fmt: skip
            return 1
        return code
    except SignalException:
        return 130
    return 0
