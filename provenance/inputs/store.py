"""The content-addressed input store, and fetching inputs into it by their pins.

Layout under the root: blobs/<blake3> (the bytes), sha256/<sha256> (holds the blake3 name),
trees/<blake3> (snapshots of directory inputs), tmp/ (work in progress); beside them the builder's
stages/ (the stage cache, named by their keys) and kernels/ (compiled libraries). A blob enters only
after the copy's digest matched the pin, and is re-hashed on every use; a corrupt entry is removed,
never served. `provenance store fsck` re-hashes everything named by its content.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._internal.atomic import atomic_write_bytes
from .._internal.hashing import CHUNK, hash_file
from ..errors import DigestMismatch, FetchError, InputError
from ..recipe import Input


def default_root() -> Path:
    env = os.environ.get("PROVENANCE_STORE")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache) if cache else Path.home() / ".cache") / "provenance"


@dataclass(frozen=True)
class StoredInput:
    """An input whose bytes matched its pin: where they are and what they hash to."""

    input: Input
    path: Path
    digests: dict[str, str]
    source: str  # "store", "pypi", "url", "path", "handed", "model"
    is_dir: bool = False
    parent: Any = None  # a model input: what builder/parent.py verified (its Parent)


def check_pins(inp: Input, digests: dict[str, str], what: str) -> None:
    for algo in ("blake3", "sha256"):
        want = getattr(inp, algo)
        if want is not None and digests.get(algo) != want:
            raise DigestMismatch(what, algo, want, digests.get(algo, "(not computed)"))


class Store:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else default_root()

    def _blob(self, b3: str) -> Path:
        return self.root / "blobs" / b3

    def check_writable(self) -> None:
        """Preflight: the store can be created and written. Raises InputError naming it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.tmpdir(), prefix="probe.")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise InputError(f"the input store {self.root} is not writable ({e.strerror}); "
                             "set --store or $PROVENANCE_STORE to a writable directory") from None

    def tmpdir(self) -> Path:
        d = self.root / "tmp"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def lookup(self, inp: Input) -> Path | None:
        if inp.blake3:
            p = self._blob(inp.blake3)
            return p if p.is_file() else None
        idx = self.root / "sha256" / inp.sha256
        try:
            b3 = idx.read_text().strip()
        except OSError:
            return None
        p = self._blob(b3) if re.fullmatch(r"[0-9a-f]{64}", b3) else None
        return p if p and p.is_file() else None

    def add(self, inp: Input, src: Path, *, what: str, move: bool = False,
            progress=None) -> tuple[Path, dict[str, str]]:
        """Copy (or move) `src` into the store's tmp, hash *the copy*, check it against the pins and
        rename it into place: the bytes stored are the bytes hashed. Raises DigestMismatch, storing
        nothing."""
        tmpdir = self.tmpdir()
        fd, tmp = tempfile.mkstemp(dir=tmpdir, prefix="add.")
        os.close(fd)
        try:
            if move:
                os.replace(src, tmp)
            else:
                shutil.copyfile(src, tmp)
            if progress is not None:
                progress(0, total=os.path.getsize(tmp))
            digests = hash_file(Path(tmp), progress=progress)
            check_pins(inp, digests, what)
            dest = self._blob(digests["blake3"])
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)  # same content under the same name: a concurrent writer's copy is equal
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        atomic_write_bytes(self.root / "sha256" / digests["sha256"], digests["blake3"].encode() + b"\n")
        return dest, digests

    def verify(self, inp: Input, path: Path, progress=None) -> dict[str, str] | None:
        """Re-hash a stored blob. Returns its digests; None after removing a blob that no longer
        matches its own name (corrupt). A good blob that does not match the recipe's *other* pin is
        kept (it is correct under its own key) and the mismatch raised: DigestMismatch."""
        if progress is not None:
            progress(0, total=path.stat().st_size)
        digests = hash_file(path, progress=progress)
        if digests["blake3"] != path.name:
            path.unlink(missing_ok=True)
            return None
        check_pins(inp, digests, f"stored input {inp.name!r} ({path})")
        return digests

    def snapshot_dir(self, inp: Input, src: Path, limits=None) -> tuple[Path, dict[str, str]]:
        """Copy a directory input's regular files into the store, digest *the copy*, check the pin
        and keep it under trees/<blake3>: what is trained on is what was hashed. The recipe's
        [limits] cap the files and bytes copied (a path of `/` or under /proc stops there)."""
        files_left = limits.max_extracted_files if limits else 500_000
        bytes_left = limits.max_extracted_bytes if limits else 8 << 30
        tmp = Path(tempfile.mkdtemp(dir=self.tmpdir(), prefix=f"tree-{inp.name}."))
        try:
            for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
                dirnames.sort()
                for fn in sorted(filenames):
                    p = Path(dirpath) / fn
                    try:
                        st = p.lstat()
                    except OSError:
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    files_left -= 1
                    if files_left < 0:
                        raise InputError(f"directory input {inp.name!r} ({src}): more files than "
                                         "limits.max_extracted_files")
                    dest = tmp / p.relative_to(src)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        with open(p, "rb") as fin, open(dest, "wb") as fout:
                            while chunk := fin.read(CHUNK):
                                bytes_left -= len(chunk)
                                if bytes_left < 0:
                                    raise InputError(f"directory input {inp.name!r} ({src}): more data than "
                                                     "limits.max_extracted_bytes")
                                fout.write(chunk)
                    except OSError as e:
                        raise InputError(f"directory input {inp.name!r}: cannot read {p}: {e.strerror or e}") \
                            from None
            digests = tree_digest(tmp)
            check_pins(inp, digests, f"directory input {inp.name!r} ({src})")
            final = self.root / "trees" / digests["blake3"]
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.is_dir():
                shutil.rmtree(tmp)
            else:
                try:
                    os.replace(tmp, final)
                except OSError:  # a concurrent run put the same tree there first
                    shutil.rmtree(tmp, ignore_errors=True)
            return final, digests
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # What a store's root holds: the entries named by their content, which fsck re-hashes, and the ones
    # named by what made them (the stage cache's keys, the compiled kernels), which it can only count.
    HASHED = ("blobs", "sha256", "trees")
    NAMED = ("stages", "kernels", "licences", "tmp")

    def census(self) -> dict[str, int]:
        """How many entries each of the store's directories holds, and `other`: names at the root that
        are none of them. Raises InputError where the root is missing, not a directory, or not a store
        (it holds only other names)."""
        if not self.root.is_dir():
            raise InputError(f"{self.root}: no input store there ("
                             + ("no such directory" if not self.root.exists() else "not a directory")
                             + "; the store is --store, $PROVENANCE_STORE or ~/.cache/provenance)")
        known = self.HASHED + self.NAMED
        counts = {name: sum(1 for _ in (self.root / name).iterdir()) if (self.root / name).is_dir() else 0
                  for name in known}
        counts["other"] = sum(1 for n in os.listdir(self.root) if n not in known)
        if counts["other"] and not any((self.root / n).is_dir() for n in known):
            raise InputError(f"{self.root}: not an input store (it holds {counts['other']} other name(s) and none of "
                             f"{', '.join(n + '/' for n in known)}); nothing was checked")
        return counts

    def fsck(self, *, repair: bool = False) -> list[str]:
        """Re-hash every entry. Returns one line per problem; with `repair`, removes bad entries."""
        problems: list[str] = []

        def bad(path: Path, why: str) -> None:
            problems.append(f"{path}: {why}" + (" (removed)" if repair else ""))
            if repair:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

        blobs = self.root / "blobs"
        for p in sorted(blobs.iterdir()) if blobs.is_dir() else []:
            if not p.is_file() or p.is_symlink():
                bad(p, "not a regular file")
            elif hash_file(p, sha256=False)["blake3"] != p.name:
                bad(p, "content does not match its blake3 name")
        index = self.root / "sha256"
        for p in sorted(index.iterdir()) if index.is_dir() else []:
            try:
                b3 = p.read_text().strip()
            except (OSError, UnicodeDecodeError):
                b3 = ""
            blob = blobs / b3
            if not re.fullmatch(r"[0-9a-f]{64}", b3) or not blob.is_file():
                bad(p, "index entry points at no blob")
            elif hash_file(blob)["sha256"] != p.name:
                bad(p, "index entry's blob has another sha256")
        trees = self.root / "trees"
        for p in sorted(trees.iterdir()) if trees.is_dir() else []:
            if not p.is_dir() or tree_digest(p)["blake3"] != p.name:
                bad(p, "directory snapshot does not match its blake3 name")
        tmp = self.root / "tmp"
        for p in sorted(tmp.iterdir()) if tmp.is_dir() else []:
            bad(p, "left over from an interrupted run")
        return problems


