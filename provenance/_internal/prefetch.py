"""Hashing a model dir in the background, started as early as the process can: the light part of
the closed-set check (verify/model_dir.py), importable without the verifier or the attestation model.

`verify-attestation` spends most of its time hashing; everything else it does (imports, reading
keys, checking the signature and the statement) overlaps with hashing only if hashing has begun.
`start_from_argv` reads `--model` from the raw command line before argparse and the rest are
imported; `take` hands the running prefetch to the command once its arguments are parsed, or
None if they differ. A prefetched digest is never trusted blindly (see Prefetch).
"""

from __future__ import annotations

import os
import stat
import threading

from .hashing import TYPE_CHECKING, hash_fd

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from pathlib import Path
# pathlib (with urllib and ipaddress) and the rest load while hashing runs: paths here are strings.


PATH_MAX = 4096  # Linux's: a longer path cannot be opened by name


def hub_blobs(model_dir: str | Path) -> str | None:
    """The blobs/ directory of huggingface_hub's cache repository whose snapshot `model_dir` is
    (`models--ORG--NAME/snapshots/REV/`, beside `models--ORG--NAME/blobs/`), or None."""
    snap = os.path.realpath(model_dir)
    snapshots = os.path.dirname(snap)
    blobs = os.path.join(os.path.dirname(snapshots), "blobs")
    if os.path.basename(snapshots) == "snapshots" and os.path.isdir(blobs) and not os.path.islink(blobs):
        return os.path.realpath(blobs)
    return None


def _hub_blob(link: str, blobs: str) -> str | None:
    """The blob a snapshot's symlink names, if it is one: a relative link straight to a regular file
    directly in the repository's blobs/ (as huggingface_hub writes them; through no other link, and not
    ending in "/", which no loader can open as a file), else None."""
    try:
        target = os.readlink(link)
    except OSError:
        return None
    blob = os.path.realpath(link)
    lexical = os.path.normpath(os.path.join(os.path.realpath(os.path.dirname(link)), target))
    if os.path.isabs(target) or target.endswith("/") or blob != lexical or os.path.dirname(blob) != blobs:
        return None
    try:
        return blob if stat.S_ISREG(os.lstat(blob).st_mode) else None
    except OSError:
        return None


def scan(model_dir: str | Path) -> tuple[dict[str, str], list[str]]:
    """(regular files' paths by relative POSIX name, entries that may not be in a model dir).

    In a snapshot of huggingface_hub's cache (hub_blobs), a symlink into the repository's blobs/ is
    read through: its path is the blob's. Every other symlink is refused, as anywhere else."""
    files: dict[str, str] = {}
    refused: list[str] = []
    blobs = hub_blobs(model_dir)
    stack = [(os.fspath(model_dir), "")]
    while stack:
        d, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as err:
            from ..errors import InputError

            raise InputError(f"--model {model_dir}: cannot list {d}: {err.strerror}") from None
        for e in entries:
            rel = prefix + e.name
            if len(os.fsencode(e.path)) >= PATH_MAX:
                refused.append(f"{rel[:60]}…{rel[-20:]}: a path of {len(os.fsencode(e.path))} bytes, longer than the "
                               f"system opens ({PATH_MAX}); a model dir holds no such path")
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError as err:
                refused.append(f"{rel}: cannot be examined ({err.strerror})")
                continue
            if stat.S_ISLNK(st.st_mode):
                blob = _hub_blob(e.path, blobs) if blobs else None
                if blob is not None:
                    files[rel] = blob
                    continue
                try:
                    target = os.readlink(e.path)
                except OSError:
                    target = "?"
                refused.append(f"{rel}: a symlink (-> {target}); a model dir holds only regular files"
                               + ("" if blobs is None else ", and in huggingface_hub's cache only a relative "
                                  "link to a file in the repository's blobs/"))
            elif stat.S_ISDIR(st.st_mode):
                stack.append((e.path, rel + "/"))
            elif stat.S_ISREG(st.st_mode):
                files[rel] = e.path
            else:
                kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                        else "a device")
                refused.append(f"{rel}: {kind}; a model dir holds only regular files")
    return files, refused


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _Abandoned(Exception):
    """The file being hashed is not one the statement lists: stop reading it."""


