"""The digest of this project's own code: what a build, a checkpoint and a stage-cache entry record of
the builder that made them, and what a corresponding-source archive's `code/` must hash to."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from pathlib import Path, PurePosixPath

# Python, our C kernels (builder/*.c and the header they share) and the licence texts a build's
# corresponding-source archive carries (builder/licence_texts/*.txt): everything that shapes what a build writes.
SUFFIXES = (".py", ".c", ".h", ".txt")


@cache
def code_digest() -> str:
    """blake3 over this package's sources (names and bytes; SUFFIXES): any change to the code that
    trains invalidates every entry, however small. The C sources are our kernels, whose operations
    are a recipe's numerics."""
    return tree_digest(package_root())


def package_root() -> Path:
    """The directory of the `provenance` package this process runs."""
    return Path(__file__).resolve().parent.parent


def code_files(root: Path) -> list[str]:
    """The files code_digest covers under `root` (those ending in SUFFIXES), as POSIX paths relative to
    it, in its order."""
    found = [p for s in SUFFIXES for p in root.rglob(f"*{s}") if p.is_file()]
    return sort_paths(q.relative_to(root).as_posix() for q in found)


def sort_paths(rels: Iterable[str]) -> list[str]:
    """Relative POSIX paths in code_files' order: component by component (so "a/x" before "a-b/x")."""
    return [p.as_posix() for p in sorted(PurePosixPath(r) for r in rels)]


def tree_digest(root: Path) -> str:
    """code_digest's hash over the files under `root` that end in SUFFIXES."""
    return digest_entries((rel, (root / rel).read_bytes()) for rel in code_files(root))


def digest_entries(entries: Iterable[tuple[str, bytes]]) -> str:
    """The code digest of (relative POSIX path, bytes) pairs given in code_files' order: each path and
    its bytes, both prefixed by their 8-byte little-endian length. docs/formats.md ("Code digest")."""
    import blake3

    h = blake3.blake3()
    for rel, data in entries:
        name = rel.encode()
        h.update(len(name).to_bytes(8, "little") + name + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()