def tree_digest(root: Path) -> dict[str, str]:
    """Digest of a directory input: blake3 Merkle root over (path, size, blake3) of its regular files."""
    from .._internal.hashing import canonical_json, merkle_root
    from .._internal.listing import tree

    leaves = []
    for p in sorted(tree(root), key=lambda q: q.relative_to(root).as_posix()):
        if p.is_file() and not p.is_symlink():
            leaves.append(canonical_json({"path": p.relative_to(root).as_posix(), "size": p.stat().st_size,
                                          "blake3": hash_file(p)["blake3"]}))
    return {"blake3": merkle_root(leaves)}


class _RateFloor:
    """Stops a download slower than `floor` bytes per second over each window of `window` seconds."""

    def __init__(self, url: str, floor: int, window: float) -> None:
        import time

        self.url, self.floor, self.window = url, floor, window
        self.start, self.bytes = time.monotonic(), 0

    def add(self, n: int) -> None:
        import time

        self.bytes += n
        elapsed = time.monotonic() - self.start
        if elapsed < self.window:
            return
        if self.bytes < self.floor * elapsed:
            raise FetchError(f"cannot fetch {self.url}: {self.bytes / elapsed:.0f} bytes/s over the last "
                             f"{elapsed:.0f} s, under limits.download_min_bytes_per_second ({self.floor}); stopped")
        self.start, self.bytes = time.monotonic(), 0


