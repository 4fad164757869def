"""TensorBoard event files in the run folder, so `tensorboard --logdir models/` shows runs live.

torch.utils.tensorboard writes them. Per training step: loss and learning rate; per epoch: training
and validation loss and top-1, learning rate, images/s and seconds, under the stage's name, and the
validation curves of both stages on one axis (`run/...`, by global epoch). Rank 0 alone writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Seconds between flushes to disk: short, so a live TensorBoard is at most this far behind.
FLUSH_SECONDS = 5


def _without_tensorflow() -> None:
    """TensorBoard writes event files through the real TensorFlow whenever it is installed (the litert
    extra installs it): about 1 GB resident and seconds of import in every training process, for
    nothing. The empty `tensorboard.compat.notf` module is TensorBoard's own switch to its stub."""
    import sys
    import types

    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


class TrainLog:
    def __init__(self, run_dir: Path) -> None:
        _without_tensorflow()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir), flush_secs=FLUSH_SECONDS)

    def step(self, stage: str, loss: float, lr: float, step: int) -> None:
        """One optimisation step; `step` counts the stage's steps (the scheduler's, so a resume continues it)."""
        self.writer.add_scalar(f"{stage}/step_loss", loss, step)
        self.writer.add_scalar(f"{stage}/step_lr", lr, step)

    def epoch(self, row: dict[str, Any]) -> None:
        stage, epoch = row["stage"], int(row["epoch"])
        for key in ("train_loss", "val_loss", "train_top1", "val_top1", "lr", "seconds", "train_images_per_second"):
            if row.get(key) is not None:
                self.writer.add_scalar(f"{stage}/{key}", float(row[key]), epoch)
        for key in ("val_loss", "val_top1"):
            self.writer.add_scalar(f"run/{key}", float(row[key]), int(row["global_epoch"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
