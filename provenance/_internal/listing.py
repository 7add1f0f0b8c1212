"""Listing a directory tree: the one place the build asks the file system for the order of names.

The file system's order is not the build's: every caller sorts what it gets. To prove that, like
reprotest's disorderfs, `provenance matrix --vary env=file-order` sets PROVENANCE_SHUFFLE_LISTINGS
to a seed, and the listing then comes back in a seeded shuffled order; a caller that forgot to
sort would build other bits (docs/reproducibility.md, "Varying the environment").
"""

from __future__ import annotations

import os
import random
from pathlib import Path

SHUFFLE_ENV = "PROVENANCE_SHUFFLE_LISTINGS"


def tree(root: Path) -> list[Path]:
    """Every entry under `root`, recursively (rglob), in the file system's order, or shuffled."""
    entries = list(Path(root).rglob("*"))
    seed = os.environ.get(SHUFFLE_ENV)
    if seed:
        random.Random(seed).shuffle(entries)
    return entries