def _download_url(url: str, dest: Path, progress=None, limits=None) -> None:
    """Download with the recipe's [limits]: at most max_download_bytes, no read that stalls longer
    than download_stall_seconds, done within download_deadline_seconds. Raises FetchError."""
    import time

    from ..recipe import Limits

    limits = limits or Limits()
    max_bytes, stall = limits.max_download_bytes, limits.download_stall_seconds
    deadline = time.monotonic() + limits.download_deadline_seconds
    rate = _RateFloor(url, limits.download_min_bytes_per_second, limits.download_rate_window_seconds)
    got = 0
    try:
        with urllib.request.urlopen(url, timeout=stall) as resp, open(dest, "wb") as out:
            if resp.length is not None and resp.length > max_bytes:
                raise FetchError(f"cannot fetch {url}: it announces {resp.length} bytes, over "
                                 f"limits.max_download_bytes ({max_bytes})")
            if progress is not None and resp.length:
                progress(0, total=resp.length)
            while chunk := resp.read1(CHUNK) if hasattr(resp, "read1") else resp.read(CHUNK):
                got += len(chunk)
                if got > max_bytes:
                    raise FetchError(f"cannot fetch {url}: more than limits.max_download_bytes ({max_bytes}) "
                                     "arrived; stopped")
                if time.monotonic() > deadline:
                    raise FetchError(f"cannot fetch {url}: not done within limits.download_deadline_seconds; stopped")
                rate.add(len(chunk))
                out.write(chunk)
                if progress is not None:
                    progress(len(chunk))
    except urllib.error.HTTPError as e:
        raise FetchError(f"cannot fetch {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(e, TimeoutError) or "timed out" in str(reason):
            reason = f"no data for limits.download_stall_seconds ({stall:g} s)"
        raise FetchError(f"cannot fetch {url}: {reason} (is the host reachable from here?)") from None


def _download_pypi(inp: Input, tmp: Path, limits=None) -> Path:
    req = f"{inp.package}=={inp.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
           "--disable-pip-version-check", "--no-input", "-d", str(tmp)]
    if inp.sha256:
        # pip checks the hash before it runs the sdist's build backend for metadata.
        reqfile = tmp / "requirements.txt"
        reqfile.write_text(f"{req} --hash=sha256:{inp.sha256}\n")
        cmd += ["--require-hashes", "-r", str(reqfile)]
    else:
        cmd.append(req)
    deadline = limits.download_deadline_seconds if limits else 3600.0
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=deadline)
    except subprocess.TimeoutExpired:
        raise FetchError(f"input {inp.name!r}: pip download {req} not done within "
                         f"limits.download_deadline_seconds ({deadline:g} s)") from None
    if proc.returncode != 0:
        out = proc.stdout + proc.stderr
        got = re.search(r"Got\s+([0-9a-f]{64})", out)
        if "DO NOT MATCH THE HASHES" in out and got and inp.sha256:
            raise DigestMismatch(f"input {inp.name!r} ({req} from PyPI)", "sha256", inp.sha256, got.group(1))
        tail = "\n".join(line for line in out.strip().splitlines()[-6:] if "WARNING: Location" not in line)
        raise FetchError(f"input {inp.name!r}: pip download {req} failed (exit {proc.returncode}):\n{tail}")
    files = [p for p in tmp.iterdir() if p.is_file() and p.name != "requirements.txt"]
    if len(files) != 1:
        raise FetchError(f"input {inp.name!r}: pip download {req} gave {len(files)} files, expected one sdist")
    return files[0]


