"""Writing the complete corresponding source of a build as one reproducible archive: what a build writes
beside its model (source.tar) and `provenance source` writes on demand.

The layout and the statement are attest/source.py's; docs/formats.md ("Corresponding source")
documents both. The same recipe, inputs and code give the same bytes on every machine: entries in
byte order of their names with the table of contents (SOURCE.json) last, every mtime 0, owner 0:0
with no names, mode 0644, no compression (a compressor's output depends on its library's version;
the inputs are stored as pinned, already compressed). Each entry is hashed as it is written, so the
table lists exactly the bytes in the archive.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import NamedTuple

from .._internal.codedigest import code_files, digest_entries, package_root
from .._internal.hashing import hash_bytes, hash_file
from ..attest.source import (
    ARCHIVE_FORMAT,
    BUILDER_LICENCE,
    LOCK,
    PARENT_ATTESTATION,
    PARENT_KEY,
    PARENT_MODEL,
    PARENT_SOURCE,
    PYPROJECT,
    README,
    TOC,
    ParentSource,
    SourceClaims,
    SourceInput,
    input_prefix,
    licence_path,
    spdx_ids,
)
from ..errors import InputError
from ..recipe import parent_input

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..inputs.store import StoredInput
    from ..recipe import LoadedExport, LoadedRecipe

TEXTS = Path(__file__).resolve().parent / "licence_texts"  # SPDX licence texts (their README says whence)
ARCHIVE_FILE = "source.tar"  # what a build writes beside its model


class Part(NamedTuple):
    """One archive entry: its path under the top folder and its bytes (in memory, or a file's)."""

    path: str
    data: bytes | None = None
    file: Path | None = None


def shipped_licences() -> frozenset[str]:
    """The SPDX identifiers whose text this tool carries: the licences it knows to permit redistribution."""
    return frozenset(p.stem for p in TEXTS.glob("*.txt"))


def unshippable(recipe: LoadedRecipe | LoadedExport) -> str | None:
    """Why the recipe's corresponding source may not be shipped (None when it may): the recipe says so, or
    an input's licence is not one this tool knows to permit redistribution. It depends on the recipe
    alone (the model card states it)."""
    r = recipe.recipe
    if not r.output.source_bundle:
        return ("the recipe sets [output] source_bundle = false: its inputs are not to be redistributed, so no "
                "corresponding-source archive is written")
    parent = parent_input(r)
    if parent is not None and parent.key is None:
        return (f"input {parent.name!r} is a parent model signed keyless (Sigstore): rebuilding from an archive "
                "offline needs a parent checked with a key, so no archive is written")
    known = shipped_licences()
    for inp in r.inputs:
        unknown = sorted(spdx_ids(inp.license) - known)
        if unknown:
            return (f"input {inp.name!r} is licensed {inp.license!r}; {', '.join(unknown)} is not among the "
                    "licences this tool knows to permit redistribution (docs/formats.md, \"Corresponding source\"), "
                    "so it is not shipped in an archive")
    return None


def code_parts(expected: str | None = None) -> tuple[str, list[Part]]:
    """This installation's code (the files the code digest covers), pyproject.toml and the lock.
    Refuses code whose digest is not `expected` (a build's), or an installation without the lock."""
    root = package_root()
    files = [(rel, (root / rel).read_bytes()) for rel in code_files(root)]
    digest = digest_entries(files)
    if expected is not None and digest != expected:
        raise InputError(f"the build recorded code digest {expected[:16]}…, but the provenance installed at {root} "
                         f"has {digest[:16]}…: an archive carries the code that built the weights. Run `provenance "
                         "source` from a checkout of the version that made the build (its attestation names the "
                         "git commit: builder-source:provenance)")
    parts = [Part(f"code/provenance/{rel}", data=data) for rel, data in files]
    for rel in (PYPROJECT, LOCK):
        f = root.parent / rel.removeprefix("code/")
        if not f.is_file():
            raise InputError(f"{f}: not found beside the installed code; the archive needs the project's "
                             f"{rel.removeprefix('code/')} (run from a checkout of provenance)")
        parts.append(Part(rel, data=f.read_bytes()))
    return digest, parts


def claims_for(recipe: LoadedRecipe | LoadedExport, stored: list[StoredInput], code: str,
               lock: dict[str, str]) -> SourceClaims:
    r = recipe.recipe
    inputs = tuple(SourceInput(s.input.name, "" if s.is_dir else s.input.artifact_name,
                               {k: v for k, v in s.digests.items() if k in ("sha256", "blake3")}, s.input.license,
                               None if s.parent is None else
                               ParentSource(dict(s.parent.attestation), s.parent.key, dict(s.parent.subjects)))
                   for s in stored)
    licences = {BUILDER_LICENCE} | spdx_ids(r.output.license)
    for inp in r.inputs:
        licences |= spdx_ids(inp.license)
    return SourceClaims(recipe.path.name, dict(recipe.digests), inputs, code, lock, frozenset(licences))


def input_parts(stored: list[StoredInput]) -> list[Part]:
    parts = []
    for s in stored:
        pre = input_prefix(s.input.name)
        if s.parent is not None:
            parts += parent_parts(s, pre)
        elif s.is_dir:
            parts += [Part(pre + p.relative_to(s.path).as_posix(), file=p) for p in sorted(s.path.rglob("*"))
                      if p.is_file() and not p.is_symlink()]
        else:
            parts.append(Part(pre + s.input.artifact_name, file=s.path))
    return parts


def parent_parts(s: StoredInput, pre: str) -> list[Part]:
    """A parent model's folder: the verified copies of its files, attestation and key, and its own
    corresponding source, once that is found to be what the parent's attestation describes."""
    from ..verify.source import archive_problems, claims_of_attestation

    parent = s.parent
    found = parent.source_archive()
    if found is None:
        raise InputError(f"input {s.input.name!r}: the parent's corresponding source (source.tar) is not beside its "
                         f"model directory {parent.folder} (in its build's folder or under .provenance/ of a "
                         "published one); a derived model's source includes its parent's")
    copy = parent.files.parent / PARENT_SOURCE
    shutil.copyfile(found, copy)
    bad = archive_problems(copy, claims_of_attestation(parent.attestation_file.read_bytes()))
    if bad:
        raise InputError(f"input {s.input.name!r}: {found} is not the corresponding source the parent's attestation "
                         "describes: " + "; ".join(bad[:3]))
    files = [Part(pre + PARENT_MODEL + name, file=parent.files / name) for name in sorted(parent.subjects)]
    return [*files, Part(pre + PARENT_ATTESTATION, file=parent.attestation_file),
            Part(pre + PARENT_KEY, file=parent.key_file), Part(pre + PARENT_SOURCE, file=copy)]


def licence_parts(claims: SourceClaims) -> list[Part]:
    missing = sorted(claims.licences - shipped_licences())
    if missing:
        raise InputError(f"no licence text for {', '.join(missing)} ships with this tool (docs/formats.md, "
                         "\"Corresponding source\", lists those that do)")
    return [Part(licence_path(x), file=TEXTS / f"{x}.txt") for x in sorted(claims.licences)]


def readme(recipe: LoadedRecipe | LoadedExport, claims: SourceClaims) -> bytes:
    r = recipe.recipe
    handed = " ".join(f"--input {i.name}=inputs/{i.name}" + (f"/{i.artifact}" if i.artifact else "")
                      for i in claims.inputs)
    lines = [
        f"# Corresponding source of `{r.recipe.name}`",
        "",
        f"This archive is the complete corresponding source of the model built by `recipe/{claims.recipe_path}`:",
        "the recipe, every input as pinned, the code of the builder that trained it (`code/`, with the",
        "toolchain lock that installs it) and the text of every licence involved (`licenses/`).",
        f"`{TOC}` lists every entry with its size and blake3 digest.",
        "",
        "## Rebuild, offline",
        "",
        "    provenance rebuild ATTESTATION --attestation-key KEY --from-source THIS_ARCHIVE --out DIR",
        "",
        "or by hand, from the unpacked folder:",
        "",
        "    python3 -m venv .venv",
        f"    .venv/bin/pip install --require-hashes --no-deps -r {LOCK}",
        "    .venv/bin/pip install --no-deps --no-build-isolation -e code",
        f"    .venv/bin/provenance build recipe/{claims.recipe_path} --offline --store STORE {handed}",
        "",
        "## Digests",
        "",
        f"- recipe `{claims.recipe_path}`: " + ", ".join(f"{a} {h}" for a, h in sorted(claims.recipe_digest.items())),
        *[f"- input `{i.name}` ({i.license}): " + ", ".join(f"{a} {h}" for a, h in sorted(i.digest.items()))
          + (f"; a parent model: its files, attestation (sha256 {i.parent.attestation['sha256']}) and key under "
             f"`inputs/{i.name}/`, and its own corresponding source, laid out as this one, as "
             f"`inputs/{i.name}/{PARENT_SOURCE}`" if i.parent is not None else "")
          for i in claims.inputs],
        f"- code digest (provenance-code-v1): {claims.code}",
        f"- `{LOCK}`: " + ", ".join(f"{a} {h}" for a, h in sorted((claims.lock or {}).items())),
        "",
        "## Licences",
        "",
        f"- inputs: {', '.join(sorted({i.license for i in claims.inputs}))}",
        f"- the model, as its recipe declares: {r.output.license}",
        f"- the builder's code: {BUILDER_LICENCE}",
        "",
    ]
    return "\n".join(lines).encode()


def write_source(recipe: LoadedRecipe | LoadedExport, stored: list[StoredInput], out: Path,
                 code: str | None = None) -> tuple[SourceClaims, dict[str, str]]:
    """Write the corresponding source of `recipe` (its inputs `stored`) at `out`, atomically: (its claims,
    the archive's sha256 and blake3). `code`: the code digest the archive must carry (a build's)."""
    digest, code_files_ = code_parts(code)
    lock = next(hash_bytes(p.data) for p in code_files_ if p.path == LOCK and p.data is not None)
    claims = claims_for(recipe, stored, digest, {"sha256": lock["sha256"], "blake3": lock["blake3"]})
    parts = [Part(f"recipe/{claims.recipe_path}", data=recipe.text.encode()), *input_parts(stored), *code_files_,
             *licence_parts(claims), Part(README, data=readme(recipe, claims))]
    _write_tar(out, f"{recipe.name}-source", parts)
    return claims, hash_file(out)


def write_beside(recipe: LoadedRecipe | LoadedExport, stored: list[StoredInput], staging: Path,
                 log) -> tuple[dict, SourceClaims | None]:
    """A build's corresponding source as source.tar in `staging`, where the recipe and its inputs allow it:
    (build.json's "source" entry: the archive written, or why not; the archive's claims, or None)."""
    why = unshippable(recipe)
    if why is None:
        try:
            claims, digest = write_source(recipe, stored, staging / ARCHIVE_FILE)
        except InputError as e:
            why = str(e)
        else:
            return {"file": ARCHIVE_FILE, "bytes": (staging / ARCHIVE_FILE).stat().st_size, **digest}, claims
    log(f"no corresponding-source archive: {why}")
    return {"file": None, "why_not": why}, None


def sign_beside(staging: Path, source: dict, claims: SourceClaims | None, files: dict[str, dict[str, str]],
                signers: list, byproducts: dict[str, dict[str, str]]) -> None:
    """For the archive write_beside wrote (`source`, build.json's entry; nothing when it wrote none): sign
    the statement binding it to the model `files` into source.intoto.jsonl, and add it to `byproducts`."""
    from ..attest.signing import sign_source

    if not source.get("file") or claims is None:
        return
    byproducts[source["file"]] = {k: source[k] for k in ("sha256", "blake3")}
    sign_source(staging / "source.intoto.jsonl", claims, source["file"], byproducts[source["file"]], files, signers)


def _write_tar(out: Path, root: str, parts: list[Part]) -> None:
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
            table = {p.path: _add(tf, f"{root}/{p.path}", p) for p in sorted(parts, key=lambda q: q.path.encode())}
            toc = {"format": ARCHIVE_FORMAT, "recipe": root.removesuffix("-source"), "files": table}
            _add(tf, f"{root}/{TOC}", Part(TOC, data=(json.dumps(toc, indent=1, sort_keys=True) + "\n").encode()))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Hashing:
    """A file object that hashes what is read through it: the table lists the bytes written."""

    def __init__(self, f) -> None:
        import blake3

        self.f, self.h, self.n = f, blake3.blake3(), 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.h.update(b)
        self.n += len(b)
        return b


def _add(tf: tarfile.TarFile, name: str, part: Part) -> dict:
    import io

    info = tarfile.TarInfo(name)
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
    with (io.BytesIO(part.data) if part.data is not None else open(part.file, "rb")) as f:  # type: ignore[arg-type]
        info.size = len(part.data) if part.data is not None else os.fstat(f.fileno()).st_size
        reader = _Hashing(f)
        tf.addfile(info, reader)  # type: ignore[arg-type]  # read() is all addfile uses
    return {"size": reader.n, "blake3": reader.h.hexdigest()}
