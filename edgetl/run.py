"""The run folder: the one contract between stages.

A run folder (`models/<name>/`) holds everything one training run made and everything derived from
it. This module owns its layout and its recorded facts, and every later stage (resume, export,
quantize, bench, eval, adapt) reaches data and models only through it:

- the exact file lists of each split (`splits.json`), never re-drawn from a seed, and a comparison of
  them with the data folder as it is now: a file that appeared, went or was replaced is a clear
  error (exit 2) unless the user explicitly goes on with the recorded lists;
- the checkpoint and its SHA-256, which every exported model carries: a model of another checkpoint
  is stale, and stages refuse it (bench lists it as skipped);
- a lock, so two processes never write one folder at once, and the clean-up of temporary files a
  killed process left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from edgetl.errors import EdgetlError
from edgetl.fileio import remove_stale_temporaries, sha256_file, write_json

RUN_FORMAT = "edgetl.run"
CHECKPOINT = "checkpoint.pt"
LAST = "last.pt"
MANIFEST = "manifest.json"
SPLITS = "splits.json"
METRICS = "metrics.json"
HISTORY = "history.csv"
EXPORT_REPORT = "export.json"
QUANTIZE_REPORT = "quantize.json"
TARGET = "target.json"  # an adapted run's target images (see edgetl.target)
TRAIN_VECTORS = "train_vectors.npz"  # the training images' 8x8 grey thumbnails (edgetl.duplicates.write_train_vectors)
LOCK = ".edgetl.lock"

# Files an export folder may hold, each derived from one checkpoint (directly, or through its parent).
MODEL_FILES = {
    "onnx": "model.onnx",
    "onnx_uint8": "model.uint8.onnx",
    "onnx_int8": "model.int8.onnx",
    "openvino": "openvino/model.xml",
    "openvino_fp16": "openvino-fp16/model.xml",
    "openvino_int8": "openvino-int8/model.xml",
    "litert": "model.tflite",
    "litert_int8": "model.int8.tflite",
    "executorch": "model.pte",  # metadata in model.pte.json beside it (see edgetl.backends.executorch)
    "executorch_int8": "model.int8.pte",
}
INT8_CHILDREN = {"onnx": "onnx_int8", "openvino": "openvino_int8", "litert": "litert_int8", "executorch": "executorch_int8"}
MODEL_KINDS = {".onnx": "onnx", ".xml": "openvino", ".tflite": "litert", ".pte": "executorch"}
ALLOW_DATA_CHANGE_HINT = "pass --allow-data-change to go on with the recorded file lists (missing files are left out, new ones ignored)"


def is_run(path: Path) -> bool:
    """An edgetl run folder: its manifest says so, or it holds a checkpoint."""
    if (path / CHECKPOINT).is_file() or (path / LAST).is_file():
        return True
    try:
        man = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(man, dict) and (man.get("format") == RUN_FORMAT or "edgetl_version" in man)


# The lock descriptors this process holds. A forked child closes its copies at once: a flock belongs to the
# open file description, which a fork shares, so a child that outlived a killed parent (a DataLoader worker
# waits up to 5 s to notice) would otherwise keep the folder locked after the command is gone.
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    # The child's copy points at /dev/null instead (the parent's descriptor and lock stay): the number stays
    # taken, so a child that runs on through `locked`'s clean-up unlocks and closes nothing of its own.
    if not _HELD_LOCKS:  # every fork of the process runs this: most hold nothing
        return
    try:
        null = os.open(os.devnull, os.O_RDWR)
    except OSError:
        return
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.dup2(null, fd)
    os.close(null)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


@contextlib.contextmanager
def locked(folder: Path, action: str) -> Iterator[None]:
    """Hold the folder's lock for `action`; a second process is refused at once, not queued. With the
    lock held no other edgetl process writes here, so leftover temporary files are stale: remove them."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_CREAT | os.O_RDWR, 0o666)
    except OSError as exc:
        raise EdgetlError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EdgetlError(f"{folder} is in use by another edgetl process: {action} refused; wait for it to finish") from None
        _HELD_LOCKS.add(fd)
        try:
            remove_stale_temporaries(folder)
            yield
        finally:
            _HELD_LOCKS.discard(fd)
            # Unlock explicitly: flock belongs to the open file description, which a plain fork (a DataLoader
            # worker, OpenVINO's telemetry sender) shares with its child, and closing our descriptor alone
            # would leave the folder locked for as long as such a child lives (the hook above covers forks
            # made through Python; a library that calls fork() from C skips it).
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def check_new_run_folder(path: Path) -> list[Path]:
    """Before any image is decoded: the folder can be written and holds none of the user's files. Returns
    the folders it made (`path` and missing parents, deepest first), for a failed start to remove."""
    if path.exists() and not path.is_dir():
        raise EdgetlError(f"--out {path} is a file, not a folder")
    if path.is_dir():
        if is_run(path):
            raise EdgetlError(f"{path} already holds a run: use --resume {path} to continue it, or another --out")
        if any(not p.name.startswith(".") for p in path.iterdir()):
            raise EdgetlError(f"{path} is not empty and is not an edgetl run: refusing to write into it (choose an empty or new folder)")
    made = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".edgetl-write-probe.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise EdgetlError(f"cannot write the run folder {path}: {exc.strerror or exc}") from None
    return made