def fetch_input(inp: Input, store: Store, *, recipe_dir: Path, offline: bool = False,
                handed: Path | None = None, progress=None, limits=None) -> StoredInput:
    """Return the input's bytes checked against its pins, fetching them if needed.

    Raises DigestMismatch (nothing is stored), FetchError (unreachable, or offline and absent).
    """
    if inp.kind == "path":
        src = Path(inp.path)
        src = src if src.is_absolute() else (recipe_dir / src)
        src = handed if handed is not None and handed.is_dir() else src  # a directory handed over in its place
        if src.is_dir():
            if inp.sha256 and not inp.blake3:
                raise InputError(f"input {inp.name!r}: a directory input is pinned by blake3 (its tree digest), not "
                                 f"sha256")
            snap, digests = store.snapshot_dir(inp, src, limits)
            return StoredInput(inp, snap, digests, "path", is_dir=True)
        handed = handed or src
        if not handed.exists():
            what = "is a symlink whose target does not exist or loops" if src.is_symlink() else "does not exist"
            raise FetchError(f"input {inp.name!r}: local file {src} {what}")

    if handed is not None:
        if not handed.is_file():
            raise FetchError(f"input {inp.name!r}: {handed} is not a file")
        path, digests = store.add(inp, handed, what=f"input {inp.name!r} ({handed})", progress=progress)
        return StoredInput(inp, path, digests, "handed" if inp.kind != "path" else "path")

    found = store.lookup(inp)
    if found is not None:
        digests = store.verify(inp, found, progress=progress)
        if digests is not None:
            return StoredInput(inp, found, digests, "store")
    pin = f"sha256:{inp.sha256}" if inp.sha256 else f"blake3:{inp.blake3}"
    if offline:
        raise FetchError(
            f"input {inp.name!r} ({inp.artifact_name}) is not in the store {store.root} and --offline forbids "
            f"fetching it.\n  Obtain the file elsewhere and hand it over with --input {inp.name}=PATH "
            f"(it is accepted only if it matches {pin})."
        )
    tmp = Path(tempfile.mkdtemp(dir=store.tmpdir(), prefix=f"fetch-{inp.name}."))
    try:
        if inp.kind == "pypi":
            got = _download_pypi(inp, tmp, limits)
            where = f"{inp.package}=={inp.version} from PyPI"
        else:
            got = tmp / "download"
            _download_url(inp.url, got, progress=progress, limits=limits)
            where = inp.url
        path, digests = store.add(inp, got, what=f"input {inp.name!r} ({where})", move=True)
        return StoredInput(inp, path, digests, inp.kind)
    except FetchError as e:
        raise FetchError(f"{e}\n  Offline path: hand the file over with --input {inp.name}=PATH "
                         f"(accepted only if it matches {pin}).") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
