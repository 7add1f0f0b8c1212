"""Content digests: the one file hasher, the canonical tensor digest and the Merkle root.

blake3 addresses everything this project stores; sha256 is added where outside verifiers
expect it. Each digest's name records what it covers; docs/formats.md specifies every
construction byte for byte.
"""

from __future__ import annotations

import os

import blake3

TYPE_CHECKING = False  # importing typing costs ~5 ms of start-up; type checkers treat this name as typing's
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from pathlib import Path

# Nothing else is imported at the top: verify-attestation starts hashing from this module before
# anything else is loaded (_internal/prefetch.py), so every import here delays the hashing.

TENSOR_DIGEST = "blake3-tensors-v1"
MERKLE = "blake3-merkle-v1"
CHUNK = 32 << 20  # bytes read at a time: blake3 spreads each chunk over its threads


class FileChanged(OSError):
    """The file shrank or grew while it was being hashed: its digest describes no version of it."""


MAP_MIN = 64 << 20  # files this large are hashed through a mapping, in a child process (hash_fd)
_STEP = 64 << 20  # bytes the child hashes between two progress reports

# The child of _hash_mapped: it hashes `size` bytes of fd 3 (the parent's open file), mapping one
# step at a time (its resident memory stays near a step), and reports each step's byte count on
# stdout, then "= BLAKE3 SHA256" ("-" for no sha256).
# If the file shrinks under the mapping, the kernel kills the child with SIGBUS; the parent, not
# the child, decides what that means.
_CHILD = """
import mmap, os, sys
import blake3
size, want_sha = int(sys.argv[1]), sys.argv[2] == "sha256"
b3 = blake3.blake3(max_threads=blake3.blake3.AUTO)
if want_sha:
    import hashlib
    sha = hashlib.sha256()
for off in range(0, size, %d):
    n = min(%d, size - off)
    with mmap.mmap(3, n, offset=off, access=mmap.ACCESS_READ) as part:  # one step mapped at a time
        b3.update(part)
        if want_sha:
            sha.update(part)
    os.write(1, b"%%d\\n" %% n)
os.write(1, ("= " + b3.hexdigest() + " " + (sha.hexdigest() if want_sha else "-") + "\\n").encode())
""" % (_STEP, _STEP)


def hash_fd(fd: int, *, sha256: bool = True, progress: Callable[[int], None] | None = None) -> dict[str, str]:
    """blake3 (multi-threaded) and optionally sha256 of an open file, from offset 0 to its size.

    A file of MAP_MIN bytes or more is mapped and hashed by a child process (_hash_mapped): on
    some virtual machines copying from the page cache costs 4-5 times the hashing itself
    (docs/benchmarks.md), and a mapping cannot be read safely in this process, where a file
    truncated underneath would kill it with SIGBUS. Smaller files, and any file the child could not
    hash, are read CHUNK bytes at a time into one buffer (_hash_read): memory stays bounded whatever
    the size. `progress(n)` is called after each chunk or step (and may raise to stop). Raises
    OSError (FileChanged when the size changed underneath).
    """
    size = os.fstat(fd).st_size
    out = _hash_mapped(fd, size, sha256, progress) if size >= MAP_MIN else None
    if out is None:
        out = _hash_read(fd, size, sha256, progress)
    now = os.fstat(fd).st_size
    if now != size:
        raise FileChanged(_changed(size, now))
    return out


def _changed(size: int, now: int) -> str:
    how = "shrank" if now < size else "grew"
    return f"the file {how} from {size} bytes to {now} while being read"


def _hash_read(fd: int, size: int, sha256: bool, progress: Callable[[int], None] | None) -> dict[str, str]:
    """hash_fd's reading path: `size` bytes read with preadv into one reused buffer."""
    b3 = blake3.blake3(max_threads=blake3.blake3.AUTO)
    sha = None
    if sha256:
        import hashlib  # loads OpenSSL: only when asked (verify-attestation's start-up)

        sha = hashlib.sha256()
    buf = bytearray(min(CHUNK, size))
    view = memoryview(buf)
    offset = 0
    while offset < size:
        want = min(CHUNK, size - offset)
        got = os.preadv(fd, [view[:want]], offset)
        if got <= 0:
            raise FileChanged(_changed(size, offset + got))
        b3.update(view[:got])
        if sha is not None:
            sha.update(view[:got])
        offset += got
        if progress is not None:
            progress(got)
    out = {"blake3": b3.hexdigest()}
    if sha is not None:
        out["sha256"] = sha.hexdigest()
    return out


