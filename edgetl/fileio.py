"""Write files whole or not at all, readable by whoever the user's umask allows.

Every artifact goes to a temporary file in the destination folder, is flushed to disk (fsync), and
is renamed into place, so a crash, Ctrl-C or power cut never leaves a truncated checkpoint, model or
report behind (rename is atomic on one file system, which the same folder guarantees; the folder is
fsynced after the rename so the new name survives too). `tempfile` creates files 0600 and folders
0700; the final artifacts get the modes a plain `open()`/`mkdir` would give (0644/0755 under the
usual umask 022), so a model exported by one user can be served by another.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` (an IR folder written by a library) and fix their modes."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            p.chmod(file_mode())
            fsync_path(p)
        Path(dirpath).chmod(dir_mode())
        fsync_path(dirpath)


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A temporary folder beside where its content will go (same file system, so it can be renamed)."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{prefix}.", suffix=TMP_SUFFIX, dir=parent))


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is flushed, given the umask's mode and
    replaces `target`; on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(file_mode())
        fsync_path(tmp_path)
        os.replace(tmp_path, target)
        fsync_path(target.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written temporary folder into place, replacing `final_dir` (flushed first)."""
    import shutil

    fsync_tree(tmp_dir)
    if final_dir.exists():
        # A rename cannot replace a non-empty folder: move the old one aside first, then drop it.
        old = final_dir.with_name(f".{final_dir.name}.old{TMP_SUFFIX}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    fsync_path(final_dir.parent)


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Delete `.*.tmp` files and folders a killed process left behind (call with the folder's lock held)."""
    import shutil

    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.rglob(f".*{TMP_SUFFIX}"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(str(p.relative_to(folder)))
    return removed


def write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | os.PathLike[str], text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike[str], obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_csv(target: str | os.PathLike[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    if rows:
        fields: list[str] = []
        for row in rows:
            fields.extend(k for k in row if k not in fields)
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    write_text(target, buf.getvalue())


def write_with(target: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Let `writer` fill a temporary path (a library that wants a file name), then move it into place."""
    with atomic_path(target) as tmp:
        writer(tmp)


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays turn up in metrics; Paths in configs.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
