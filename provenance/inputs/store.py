"""The content-addressed input store, and fetching inputs into it by their pins.

Layout under the root: blobs/<blake3> (the bytes), sha256/<sha256> (holds the blake3 name),
tmp/ (downloads in progress). A blob enters only after its digest matched the pin, and is
re-hashed on every use; a corrupt entry is removed, never served.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

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
    source: str  # "store", "pypi", "url", "path", "handed"
    is_dir: bool = False


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

    def add(self, inp: Input, src: Path, *, what: str, move: bool = False, progress=None) -> tuple[Path, dict[str, str]]:
        """Hash `src`, check it against the pins and enter it. Raises DigestMismatch, storing nothing."""
        if progress is not None:
            progress(0, total=src.stat().st_size)
        digests = hash_file(src, progress=progress)
        check_pins(inp, digests, what)
        dest = self._blob(digests["blake3"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            fd, tmp = tempfile.mkstemp(dir=self.tmpdir(), prefix="add.")
            os.close(fd)
            try:
                if move:
                    os.replace(src, tmp)
                else:
                    shutil.copyfile(src, tmp)
                os.chmod(tmp, 0o444)
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        atomic_write_bytes(self.root / "sha256" / digests["sha256"], digests["blake3"].encode() + b"\n")
        return dest, digests

    def verify(self, inp: Input, path: Path, progress=None) -> dict[str, str] | None:
        """Re-hash a stored blob. Returns its digests, or None after removing a corrupt entry."""
        if progress is not None:
            progress(0, total=path.stat().st_size)
        digests = hash_file(path, progress=progress)
        try:
            check_pins(inp, digests, f"stored input {inp.name!r}")
        except DigestMismatch:
            path.unlink(missing_ok=True)
            return None
        if digests["blake3"] != path.name:
            path.unlink(missing_ok=True)
            return None
        return digests


def tree_digest(root: Path) -> dict[str, str]:
    """Digest of a directory input: blake3 Merkle root over (path, size, blake3) of its regular files."""
    from .._internal.hashing import canonical_json, merkle_root

    leaves = []
    for p in sorted(root.rglob("*"), key=lambda q: q.relative_to(root).as_posix()):
        if p.is_file() and not p.is_symlink():
            leaves.append(canonical_json({"path": p.relative_to(root).as_posix(), "size": p.stat().st_size,
                                          "blake3": hash_file(p)["blake3"]}))
    return {"blake3": merkle_root(leaves)}


def _download_url(url: str, dest: Path, progress=None) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as out:
            if progress is not None and resp.length:
                progress(0, total=resp.length)
            while chunk := resp.read(CHUNK):
                out.write(chunk)
                if progress is not None:
                    progress(len(chunk))
    except urllib.error.HTTPError as e:
        raise FetchError(f"cannot fetch {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise FetchError(f"cannot fetch {url}: {reason} (is the host reachable from here?)") from None


def _download_pypi(inp: Input, tmp: Path) -> Path:
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
    proc = subprocess.run(cmd, capture_output=True, text=True)
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
                handed: Path | None = None, progress=None) -> StoredInput:
    """Return the input's bytes checked against its pins, fetching them if needed.

    Raises DigestMismatch (nothing is stored), FetchError (unreachable, or offline and absent).
    """
    if inp.kind == "path":
        src = Path(inp.path)
        src = src if src.is_absolute() else (recipe_dir / src)
        if src.is_dir():
            digests = tree_digest(src)
            if inp.sha256 and not inp.blake3:
                raise InputError(f"input {inp.name!r}: a directory input is pinned by blake3 (its tree digest), not sha256")
            check_pins(inp, digests, f"directory input {inp.name!r} ({src})")
            return StoredInput(inp, src, digests, "path", is_dir=True)
        handed = handed or src
        if not handed.exists():
            raise FetchError(f"input {inp.name!r}: local file {src} does not exist")

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
            got = _download_pypi(inp, tmp)
            where = f"{inp.package}=={inp.version} from PyPI"
        else:
            got = tmp / "download"
            _download_url(inp.url, got, progress=progress)
            where = inp.url
        path, digests = store.add(inp, got, what=f"input {inp.name!r} ({where})", move=True)
        return StoredInput(inp, path, digests, inp.kind)
    except FetchError as e:
        raise FetchError(f"{e}\n  Offline path: hand the file over with --input {inp.name}=PATH "
                         f"(accepted only if it matches {pin}).") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
