"""The digest of this project's own code: what a build, a checkpoint and a stage-cache entry record of
the builder that made them."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import blake3


@cache
def code_digest() -> str:
    """blake3 over this package's sources, Python and C (names and bytes): any change to the code
    that trains invalidates every entry, however small. The C sources are our kernels
    (builder/*.c and the header they share), whose operations are a recipe's numerics."""
    return tree_digest(Path(__file__).resolve().parent.parent)


def tree_digest(root: Path) -> str:
    """code_digest's hash over the .py, .c and .h files under `root`."""
    h = blake3.blake3()
    for p in sorted([*root.rglob("*.py"), *root.rglob("*.c"), *root.rglob("*.h")]):
        rel = p.relative_to(root).as_posix().encode()
        data = p.read_bytes()
        h.update(len(rel).to_bytes(8, "little") + rel + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()
