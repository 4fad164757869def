"""Fixtures that make small datasets in temporary folders: no test reads the shared datasets except
the one real end-to-end run on the bundled sample."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def one_node_onnx(path: Path, op_type: str = "Relu", domain: str = "") -> Path:
    """A one-operator ONNX model, `input` (1x3x8x8 float) -> op -> `logits`, saved at `path`: for converters and
    runtimes that need a small valid graph, or one with an operator they do not know (a custom `domain`)."""
    import onnx
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 3, 8, 8]) for name in ("input", "logits")]
    graph = helper.make_graph([helper.make_node(op_type, ["input"], ["logits"], domain=domain)], "g", io[:1], io[1:])
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    return path


def make_image(rgb: tuple[int, int, int], rng: np.random.Generator, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A noisy image dominated by one colour: learnable by a tiny network in a few steps."""
    w, h = size
    base = np.array(rgb, dtype=np.float32)[None, None, :]
    noise = rng.normal(0, 25, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def make_folder(root: Path, per_class: int = 8, classes: dict[str, tuple[int, int, int]] | None = None, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, rgb in (classes or COLOURS).items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(rgb, rng).save(d / f"{name}_{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data")


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    root = tmp_path / "splits"
    make_folder(root / "train", per_class=10, seed=1)
    make_folder(root / "val", per_class=4, seed=2)
    make_folder(root / "test", per_class=4, seed=3)
    return root


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def idx_folder(tmp_path: Path) -> Path:
    """A 3-class MNIST-format set: class c is a bright square in a different corner."""
    root = tmp_path / "idx"
    root.mkdir()
    rng = np.random.default_rng(0)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n, dtype=np.uint8) % 3
        images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            y, x = [(2, 2), (2, 16), (16, 9)][c]
            images[i, y : y + 10, x : x + 10] = 230
        return images, labels

    for prefix, n, gz in (("train", 60, True), ("t10k", 15, False)):
        images, labels = make(n)
        suffix = "-ubyte.gz" if gz else "-ubyte"
        write_idx(root / f"{prefix}-images-idx3{suffix}", images, gz)
        write_idx(root / f"{prefix}-labels-idx1{suffix}", labels, gz)
    return root


@pytest.fixture(scope="session")
def real_run() -> Path:
    """efficientnet_lite0 with its offline ImageNet weights, trained once on the bundled sample."""
    return _real_lite0_build() / "run"


def tiny_run_config(**changes: object) -> Any:
    """The recipe of a tiny-backbone test run (a TrainConfig): a few seconds, and a model good enough to export."""
    from edgetl.config import TrainConfig

    base = TrainConfig(backbone="tiny", pretrained=False, epochs_head=5, epochs_finetune=1, lr_head=1e-2, patience=0, recipe="finetune")
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-backbone run on generated images, for export and later stages."""
    from edgetl.progress import Reporter
    from edgetl.train import train

    root = tmp_path_factory.mktemp("tiny")
    data = make_folder(root / "data", per_class=12)
    return train(data, tiny_run_config(), out=str(root / "run"), reporter=Reporter(quiet=True)).run_dir


@pytest.fixture(scope="session")
def real_export_report(real_run: Path) -> tuple[Path, dict]:
    """real_run exported once to every format (ONNX plain and uint8-input, OpenVINO, LiteRT, ExecuTorch),
    with the export's own report: the parity tests on real photos and the runtime and app tests share it."""
    out = _real_lite0_build() / "export"
    return out, json.loads((out / "export.json").read_text())


@pytest.fixture(scope="session")
def real_export(real_export_report: tuple[Path, dict]) -> Path:
    return real_export_report[0]


def run_with_imports_blocked(blocked: tuple[str, ...], body: str) -> subprocess.CompletedProcess[str]:
    """Run `body` in a fresh Python where importing any of `blocked` (top-level packages) fails, as in an
    app that installed only what the runtime needs."""
    code = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
{body}
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


# ----------------------------------------------------------------------------- one test session, one or two processes

# The suite runs in two pytest-xdist workers (README), or in one process. Whatever every process of the session shares
# (the real Lite0 build, the network logs) lives in one folder, made by the process that runs pytest (under xdist, the
# controller, which hands it to each worker) and removed by it at the end.
_SUITE: dict = {}


def _worker_id(config: pytest.Config) -> str:
    return getattr(config, "workerinput", {}).get("workerid", "main")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: object) -> None:
    """pytest-xdist, in the controller: each worker gets the session's shared folder."""
    node.workerinput["edgetl_suite_dir"] = str(_SUITE["dir"])  # type: ignore[attr-defined]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    """pytest-xdist, in the controller: what a worker's processes tried after its last test (see pytest_sessionfinish)."""
    late = getattr(node, "workeroutput", {}).get("edgetl_network_after_last_test")
    if late:
        _SUITE.setdefault("late_network", []).append(late)


# ----------------------------------------------------------------------------- the real Lite0 run, built beside the suite

_REAL_LITE0: dict = {}
_REAL_LITE0_TIMEOUT_S = 1800


def _real_lite0_folder() -> Path:
    return _SUITE["dir"] / "real-lite0"


# ----------------------------------------------------------------------------- no network at run time

NETWORK_GUARD = Path(__file__).with_name("no_network")
_NETWORK_LOG: dict = {}


def _guard_the_network(config: pytest.Config) -> None:
    """Every Python process of the session refuses and logs each attempt to reach another machine
    (no_network/edgetl_network_guard.py): this one now, its children through PYTHONPATH's sitecustomize.
    One log per pytest process, so that each blames only its own tests."""
    sys.path.insert(0, str(NETWORK_GUARD))
    import edgetl_network_guard

    log = _SUITE["dir"] / f"network-{_worker_id(config)}.log"
    log.touch()
    _NETWORK_LOG["log"] = log
    os.environ[edgetl_network_guard.LOG_VARIABLE] = str(log)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NETWORK_GUARD), os.environ.get("PYTHONPATH")]))
    edgetl_network_guard.install()


