"""Content digests: streaming file hashes, the canonical tensor digest and the Merkle root.

blake3 addresses everything this project stores; sha256 is added where outside verifiers
expect it. Each digest's name records what it covers (see docs/formats.md).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from pathlib import Path

import blake3

CHUNK = 1 << 20
TENSOR_DIGEST = "blake3-tensors-v1"
MERKLE = "blake3-merkle-v1"


def hash_file(path: Path, *, progress=None) -> dict[str, str]:
    """Return {"blake3": hex, "sha256": hex} of a file, read once in 1 MiB chunks."""
    b3 = blake3.blake3(max_threads=blake3.blake3.AUTO)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            b3.update(chunk)
            sha.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return {"blake3": b3.hexdigest(), "sha256": sha.hexdigest()}


def blake3_bytes(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def hash_bytes(data: bytes) -> dict[str, str]:
    """Return {"blake3": hex, "sha256": hex} of in-memory bytes."""
    return {"blake3": blake3_bytes(data), "sha256": hashlib.sha256(data).hexdigest()}


def canonical_json(obj) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the bytes this project hashes for JSON values."""
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


def _safetensors_header(f) -> tuple[dict, int]:
    raw = f.read(8)
    if len(raw) != 8:
        raise ValueError("file shorter than a safetensors header")
    (n,) = struct.unpack("<Q", raw)
    if n > 100 << 20:
        raise ValueError(f"safetensors header of {n} bytes is implausibly large")
    header = json.loads(f.read(n))
    return header, 8 + n


def tensor_digest(path: Path) -> str:
    """Canonical digest of the tensors in a safetensors file, independent of file layout.

    For each tensor in name order: u64le(len(h)) || h || u64le(len(data)) || data, where h is
    the canonical JSON of {"dtype", "name", "shape"} and data its little-endian row-major bytes
    (safetensors' own encoding). Streams; never holds more than one chunk in memory.
    """
    h = blake3.blake3()
    with open(path, "rb") as f:
        header, base = _safetensors_header(f)
        for name in sorted(k for k in header if k != "__metadata__"):
            info = header[name]
            start, end = info["data_offsets"]
            meta = canonical_json({"dtype": info["dtype"], "name": name, "shape": info["shape"]})
            h.update(struct.pack("<Q", len(meta)) + meta + struct.pack("<Q", end - start))
            f.seek(base + start)
            left = end - start
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise ValueError(f"safetensors file truncated inside tensor {name}")
                h.update(chunk)
                left -= len(chunk)
    return h.hexdigest()
