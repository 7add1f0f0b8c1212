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


def hash_fd(fd: int, *, sha256: bool = True, progress: Callable[[int], None] | None = None) -> dict[str, str]:
    """blake3 (multi-threaded) and optionally sha256 of an open file, from offset 0 to its size.

    The file is read CHUNK bytes at a time into one buffer: memory stays bounded whatever the size.
    It is read, not mapped: a file truncated while it is hashed gives a short read and FileChanged,
    where a mapping would kill the process with SIGBUS. `progress(n)` is called after each chunk
    (and may raise to stop). Raises OSError (FileChanged when the size changed underneath).
    """
    b3 = blake3.blake3(max_threads=blake3.blake3.AUTO)
    sha = None
    if sha256:
        import hashlib  # loads OpenSSL: only when asked (verify-attestation's start-up)

        sha = hashlib.sha256()
    size = os.fstat(fd).st_size
    buf = bytearray(min(CHUNK, size))
    view = memoryview(buf)
    offset = 0
    while offset < size:
        want = min(CHUNK, size - offset)
        got = os.preadv(fd, [view[:want]], offset)
        if got <= 0:
            raise FileChanged(f"the file shrank from {size} bytes to {offset + got} while being read")
        b3.update(view[:got])
        if sha is not None:
            sha.update(view[:got])
        offset += got
        if progress is not None:
            progress(got)
    if os.fstat(fd).st_size != size:
        raise FileChanged(f"the file's size changed from {size} bytes while being read")
    out = {"blake3": b3.hexdigest()}
    if sha is not None:
        out["sha256"] = sha.hexdigest()
    return out


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
