"""Atomic writes: a reader (or a run restarted after a crash) sees the old file or the
whole new one, never half of it. Write beside the target, fsync, then rename; a folder
(a data set, a patch cache) is built beside its place and published by one rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], object], binary: bool = False,
                 mode: int | None = None) -> None:
    """Call ``write(fh)`` on a temporary file in the same folder, fsync, then ``os.replace``.

    The file is created 0600 (``mkstemp``); ``mode`` sets its permissions before it becomes
    visible (a private key is never readable by others, not even for a moment).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="")) as fh:
            write(fh)
            fh.flush()
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish_dir(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> bool:
    """Make the finished folder ``tmp`` visible as ``final`` in one rename (``final`` may be
    an empty folder). If ``final`` has content already (another process finished first),
    keep it, remove ``tmp`` and return False."""
    try:
        os.rename(tmp, final)  # POSIX: replaces an empty folder, refuses a non-empty one
        return True
    except OSError:
        if not Path(final).is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