@dataclass
class DataCheck:
    """How the data folder differs from what the run recorded."""

    appeared: list[str] = field(default_factory=list)
    went: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)  # same name, other size or class

    def __bool__(self) -> bool:
        return bool(self.appeared or self.went or self.replaced)

    def summary(self) -> str:
        parts = []
        for word, files in (("appeared", self.appeared), ("went", self.went), ("changed", self.replaced)):
            if files:
                shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
                parts.append(f"{len(files)} file(s) {word} ({shown})")
        return "; ".join(parts)


@dataclass
class ExportedModel:
    key: str  # a MODEL_FILES key
    path: Path
    checkpoint_sha256: str | None

    @property
    def kind(self) -> str:
        return MODEL_KINDS.get(self.path.suffix, "onnx")


def model_checkpoint_hash(path: Path) -> str | None:
    """The checkpoint hash an exported model carries in its metadata (None when it has none)."""
    try:
        if path.suffix == ".xml":
            from edgetl.backends.openvino import read_metadata

            return read_metadata(path).get("checkpoint_sha256")
        if path.suffix == ".tflite":
            from edgetl.backends.litert import read_metadata as read_tflite_metadata

            return read_tflite_metadata(path).get("checkpoint_sha256")
        if path.suffix == ".pte":
            from edgetl.backends.executorch import read_metadata as read_pte_metadata

            return read_pte_metadata(path).get("checkpoint_sha256")
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return next((p.value for p in proto.metadata_props if p.key == "checkpoint_sha256"), None)
    except Exception:  # an unreadable model file is as unusable as a stale one
        return None


def exported_models(folder: Path) -> list[ExportedModel]:
    found = [(k, folder / rel) for k, rel in MODEL_FILES.items() if (folder / rel).is_file()]
    return [ExportedModel(k, p, model_checkpoint_hash(p)) for k, p in found]


