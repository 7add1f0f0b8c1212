"""Atomic files: write to a temporary file in the same directory, fsync, rename.

Anything a later step trusts is written this way, so an interrupted run leaves either the old
file or the new one, never half of one.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from ..errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def output_file_problem(path: Path) -> str | None:
    """Why a file cannot be written at `path` (None if it can). A rename replaces whatever has the name,
    so an existing directory, symbolic link, device, FIFO or socket is refused, never replaced (run as
    root, `--out /dev/full` had replaced the device with a regular file); and the nearest existing
    directory on the way must be writable (missing ones are created)."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except NotADirectoryError:
        return "a component of the path is a file, not a directory"
    except OSError as e:
        return f"cannot be examined ({e.strerror})"
    if mode is not None and not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a symbolic link" if stat.S_ISLNK(mode)
                else "a device, FIFO or socket")
        return f"exists and is {kind}, which is never replaced; name a regular file"
    probe = next((p for p in path.parents if p.exists() or p.is_symlink()), Path("."))
    if not probe.is_dir():
        return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` via a temporary sibling and a rename; readers never see half.
    Raises InputError, naming `path`, where no file can be put there (output_file_problem)."""
    path = Path(path)
    problem = output_file_problem(path)
    if problem:
        raise InputError(f"{path}: {problem}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as e:
        raise InputError(f"{path}: cannot write a file there ({e.strerror})") from None
    try:
        os.fchmod(fd, mode & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
