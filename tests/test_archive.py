"""Hostile archives are refused before anything is written; benign ones extract regular files only."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

from provenance.errors import UnsafeArchive
from provenance.inputs.archive import extract


def make_tar(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def reg(name, data=b"int x;\n"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name, kind, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


HOSTILE = {
    "traversal": [reg("pkg/ok.c"), reg("pkg/../../evil.c")],
    "absolute": [reg("/tmp/evil.c")],
    "symlink-escape": [special("pkg/link", tarfile.SYMTYPE, "../../etc/passwd")],
    "symlink-absolute": [special("pkg/link", tarfile.SYMTYPE, "/etc/passwd")],
    "hardlink-escape": [special("pkg/hard", tarfile.LNKTYPE, "../outside")],
    "char-device": [special("pkg/tty", tarfile.CHRTYPE)],
    "block-device": [special("pkg/sda", tarfile.BLKTYPE)],
    "fifo": [special("pkg/pipe", tarfile.FIFOTYPE)],
}
REASON = {"traversal": "'..'", "absolute": "absolute path", "symlink-escape": "outside the archive root",
          "symlink-absolute": "absolute path", "hardlink-escape": "outside the archive root",
          "char-device": "device", "block-device": "device", "fifo": "device or FIFO"}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tar_refused_and_nothing_written(tmp_path, case):
    archive = make_tar(tmp_path / f"{case}.tar.gz", HOSTILE[case])
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchive) as e:
        extract(archive, dest)
    assert REASON[case] in str(e.value) and f"{case}.tar.gz" in str(e.value)
    assert not any(dest.rglob("*")), "nothing may be written before the whole archive is checked"
    assert not (tmp_path / "evil.c").exists()


@pytest.mark.parametrize("name", ["../evil.c", "/abs/evil.c", "a/../../evil.c"])
def test_hostile_zip_refused(tmp_path, name):
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.c", "int y;\n")
        zf.writestr(name, "evil\n")
    with pytest.raises(UnsafeArchive):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.c").exists() and not any((tmp_path / "out").rglob("*"))


def test_zip_symlink_escape_refused(tmp_path):
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "../../etc/passwd")
    with pytest.raises(UnsafeArchive, match="outside the archive root"):
        extract(archive, tmp_path / "out")


def test_benign_tar_extracts_regular_files_only(tmp_path):
    archive = make_tar(tmp_path / "ok.tar.gz", [
        reg("pkg/a.c", b"int a;\n"), reg("pkg/sub/b.h", b"#define B\n"),
        special("pkg/sub/link.h", tarfile.SYMTYPE, "b.h"),  # inside the root: allowed, not materialized
        special("pkg/sub/dotdot.h", tarfile.SYMTYPE, "../a.c"),
    ])
    extract(archive, tmp_path / "out")
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["pkg/a.c", "pkg/sub/b.h"]
    assert (tmp_path / "out/pkg/sub/b.h").read_bytes() == b"#define B\n"
    assert not any(p.is_symlink() for p in (tmp_path / "out").rglob("*"))


def test_corrupt_archive_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tarball at all")
    with pytest.raises(UnsafeArchive, match="cannot read archive"):
        extract(bad, tmp_path / "out")
