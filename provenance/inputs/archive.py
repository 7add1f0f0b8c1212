"""Safe extraction of input archives (.tar.gz, .tar.xz, .tar.bz2, .zip).

Only regular files and directories are written. A member with an absolute path or `..`,
a link that points outside the root, or a device/FIFO is refused before anything is written.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from ..errors import UnsafeArchive


def _member_path(archive: Path, name: str) -> PurePosixPath:
    """Validate a member name and return it as a relative path, or raise UnsafeArchive."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchive(f"{archive.name}: member {name!r} has an absolute path; refusing to extract")
    if "\\" in name or "\x00" in name:
        raise UnsafeArchive(f"{archive.name}: member {name!r} has a backslash or NUL in its name")
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"{archive.name}: member {name!r} contains '..' (path traversal); refusing to extract")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _check_link(archive: Path, name: PurePosixPath, target: str, hard: bool) -> None:
    if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        raise UnsafeArchive(f"{archive.name}: link {str(name)!r} points to absolute path {target!r}")
    base = [] if hard else list(name.parent.parts)
    depth = len(base)
    for part in PurePosixPath(target).parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                raise UnsafeArchive(f"{archive.name}: link {str(name)!r} -> {target!r} points outside the archive root")
        elif part not in ("", "."):
            depth += 1


def _plan_tar(archive: Path, tar: tarfile.TarFile) -> list[tuple[PurePosixPath, tarfile.TarInfo]]:
    plan = []
    for m in tar.getmembers():
        rel = _member_path(archive, m.name)
        if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
            raise UnsafeArchive(f"{archive.name}: member {m.name!r} is a device or FIFO; refusing to extract")
        if m.issym() or m.islnk():
            _check_link(archive, rel, m.linkname, hard=m.islnk())
            continue  # links are validated but never materialized: only regular files are data
        if not (m.isfile() or m.isdir()):
            raise UnsafeArchive(f"{archive.name}: member {m.name!r} has unsupported type {m.type!r}")
        plan.append((rel, m))
    return plan


def _plan_zip(archive: Path, zf: zipfile.ZipFile) -> list[tuple[PurePosixPath, zipfile.ZipInfo]]:
    plan = []
    for info in zf.infolist():
        rel = _member_path(archive, info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            _check_link(archive, rel, zf.read(info).decode("utf-8", "replace"), hard=False)
            continue
        if mode and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            raise UnsafeArchive(f"{archive.name}: member {info.filename!r} is a device or FIFO; refusing to extract")
        plan.append((rel, info))
    return plan


def extract(archive: Path, dest: Path, name: str | None = None) -> None:
    """Extract `archive` into the empty directory `dest`. Raises UnsafeArchive before writing."""
    label = name or archive.name
    lower = label.lower()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if lower.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                plan = _plan_zip(Path(label), zf)
                for rel, info in plan:
                    out = dest / rel
                    if info.is_dir():
                        out.mkdir(parents=True, exist_ok=True)
                        continue
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        else:
            with tarfile.open(archive, "r:*") as tar:
                plan = _plan_tar(Path(label), tar)
                for rel, m in plan:
                    out = dest / rel
                    if m.isdir():
                        out.mkdir(parents=True, exist_ok=True)
                        continue
                    out.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(m)
                    with src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise UnsafeArchive(f"{label}: cannot read archive: {e}") from None
