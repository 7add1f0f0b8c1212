"""Safe extraction of input archives (.tar.gz, .tar.xz, .tar.bz2, .zip).

Only regular files and directories are written. A member with an absolute path or `..`,
a link that points outside the root, or a device/FIFO is refused before anything is written.
"""

from __future__ import annotations

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


class _Budget:
    """Bytes and files an extraction may still write; refuses past the recipe's [limits]."""

    def __init__(self, label: str, limits) -> None:
        self.label = label
        self.bytes_left = limits.max_extracted_bytes if limits else 8 << 30
        self.files_left = limits.max_extracted_files if limits else 500_000

    def file(self) -> None:
        self.files_left -= 1
        if self.files_left < 0:
            raise UnsafeArchive(f"{self.label}: more members than limits.max_extracted_files allows; refusing "
                                "to extract (raise the limit in the recipe's [limits] if the archive is genuine)")

    def declared(self, declared: int) -> None:
        if declared > self.bytes_left:
            raise UnsafeArchive(f"{self.label}: members declare more than limits.max_extracted_bytes; refusing to "
                                "extract (a decompression bomb, or raise the limit in the recipe's [limits])")

    def copy(self, src, dst) -> None:
        """Copy counting the bytes actually written (a member's declared size may lie)."""
        while chunk := src.read(1 << 20):
            self.bytes_left -= len(chunk)
            if self.bytes_left < 0:
                raise UnsafeArchive(f"{self.label}: extracted data exceeds limits.max_extracted_bytes; stopped")
            dst.write(chunk)


def extract(archive: Path, dest: Path, name: str | None = None, limits=None) -> None:
    """Extract `archive` into the empty directory `dest`. Raises UnsafeArchive before writing for an
    unsafe member, and stops at the recipe's [limits] (bytes and files)."""
    label = name or archive.name
    lower = label.lower()
    budget = _Budget(label, limits)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if lower.endswith(".zip"):
            zf_cm = zipfile.ZipFile(archive)
        else:
            zf_cm = tarfile.open(archive, "r:*")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise UnsafeArchive(f"{label}: cannot read archive: {e}") from None
    with zf_cm as arc:
        try:
            plan = _plan_zip(Path(label), arc) if isinstance(arc, zipfile.ZipFile) else _plan_tar(Path(label), arc)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise UnsafeArchive(f"{label}: cannot read archive: {e}") from None
        total = 0
        for _, m in plan:
            total += m.file_size if isinstance(m, zipfile.ZipInfo) else m.size
        budget.declared(total)
        for rel, m in plan:
            out = dest / rel
            is_dir = m.is_dir() if isinstance(m, zipfile.ZipInfo) else m.isdir()
            try:
                if is_dir:
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                budget.file()
                out.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UnsafeArchive(f"{label}: cannot write {rel}: {e.strerror}") from None
            try:
                src = arc.open(m) if isinstance(arc, zipfile.ZipFile) else arc.extractfile(m)
            except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, RuntimeError) as e:
                raise UnsafeArchive(f"{label}: cannot read member {rel}: {e}") from None
            try:
                dst = open(out, "wb")
            except OSError as e:
                raise UnsafeArchive(f"{label}: cannot write {rel}: {e.strerror}") from None
            with src, dst:
                try:
                    budget.copy(src, dst)
                except (tarfile.TarError, zipfile.BadZipFile, EOFError, RuntimeError) as e:
                    raise UnsafeArchive(f"{label}: cannot read member {rel}: {e}") from None
                except OSError as e:
                    raise UnsafeArchive(f"{label}: cannot extract {rel}: {e.strerror or e}") from None
