"""Write files so that an interruption leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp_path)` for a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: a report on a shared disk is for colleagues too
        os.replace(tmp, path)
        _fsync_folder(path.parent)  # the rename itself survives a crash only once the folder is on disk
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _umask() -> int:
    """The process's umask. Reading it means setting it for an instant, which another thread's new file could
    catch; the report threads' files are written by this module, under this lock."""
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform or file system without directory handles
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_text(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, data: Any) -> Path:
    """`data` as JSON; a NaN or infinite number is written as null (bare NaN is no JSON: strict readers refuse it)."""
    text = json.dumps(_finite(data), indent=2, sort_keys=False, default=str, allow_nan=False)
    return write_text(path, text + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def write_csv(path: Path, frame) -> Path:
    """Write a pandas DataFrame as CSV, atomically."""
    return write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False))
