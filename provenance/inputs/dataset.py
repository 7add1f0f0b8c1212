"""The dataset: select files from the inputs, record each in a manifest, lay them out as text.

The manifest lists every selected file sorted by (input, path) with size, blake3 and SPDX
licence, under a blake3 Merkle root that a recipe may pin.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from wcmatch import glob as wglob

from .._internal.hashing import MERKLE, blake3_bytes, canonical_json, merkle_root
from ..errors import DigestMismatch, InputError
from ..recipe import Dataset, Layout
from .archive import extract
from .licences import detect_licence
from .store import StoredInput

MANIFEST_FORMAT = "provenance-dataset-manifest-v1"


@dataclass(frozen=True)
class DataFile:
    input: str
    path: str
    size: int
    blake3: str
    license: str
    license_source: str
    text: str

    def entry(self) -> dict:
        return {"input": self.input, "path": self.path, "size": self.size, "blake3": self.blake3,
                "license": self.license, "license_source": self.license_source}


def materialize(stored: StoredInput, work: Path, limits=None) -> Path:
    """Return a directory holding the input's files: extracted archive, the directory, or the file."""
    if stored.is_dir:
        return stored.path
    root = work / stored.input.name
    if stored.input.is_archive:
        extract(stored.path, root, name=stored.input.artifact_name, limits=limits)
    else:
        root.mkdir(parents=True, exist_ok=True)
        (root / stored.input.artifact_name).write_bytes(stored.path.read_bytes())
    return root


def _walk(root: Path) -> list[str]:
    from .._internal.listing import tree

    out = []
    for p in tree(root):
        if p.is_file() and not p.is_symlink():
            out.append(p.relative_to(root).as_posix())
    return sorted(out)


def select_files(inputs: list[tuple[StoredInput, Path]], spec: Dataset) -> list[DataFile]:
    flags = wglob.GLOBSTAR | wglob.DOTGLOB | wglob.NEGATE | (wglob.IGNORECASE if spec.ignore_case else 0)
    files: list[DataFile] = []
    for stored, root in sorted(inputs, key=lambda t: t[0].input.name):
        for rel in _walk(root):
            if not wglob.globmatch(rel, spec.include, flags=flags):
                continue
            if spec.exclude and wglob.globmatch(rel, spec.exclude, flags=flags):
                continue
            data = (root / rel).read_bytes()
            try:
                text = data.decode(spec.encoding)
            except UnicodeDecodeError as e:
                raise InputError(
                    f"{stored.input.name}:{rel}: not {spec.encoding} text at byte {e.start} "
                    f"(dataset.encoding = {spec.encoding!r}); exclude the file or change the encoding"
                ) from None
            lic, src = detect_licence(data, stored.input.license)
            files.append(DataFile(stored.input.name, rel, len(data), blake3_bytes(data), lic, src, text))
    if not files:
        raise InputError(f"dataset.include {spec.include} selected no files from the inputs")
    return files


def manifest(files: list[DataFile]) -> dict:
    entries = [f.entry() for f in files]
    licences: dict[str, int] = {}
    for e in entries:
        licences[e["license"]] = licences.get(e["license"], 0) + 1
    return {
        "format": MANIFEST_FORMAT,
        "merkle_root": {"algorithm": MERKLE, "digest": merkle_root(canonical_json(e) for e in entries)},
        "totals": {"files": len(entries), "bytes": sum(e["size"] for e in entries)},
        "licenses": dict(sorted(licences.items())),
        "files": entries,
    }


def manifest_bytes(m: dict) -> bytes:
    return (json.dumps(m, indent=1, sort_keys=True) + "\n").encode()


def check_root(m: dict, spec: Dataset, recipe_path: Path) -> None:
    root = m["merkle_root"]["digest"]
    if spec.manifest_root is not None and spec.manifest_root != root:
        raise DigestMismatch(f"the dataset manifest ({recipe_path}: dataset.manifest_root)", "blake3",
                             spec.manifest_root, root)


def layout_texts(files: list[DataFile], layout: Layout) -> list[str]:
    return [layout.template.format(path=f.path, content=f.text) for f in files]


def select_dataset(spec: Dataset, stored: list[StoredInput], work: Path, recipe_path: Path, limits=None):
    """Extract the inputs into `work` and select the dataset: (files, manifest). Checks a pinned root.

    Used by the builder and by `verify-attestation --inputs` alike."""
    roots = [(s, materialize(s, work, limits)) for s in stored if s.parent is None]  # a parent model is no text
    files = select_files(roots, spec)
    m = manifest(files)
    check_root(m, spec, recipe_path)
    return files, m


def select_control(spec: Dataset, include: list[str], exclude: list[str], stored: list[StoredInput], work: Path,
                   trained: list[DataFile]) -> list[DataFile]:
    """The audit's control files: files of the same inputs (already extracted into `work` by
    select_dataset) matching `include`, not `exclude`, and not trained on. [] when none is named."""
    if not include:
        return []
    roots = [(s, s.path if s.is_dir else work / s.input.name) for s in stored if s.parent is None]
    cspec = spec.model_copy(update={"include": list(include), "exclude": list(exclude), "manifest_root": None})
    try:
        files = select_files(roots, cspec)
    except InputError as e:
        raise InputError(str(e).replace("dataset.include", "audit.control_include")) from None
    seen = {(f.input, f.path) for f in trained}
    out = [f for f in files if (f.input, f.path) not in seen]
    if not out:
        raise InputError(f"audit.control_include {include}: every file it selects is a training file; the control "
                         "must be files that were not trained on")
    return out
