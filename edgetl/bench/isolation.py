"""Where a benchmark variant runs: in a worker process of its own (the default; see worker.py for
why), or in this process next to the others (`--isolation in-process`, the old way, kept so the
difference can be measured). Both give the parent the same calls."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.bench.base import Variant
from edgetl.bench.timing import flatten_rounds, throughput, timed_runs, turns_by_round
from edgetl.errors import EdgetlError

# Between two workers' turns: long enough for a runtime's idle threads to stop spinning and sleep.
SETTLE_SECONDS = 0.05


class ArrayFiles:
    """Numpy inputs handed to workers as .npy files, each written once."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.paths = folder, {}  # type: ignore[var-annotated]

    def path(self, x: np.ndarray) -> str:
        key = id(x)
        if key not in self.paths:
            p = self.folder / f"in-{len(self.paths)}.npy"
            np.save(p, x)
            self.paths[key] = (str(p), x)  # keep x alive so its id is not reused
        return self.paths[key][0]


class ProcessWorker:
    """A variant loaded in `python -m edgetl.bench.worker`, driven over its stdin/stdout."""

    def __init__(self, v: Variant, shape: tuple[int, ...], threads: int, files: ArrayFiles) -> None:
        spec = {"target": v.target, "model": str(v.model), "kind": v.kind, "precision": v.precision, "input_dtype": v.input_dtype,
                "shape": list(shape), "threads": threads, "settings": [list(kv) for kv in v.settings]}  # fmt: skip
        self.files, self.name = files, v.name
        # stderr goes to a file, not a pipe: a pipe nobody reads until the end fills up (64 KB of a
        # runtime's warnings) and the worker would block forever in the middle of a timing turn.
        self.log = files.folder / f"worker-{id(self)}.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgetl.bench.worker", json.dumps(spec)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
        self._asked_to_exit = False
        self.info = self._read()
        self.error = self.info.get("error")

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            self.proc.wait(timeout=30)
            err = self.log.read_text(errors="replace").strip().splitlines()
            return {"error": (err or [f"the worker process ended (exit code {self.proc.returncode})"])[-1][:200]}
        return json.loads(line)

    def _ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except BrokenPipeError:
            pass  # the worker is gone; _read says why
        answer = self._read()
        if "error" in answer:
            raise EdgetlError(f"benchmark worker for {self.name} failed during {cmd['cmd']}: {answer['error']}", exit_code=1)
        return answer

    def predict(self, x: np.ndarray, fixed_batch: int | None) -> np.ndarray:
        out = Path(self.files.folder) / f"out-{self.proc.pid}.npy"
        self._ask({"cmd": "predict", "input": self.files.path(x), "output": str(out), "fixed_batch": fixed_batch})
        return np.load(out)

    def warmup(self, x: np.ndarray, n: int) -> None:
        self._ask({"cmd": "warmup", "input": self.files.path(x), "n": n})

    def time(self, x: np.ndarray, seconds: float, runs: int | None = None) -> list[float]:
        return self._ask({"cmd": "time", "input": self.files.path(x), "seconds": seconds, "runs": runs})["ms"]

    def throughput(self, x: np.ndarray, seconds: float) -> float:
        return self._ask({"cmd": "throughput", "input": self.files.path(x), "seconds": seconds})["images_per_second"]

    def ask_to_exit(self) -> None:
        """Tell the worker to exit without waiting for it (see close_all); once is enough."""
        if self.proc.poll() is None and not self._asked_to_exit:
            self._asked_to_exit = True
            try:
                self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")  # type: ignore[union-attr]
                self.proc.stdin.flush()  # type: ignore[union-attr]
            except OSError:
                self.proc.kill()

    def close(self) -> None:
        self.ask_to_exit()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def close_all(workers: list[Any]) -> None:
    """Close workers together: each is told to exit first, so their runtimes' teardowns (a few tenths of
    a second each) overlap instead of queueing; timing is over by then, so they compete for nothing."""
    for w in workers:
        w.ask_to_exit()
    for w in workers:
        w.close()


class InProcessWorker:
    """The same calls on a variant loaded in this process."""

    def __init__(self, v: Variant, shape: tuple[int, ...], threads: int, files: ArrayFiles) -> None:
        import os

        from edgetl.bench.base import TARGETS

        self.error = None
        try:
            t0 = time.perf_counter()
            self.run = TARGETS[v.target].load(v, threads)
            self.info = {"pid": os.getpid(), "load_seconds": time.perf_counter() - t0,
                         "executed_precision": getattr(self.run, "precision", None) or v.precision,
                         "settings": getattr(self.run, "settings", None)}  # fmt: skip
        except Exception as exc:  # a target that fails on this model is reported, not fatal
            self.error = f"failed to load {Path(v.model).name}: {type(exc).__name__}: {str(exc)[:160]}"
            self.info = {"error": self.error}

    def predict(self, x: np.ndarray, fixed_batch: int | None) -> np.ndarray:
        from edgetl.runners import run_in_chunks

        return run_in_chunks(self.run, x, fixed_batch)

    def warmup(self, x: np.ndarray, n: int) -> None:
        for _ in range(n):
            self.run(x)

    def time(self, x: np.ndarray, seconds: float, runs: int | None = None) -> list[float]:
        return timed_runs(self.run, x, seconds, runs)

    def throughput(self, x: np.ndarray, seconds: float) -> float:
        return throughput(self.run, x, seconds)

    def ask_to_exit(self) -> None:
        """Nothing to tell: the variant lives in this process (close frees it)."""

    def close(self) -> None:
        self.run = None


def interleaved_rounds_by_round(workers: dict[str, Any], inputs: dict[str, np.ndarray], min_time: float, warmup: int,
                                rounds: int = 5, runs_per_round: int | None = None, settle: float = SETTLE_SECONDS,
                                extra_turns: dict[str, Any] | None = None) -> dict[str, list[list[float]]]:  # fmt: skip
    """Batch latency samples (ms) per worker, round by round: every worker warms up, then the rounds of
    bench.timing give each worker its turn, one worker at a time. `extra_turns` (the runtimes' own tools,
    --check-reference) take their turns in the same rounds, after the workers'."""
    for name, w in workers.items():
        w.warmup(inputs[name], warmup)
    turns = {name: (lambda seconds, runs, w=w, x=inputs[name]: w.time(x, seconds, runs)) for name, w in workers.items()}
    samples = turns_by_round({**turns, **(extra_turns or {})}, min_time, rounds, runs_per_round, settle)
    return {name: samples[name] for name in workers}


def interleaved_rounds(workers: dict[str, Any], inputs: dict[str, np.ndarray], min_time: float, warmup: int, rounds: int = 5,
                       runs_per_round: int | None = None, settle: float = SETTLE_SECONDS,
                       extra_turns: dict[str, Any] | None = None) -> dict[str, list[float]]:  # fmt: skip
    """interleaved_rounds_by_round, each worker's samples of every round together."""
    return flatten_rounds(interleaved_rounds_by_round(workers, inputs, min_time, warmup, rounds, runs_per_round, settle, extra_turns))