class Prefetch:
    """Hash a model dir's regular files in a background thread, started before the signature is
    checked, so that start-up and hashing overlap (blake3 releases the GIL). Nothing is trusted
    from it blindly: `inspect` reuses a digest only for a file it has itself opened (without
    following symlinks) whose device, inode, size, mtime and ctime equal those of the file that
    was hashed, checked before and after hashing; anything else is hashed again.

    Once the statement is known, `limit_to` names the files it lists: any other file is left
    unread from then on, and one being hashed is abandoned within a chunk (an unlisted file fails
    by its name alone, so a 15 TB sparse file beside the model costs nothing)."""

    def __init__(self, model_dir: str | Path, *, sha256: bool) -> None:
        self.sha256 = sha256
        self._done: dict[str, tuple[tuple[int, ...], dict[str, str]]] = {}
        self._wanted: frozenset[str] | None = None
        self._thread = threading.Thread(target=self._run, args=(os.fspath(model_dir),), daemon=True)
        self._thread.start()

    def limit_to(self, names: Iterable[str]) -> None:
        """Hash only these names from now on."""
        self._wanted = frozenset(names)

    def _checker(self, rel: str) -> Callable[[int], None]:
        """The progress callback of one file's hashing: it abandons the file once it is not wanted."""

        def progress(_n: int) -> None:
            self._check(rel)

        return progress

    def _unwanted(self, rel: str) -> bool:
        wanted = self._wanted
        return wanted is not None and rel not in wanted

    def _run(self, model_dir: str) -> None:
        try:
            files, _ = scan(model_dir)
        except Exception:  # noqa: BLE001 - a speculative prefetch; inspect() reports real errors
            return
        for rel, path in files.items():
            if self._unwanted(rel):
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                before = os.fstat(fd)
                if not stat.S_ISREG(before.st_mode):
                    continue
                digests = hash_fd(fd, sha256=self.sha256, progress=self._checker(rel))
                if _identity(os.fstat(fd)) == _identity(before):
                    self._done[rel] = (_identity(before), digests)
            except (OSError, _Abandoned):
                continue
            finally:
                os.close(fd)

    def _check(self, rel: str) -> None:
        if self._unwanted(rel):
            raise _Abandoned(rel)

    def get(self, rel: str, identity: tuple[int, ...], sha256: bool) -> dict[str, str] | None:
        self._thread.join()
        got = self._done.get(rel)
        if got is None or got[0] != identity or (sha256 and not self.sha256):
            return None
        return got[1]


_early: Prefetch | None = None
_early_key: tuple[str, bool] | None = None


def start_from_argv(argv: list[str]) -> None:
    """Start hashing the `--model DIR` named in `argv`, if any and if it is a directory.

    Speculative: a malformed command line starts nothing, and the parsed arguments decide later
    (`take`) whether the result is used."""
    global _early, _early_key
    model = None
    for i, a in enumerate(argv):
        if a == "--":
            break
        if a == "--model" and i + 1 < len(argv):
            model = argv[i + 1]
        elif a.startswith("--model="):
            model = a[len("--model="):]
    if not model or "\0" in model or not os.path.isdir(model):
        return
    sha256 = "--sha256" in argv
    _early, _early_key = Prefetch(model, sha256=sha256), (os.path.abspath(model), sha256)


def take(model_dir: str | Path, *, sha256: bool) -> Prefetch:
    """The prefetch started from the command line for this dir and digest set, or a new one."""
    global _early, _early_key
    got, key = _early, _early_key
    _early = _early_key = None
    if got is not None and key == (os.path.abspath(model_dir), sha256):
        return got
    return Prefetch(model_dir, sha256=sha256)
