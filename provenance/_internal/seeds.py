"""Seeds derived from a recipe's one seed: one per purpose (model init, the data order of each stage,
the audit's samples), so that no two purposes share a random stream and none depends on the order
in which the others drew."""

from __future__ import annotations

import blake3


def derive_seed(seed: int, *labels: object) -> int:
    """A 63-bit seed for one purpose (model init, data order of stage N, ...), stable across runs."""
    digest = blake3.blake3(":".join(map(str, (seed, *labels))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