class RunFolder:
    """One run folder and the facts it recorded. Open an existing one with `RunFolder.open`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> RunFolder:
        """An existing run; a checkpoint file stands for its folder."""
        p = Path(path)
        if p.is_file() and p.suffix == ".pt":
            p = p.parent
        if not p.exists():
            raise EdgetlError(f"run folder not found: {path}")
        if p.is_file() and p.suffix in (".onnx", ".xml", ".tflite", ".pte"):
            raise EdgetlError(f"{path} is an exported model, not a run folder: give its run folder, or score the model "
                              f"file itself on labelled images with `edgetl bench {path} --data DATA`")  # fmt: skip
        if not p.is_dir() or not is_run(p):
            raise EdgetlError(f"{path} is not an edgetl run folder (no {CHECKPOINT}, {LAST} or {MANIFEST})")
        return cls(p)

    # -- paths ------------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    # -- recorded facts ---------------------------------------------------------------------------

    def read_json(self, name: str) -> dict[str, Any]:
        try:
            obj = json.loads((self.path / name).read_text())
        except FileNotFoundError:
            raise EdgetlError(f"{self.path} has no {name}: was the run trained by this version of edgetl?") from None
        except (OSError, ValueError) as exc:
            raise EdgetlError(f"{self.path / name} is not readable JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise EdgetlError(f"{self.path / name} is not an edgetl record")
        return obj

    @cached_property
    def manifest(self) -> dict[str, Any]:
        return self.read_json(MANIFEST)

    def checkpoint(self) -> dict[str, Any]:
        from edgetl import checkpoint

        if not self.checkpoint_path.is_file():
            raise EdgetlError(f"{self.path} has no {CHECKPOINT} yet: the run has not finished an epoch (resume it with --resume)")
        return checkpoint.read(self.checkpoint_path)

    @cached_property
    def checkpoint_sha256(self) -> str:
        if not self.checkpoint_path.is_file():
            raise EdgetlError(f"{self.path} has no {CHECKPOINT}")
        return sha256_file(self.checkpoint_path)

    @cached_property
    def _split_record(self) -> dict[str, Any]:
        """splits.json, read once (it lists every image: large for large datasets)."""
        rec = self.read_json(SPLITS)
        if "splits" not in rec:  # version 1: {split: [[key, class], ...]}; the rest is in the manifest
            ds = self.manifest.get("dataset", {})
            rec = {"root": ds.get("root"), "kind": ds.get("kind"), "classes": ds.get("classes"), "splits": rec}
        if not rec.get("root") or not rec.get("kind") or not rec.get("classes"):
            raise EdgetlError(f"{self.path / SPLITS} does not say where the data is (root, kind, classes)")
        return rec

    def split_record(self) -> dict[str, Any]:
        return self._split_record

    def target_record(self) -> dict[str, Any] | None:
        """The target images an adapted run was adapted on (None for a trained run)."""
        return self.read_json(TARGET) if (self.path / TARGET).is_file() else None

    @property
    def lineage(self) -> dict[str, Any] | None:
        """Where an adapted run came from (parent run and checkpoint hash, method, target images)."""
        return self.manifest.get("lineage") if (self.path / MANIFEST).is_file() else None

    @property
    def data_root(self) -> Path:
        return Path(self.split_record()["root"])

    def check_data(self) -> DataCheck:
        """Compare the recorded file lists with the data folder as it is now (names, classes, sizes)."""
        from edgetl.data import current_listing, recorded_listing

        rec = self.split_record()
        root = Path(rec["root"])
        if not root.exists():
            raise EdgetlError(f"the run's data ({root}) is not here: the recorded file lists need the images (move them "
                              "back; export and bench can check on other labelled images with --data DIR)")  # fmt: skip
        recorded = recorded_listing(rec)
        now = current_listing(root, rec["kind"], rec.get("patterns"))
        check = DataCheck(
            appeared=sorted(set(now) - set(recorded)),
            went=sorted(set(recorded) - set(now)),
            replaced=sorted(k for k in set(now) & set(recorded) if _differs(now[k], recorded[k], rec["kind"])),
        )
        return check

    def dataset(self, allow_changed: bool = False, reporter: Any = None) -> Any:
        """The run's dataset exactly as recorded. A changed data folder is an error (exit 2) unless
        `allow_changed`: then the recorded lists are used, less the files that are gone."""
        from edgetl.data import dataset_from_record

        check = self.check_data()
        root = self.data_root
        if check and not allow_changed:
            raise EdgetlError(f"the data at {root} changed since this run was trained: {check.summary()}; {ALLOW_DATA_CHANGE_HINT}")
        if check and reporter is not None:
            reporter.warn(f"the data changed since training ({check.summary()}); using the recorded file lists")
        ds = dataset_from_record(self.split_record())
        if check.replaced:  # a replaced file is not the image that was recorded: leave it out like a missing one
            gone = set(check.replaced)
            for name, ls in ds.all_sets().items():
                keep = [i for i, r in enumerate(ls.refs) if r.key not in gone]
                setattr(ds, name, ls.subset(keep))
        return ds

    # -- exported models --------------------------------------------------------------------------

    def models(self, folder: Path | None = None) -> list[ExportedModel]:
        return exported_models(folder or self.path)

    def stale_reason(self, model: ExportedModel) -> str | None:
        """Why an exported model does not belong to the run's current checkpoint (None if it does)."""
        current = self.checkpoint_sha256
        if model.checkpoint_sha256 is None:
            return f"{model.path.name} carries no checkpoint hash (not an edgetl export, or unreadable)"
        if model.checkpoint_sha256 != current:
            return (f"{model.path} was exported from checkpoint {model.checkpoint_sha256[:12]}, but the run's checkpoint is now "
                    f"{current[:12]} (retrained or resumed since): export it again")  # fmt: skip
        return None

    def write(self, name: str, obj: dict[str, Any]) -> Path:
        target = self.path / name
        write_json(target, obj)
        return target


def _differs(now: tuple[str, int | None], recorded: tuple[str, int | None], kind: str) -> bool:
    if kind == "idx":  # IDX keys carry the label index; the class name was resolved from labels.txt at training
        return False
    cls_now, size_now = now
    cls_rec, size_rec = recorded
    return cls_now != cls_rec or (size_rec is not None and size_now is not None and size_now != size_rec)


def export_folder_run(folder: str | os.PathLike[str]) -> tuple[RunFolder, Path]:
    """The run an export folder belongs to, and the folder: a run folder is its own export folder;
    an `export --out` folder names its run in its export.json."""
    p = Path(folder)
    if p.is_dir() and is_run(p):
        return RunFolder(p), p
    report = p / EXPORT_REPORT
    if p.is_dir() and report.is_file():
        try:
            run = json.loads(report.read_text())["run"]
        except (OSError, ValueError, KeyError, TypeError):
            raise EdgetlError(f"{report} does not name the run it was exported from") from None
        return RunFolder.open(run), p
    if not p.exists():
        raise EdgetlError(f"folder not found: {folder}")
    raise EdgetlError(f"{folder} is neither an edgetl run folder nor an export folder (no {EXPORT_REPORT}): run `edgetl export` first")
