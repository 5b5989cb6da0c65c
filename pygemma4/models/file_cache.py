"""The cache of generated model files, and writing a file so that it is never seen half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["cache_root", "cached_file", "write_atomically"]


def cache_root() -> Path:
    """The cache directory: $PYGEMMA4_CACHE, or ~/.cache/pygemma4 where that is not set."""
    configured = os.environ.get("PYGEMMA4_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "pygemma4"


def write_atomically(path: Path, write: Callable[[Path], None], *, durable: bool = True) -> None:
    """Have `write` write a file to a path it is given, then put that file at `path`.

    `write` is given a temporary path beside `path`, whose name starts with "." and ends in
    ".tmp"; `path` then names either its previous file or the complete new one (mode 0o644),
    never a partial one. Where `write` or the rename fails or is interrupted, the temporary
    file is removed. durable: flush the file to disk before the rename, so that not even a
    crash of the machine can leave `path` naming an incomplete file.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        tmp.chmod(0o644)  # mkstemp creates the file readable by its owner only
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def cached_file(path: Path, write: Callable[[Path], None]) -> Path:
    """`path`, first written by `write` (durably, with `write_atomically`) where it is not a
    file yet; its directory is created as needed.

    Processes that race to create the same file each see either no file or a complete one.
    """
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, write)
    return path