def _hash_mapped(fd: int, size: int, sha256: bool, progress: Callable[[int], None] | None) -> dict[str, str] | None:
    """hash_fd's mapping path: the digests from a child process that maps the open file, or None
    when no child could start or it failed before hashing a byte (the caller then reads the file).

    The child is handed this very descriptor (no path is opened twice). A child killed part way
    (SIGBUS: the file shrank under the mapping, or a read error) is an error here: FileChanged if
    the size changed, else OSError(EIO). If `progress` raises, the child is killed first."""
    import sys

    exe = sys.executable
    if not exe:
        return None
    r, w = os.pipe()
    try:
        pid = os.posix_spawn(exe, [exe, "-c", _CHILD, str(size), "sha256" if sha256 else "-"], os.environ,
                             file_actions=[(os.POSIX_SPAWN_DUP2, w, 1), (os.POSIX_SPAWN_DUP2, fd, 3),
                                           (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])
    except OSError:
        os.close(r)
        return None
    finally:
        os.close(w)
    try:
        digests, done = _child_reply(r, progress)
    except BaseException:
        os.kill(pid, 9)  # SIGKILL: the caller stopped (progress raised) or the reply was not read
        raise
    finally:
        os.close(r)
        status = os.waitpid(pid, 0)[1]
    if digests is not None and os.waitstatus_to_exitcode(status) == 0:
        return digests
    now = os.fstat(fd).st_size
    if now != size:
        raise FileChanged(_changed(size, now))
    if done:
        import errno

        raise OSError(errno.EIO, f"the file could not be read past byte {done} through its mapping")
    return None


def _child_reply(r: int, progress: Callable[[int], None] | None) -> tuple[dict[str, str] | None, int]:
    """(digests or None, bytes reported hashed) from the child's pipe, calling progress per step."""
    pending, done = b"", 0
    while True:
        data = os.read(r, 4096)
        if not data:
            return None, done
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            if line.startswith(b"= "):
                _, b3, sha = line.decode().split(" ")
                return ({"blake3": b3} if sha == "-" else {"blake3": b3, "sha256": sha}), done
            done += int(line)
            if progress is not None:
                progress(int(line))


def hash_file(path: Path, *, sha256: bool = True, progress: Callable[[int], None] | None = None) -> dict[str, str]:
    """{"blake3": hex, "sha256": hex} of a file's bytes (sha256 only if asked)."""
    with open(path, "rb") as f:
        return hash_fd(f.fileno(), sha256=sha256, progress=progress)


def blake3_bytes(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def sha256_hex(*parts: bytes) -> str:
    """sha256 of in-memory bytes (concatenated), with cryptography's OpenSSL: the verifier has it
    loaded for signatures already, and hashlib would load a second OpenSSL (~7 ms of start-up)."""
    from cryptography.hazmat.primitives import hashes

    h = hashes.Hash(hashes.SHA256())
    for p in parts:
        h.update(p)
    return h.finalize().hex()


def hash_bytes(data: bytes) -> dict[str, str]:
    """{"blake3": hex, "sha256": hex} of in-memory bytes."""
    return {"blake3": blake3_bytes(data), "sha256": sha256_hex(data)}


def canonical_json(obj: object) -> bytes:
    """Sorted keys, no whitespace, UTF-8 (not ASCII-escaped): the bytes this project hashes for JSON values."""
    import json

    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def merkle_root(leaves: Iterable[bytes]) -> str:
    """Binary Merkle tree over blake3(0x00 || leaf); inner nodes blake3(0x01 || left || right).

    An odd node is promoted unchanged. The empty tree hashes to blake3(b"").
    """
    level = [blake3.blake3(b"\x00" + leaf).digest() for leaf in leaves]
    if not level:
        return blake3.blake3(b"").hexdigest()
    while len(level) > 1:
        nxt = [blake3.blake3(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0].hex()


def tensor_record(name: str, dtype: str, shape: Sequence[int], nbytes: int) -> bytes:
    """The bytes that precede one tensor's data in blake3-tensors-v1 (docs/formats.md)."""
    import struct

    meta = canonical_json({"dtype": dtype, "name": name, "shape": list(shape)})
    return struct.pack("<Q", len(meta)) + meta + struct.pack("<Q", nbytes)


def tensors_digest(tensors: Iterable[tuple[str, str, Sequence[int], bytes | memoryview]]) -> str:
    """blake3-tensors-v1 over (name, safetensors dtype, shape, little-endian bytes), taken in name order."""
    h = blake3.blake3()
    for name, dtype, shape, data in sorted(tensors, key=lambda t: t[0]):
        h.update(tensor_record(name, dtype, shape, len(data)))
        h.update(data)
    return h.hexdigest()


def tensor_digest(path: Path) -> str:
    """blake3-tensors-v1 of a safetensors file: the weights, independent of layout and metadata.

    The file is checked structurally first (see _internal.safetensors); raises ValueError if it
    is not a well-formed safetensors file.
    """
    from .safetensors import open_checked

    with open_checked(path) as st:
        return tensors_digest((name, t.dtype, t.shape, st.data(name)) for name, t in st.tensors.items())
