"""Builds what the end-to-end tests on the real backbone share: efficientnet_lite0 with its offline ImageNet
weights trained on the bundled sample (a fixed recipe: the exports and app tests want one known fine-tuned
model, not a recipe search), then exported once to every format (ONNX plain and uint8-input, OpenVINO,
LiteRT, ExecuTorch) with the export's own report in export.json. conftest.py runs it under strace where it
can (no_network/syscall_trace.py): the build is the suite's check that native code reaches no other machine.

conftest.py runs it in a child process as soon as collection shows a test needs it:

    python tests/build_real_lite0.py ROOT      # -> ROOT/run, ROOT/export
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from edgetl.config import TrainConfig
from edgetl.export import ExportOptions, export_run
from edgetl.progress import Reporter
from edgetl.sample import sample_path
from edgetl.train import train


def main(root: Path) -> None:
    # One thread: the build leaves the other core to the tests running meanwhile.
    torch.set_num_threads(1)
    cfg = TrainConfig(epochs_head=30, epochs_finetune=1, patience=0, seed=0, recipe="finetune")
    run = train(sample_path(), cfg, out=str(root / "run"), reporter=Reporter(quiet=True)).run_dir
    opts = ExportOptions(format="all,litert,executorch", out=str(root / "export"), embed_preprocess=True, parity_samples=100)
    export_run(run, opts, Reporter(quiet=True))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
