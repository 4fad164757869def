"""torch.distributed for training: one process per device, started by `torchrun`.

`torchrun --nproc-per-node N -m edgetl train ...` sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE
and the rendezvous address in each worker's environment; `Dist.from_env` joins the process group
(gloo on CPU, NCCL on CUDA). Without those variables (a plain `edgetl train`) it is a single process
and every collective below is a no-op, so the trainer has one code path.

Rank 0 alone writes the run folder. Every rank gets the split lists from rank 0 (broadcast, so
nodes need not share a disk), decodes its node's share of the images, computes features and
validation logits on its shard, and gathers the rest: all ranks hold the same numbers and so take
the same early-stopping decision, which `agree` makes explicit.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from edgetl.errors import EdgetlError, PeerFailed
from edgetl.launch import launched_by_torchrun

# How long a rank waits for the others in a collective (rendezvous included) before giving up.
TIMEOUT_ENV = "EDGETL_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str = "auto") -> Dist:
        """Join the process group torchrun set up, or a single-process Dist outside torchrun.

        `device` is the run's `--device`: a process that trains on the CPU neither selects a GPU (which
        would open a CUDA context on it for nothing) nor sets up NCCL, even on a machine that has GPUs."""
        if not launched_by_torchrun():
            return cls()
        env = os.environ
        d = cls(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), local_rank=int(env.get("LOCAL_RANK", "0")),
                local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
                node_rank=int(env.get("GROUP_RANK", "0")))  # fmt: skip
        if not dist.is_initialized():
            timeout = timedelta(seconds=float(env.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
            # Our own collectives (lists, features, logits) use CPU tensors over gloo; DDP's CUDA tensors use NCCL.
            cuda = device != "cpu" and torch.cuda.is_available()
            backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
            try:
                if cuda:
                    torch.cuda.set_device(d.local_rank % torch.cuda.device_count())
                dist.init_process_group(backend=backend, timeout=timeout)
            except Exception as exc:  # the store's or backend's own errors: timeouts, refused connections
                raise EdgetlError(f"rank {d.rank}: cannot join the other {d.world_size - 1} training process(es) "
                                  f"({backend}): {str(exc).splitlines()[0][:200]}") from None  # fmt: skip
        # torchrun stops the surviving workers with SIGTERM when one fails: leave like Ctrl-C, so rank 0
        # records the run as interrupted (its last completed epoch is on disk) and nobody is left hanging.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminate)
        return d

    def main_first(self, fn: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
        """Run `fn` on rank 0 alone; it returns (shared, local). Every rank gets `shared`; `local` stays
        on rank 0 (None elsewhere). A failure on rank 0 fails every rank: rank 0 with its own error,
        the others quietly (PeerFailed), instead of leaving them waiting for a broadcast."""
        if not self.active:
            return fn()
        if self.is_main:
            try:
                shared, local = fn()
            except EdgetlError as exc:
                self.broadcast(("error", str(exc)))
                raise
            except BaseException:
                self.broadcast(("error", "rank 0 stopped"))
                raise
            self.broadcast(("ok", shared))
            return shared, local
        status, shared = self.broadcast(None)
        if status == "error":
            raise PeerFailed(shared)
        return shared, None

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled: only for our own small records, never user files)."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any: a stop one rank decides is a stop for all."""
        if not self.active:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def shard(self, n: int) -> np.ndarray:
        """This rank's indices of 0..n-1 (every world_size-th, from its rank)."""
        return np.arange(self.rank, n, self.world_size)

    def sum_all(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks (float64)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def gather_rows(self, rows: np.ndarray, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """The full (n, ...) array from every rank's `shard(n)` rows, in the original order (into `out`
        when given, e.g. a memory-mapped file)."""
        if not self.active:
            return rows
        per_rank = -(-n // self.world_size)
        padded = np.zeros((per_rank, *rows.shape[1:]), dtype=rows.dtype)
        padded[: len(rows)] = rows
        t = torch.from_numpy(padded).to(self._device())
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t)
        if out is None:
            out = np.empty((n, *rows.shape[1:]), dtype=rows.dtype)
        for r, part in enumerate(parts):
            idx = np.arange(r, n, self.world_size)
            out[idx] = part.cpu().numpy()[: len(idx)]
        return out

    def _device(self) -> torch.device:
        return torch.device("cpu")

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def lost_peer(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another process died (its connection reset or
    timed out): for this process that is an interruption, like the SIGTERM torchrun would send next."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(k in text for k in ("gloo", "NCCL", "Connection reset", "Connection closed"))