def new_network_attempts() -> str:
    """What the guarded processes logged since the last call (a test that provokes an attempt on purpose
    takes its lines with this, so they do not fail it)."""
    with open(_NETWORK_LOG["log"], "rb") as f:
        f.seek(_NETWORK_LOG.get("seen", 0))
        attempts = f.read()
    _NETWORK_LOG["seen"] = _NETWORK_LOG.get("seen", 0) + len(attempts)
    return attempts.decode("utf-8", errors="replace")


@pytest.fixture(autouse=True)
def no_network_reached() -> Iterator[None]:
    """Fails the test during which (or during whose fixtures' set-up) a guarded process tried to reach the
    network; each line says which process, what and from where."""
    yield
    attempts = new_network_attempts()
    if attempts:
        pytest.fail("no network at run time, but this was tried:\n" + attempts[:4000], pytrace=False)


def pytest_configure(config: pytest.Config) -> None:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        _SUITE["dir"] = Path(workerinput["edgetl_suite_dir"])
    else:
        _SUITE.update(dir=Path(tempfile.mkdtemp(prefix="edgetl-suite-")), owner=True)
    _guard_the_network(config)
    import torch

    # The tests' torch work is on tiny models, where a second thread gains little: one thread each, so that the two
    # workers (or one process and the real Lite0 build below) each have a core instead of fighting over both. With two
    # threads, an intra-op thread waiting on a busy core made the tests up to 4x slower while the build ran.
    torch.set_num_threads(1)


def pytest_collection_finish(session: pytest.Session) -> None:
    """When a collected test uses the real Lite0 run, start building it (build_real_lite0.py: training, then
    exports to every format) in a child process now. That is two minutes on 2 cores, much of it one-core work
    (tracing, conversion), which then overlaps the tests that run before the first one needing it. Every worker
    collects every test: the first to make the build's folder starts it, the others wait for its exit file."""
    if session.config.option.collectonly or not any("real_run" in getattr(i, "fixturenames", ()) for i in session.items):
        return
    root = _real_lite0_folder()
    try:
        root.mkdir()
    except FileExistsError:
        return  # another worker started it
    import syscall_trace  # tests/no_network, on sys.path since pytest_configure

    cmd = [sys.executable, str(Path(__file__).with_name("build_real_lite0.py")), str(root)]
    # Under strace, so that what native code sends is checked too (test_network_guard.py reads the trace).
    untraced = syscall_trace.why_not_traceable()
    if untraced is None:
        cmd = syscall_trace.traced(syscall_trace.then_mark_the_end(cmd), root / "network.strace")
    else:
        (root / "untraced").write_text(untraced)
    # The shell writes the build's exit status once it ends, for whichever worker waits on it; a session of its own,
    # so stopping it stops its children (strace, the LiteRT converter) too.
    report_exit = 'root=$1; shift; "$@"; echo $? > "$root/exit.part" && mv "$root/exit.part" "$root/exit"'
    with open(root / "build.log", "wb") as log:
        proc = subprocess.Popen(["sh", "-c", report_exit, "sh", str(root), *cmd],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    (root / "pgid.part").write_text(str(proc.pid))
    (root / "pgid.part").replace(root / "pgid")  # whole or absent for the controller that reads it
    _REAL_LITE0["proc"] = proc


def _real_lite0_build() -> Path:
    """The finished build's folder; a failed build fails the tests that need it with its log."""
    root = _real_lite0_folder()
    if not root.is_dir():
        pytest.fail("the real Lite0 build was not started (pytest_collection_finish saw no test using real_run)")
    exit_file, deadline = root / "exit", time.monotonic() + _REAL_LITE0_TIMEOUT_S
    proc = _REAL_LITE0.get("proc")  # in the worker that started it
    failure = None
    while failure is None and not exit_file.exists():
        if proc is not None and proc.poll() is not None and not exit_file.exists():  # the wrapper itself was killed
            failure = f"the real Lite0 build was stopped (exit {proc.returncode})"
        elif time.monotonic() > deadline:
            failure = f"the real Lite0 build did not finish in {_REAL_LITE0_TIMEOUT_S} s"
        else:
            time.sleep(0.2)
    if failure is None and (code := int(exit_file.read_text())) != 0:
        failure = f"building the real Lite0 run failed (exit {code})"
    if failure is not None:
        pytest.fail(f"{failure}:\n" + (root / "build.log").read_text()[-3000:])
    return root


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # After the last test: a session fixture's tear-down, a child still running then. A worker hands its lines to the
    # controller (its own exit status is not the session's); the process that runs pytest judges them all.
    late = [new_network_attempts()] if _NETWORK_LOG else []
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["edgetl_network_after_last_test"] = "".join(late)
    proc = _REAL_LITE0.get("proc")
    if proc is not None:
        proc.poll()  # reaps a finished build; one still running is another worker's to wait for, and the controller's to stop
    if not _SUITE.get("owner"):
        return
    attempts = "".join(late + _SUITE.get("late_network", []))
    if attempts:
        print("\nno network at run time, but this was tried after the last test:\n" + attempts[:4000], file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    root = _real_lite0_folder()
    if (root / "pgid").exists() and not (root / "exit").exists():  # an interrupted session: the build must not outlive it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int((root / "pgid").read_text()), signal.SIGKILL)
        if proc is not None:
            proc.wait()
    shutil.rmtree(_SUITE["dir"], ignore_errors=True)
