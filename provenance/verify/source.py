"""A corresponding-source archive held to what a signed statement says it must hold
(`verify-attestation --source ARCHIVE`; the layout is attest/source.py's, docs/formats.md
"Corresponding source").

The archive is read once, as a stream: every entry must be a regular file under the one top folder,
with a safe, unique name; each is hashed. Then, part by part: its table of contents lists exactly
its entries with their digests; the recipe, each input, the code (by its code digest), the lock and
the licence texts are the ones claimed; and nothing else is there.

A parent model (a fine-tune's or an export's input) is a folder of its own under inputs/<name>/: its
model files, attestation and key, each held to the digests the child's provenance records, and its own
corresponding source, source.tar, read as a nested archive and held, by the same checks, to what the
parent's attestation (pinned by the child) says; at most MAX_DEPTH archives deep.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import NamedTuple

from .._internal.codedigest import SUFFIXES
from ..attest.model import subject_name_problem
from ..attest.source import (
    BUILDER_LICENCE,
    CODE_PREFIX,
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
    parent_part,
    parse_parent,
    spdx_ids,
)
from ..errors import InputError
from .report import CheckName, Checks

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Any

    from ..attest.model import Statement

MAX_ENTRIES = 500_000
MAX_TOC_BYTES = 64 << 20  # and the most bytes kept of any one code file
MAX_DEPTH = 16  # archives nested in archives: a lineage's parents (builder/parent.py's MAX_LINEAGE)
_CHUNK = 1 << 20


class Entry(NamedTuple):
    size: int
    digest: dict[str, str]  # sha256 and blake3 of the entry's bytes


class Archive(NamedTuple):
    root: str  # the top folder, "<recipe name>-source"
    entries: dict[str, Entry]  # path under the top folder -> its size and digests
    toc: object  # SOURCE.json, parsed (None when absent or not JSON)
    kept: dict[str, bytes]  # the code files' bytes, which the code digest hashes, and parents' attestations
    problems: tuple[str, ...]  # why it is not a well-formed archive (empty when it is)
    nested: dict[str, Archive] = {}  # a parent's source.tar (inputs/<name>/source.tar), read as an archive


def read_archive(path: Path) -> Archive:
    """Read every entry of the archive at `path`. Raises InputError when it is not a readable tar file."""
    try:
        with tarfile.open(path, mode="r:") as tf:
            return _read_members(tf)
    except (OSError, tarfile.TarError, EOFError) as e:
        raise InputError(f"{path}: not a readable corresponding-source archive (an uncompressed tar file): "
                         f"{e.strerror if isinstance(e, OSError) and e.strerror else e}") from None


def _read_members(tf: tarfile.TarFile, depth: int = 0) -> Archive:
    root: str | None = None
    entries: dict[str, Entry] = {}
    problems: list[str] = []
    kept: dict[str, bytes] = {}
    nested: dict[str, Archive] = {}
    for m in tf:
        if len(entries) >= MAX_ENTRIES:
            problems.append(f"more than {MAX_ENTRIES} entries")
            break
        top, _, rel = m.name.partition("/")
        why = subject_name_problem(m.name) or ("is not a regular file" if not m.isreg() else None)
        root = top if root is None else root
        if why is None and (top != root or not rel):
            why = f"is not under the archive's one top folder {root!r}"
        if why is None and rel in entries:
            why = "appears twice"
        if why:
            problems.append(f"entry {m.name!r} {why}")
            continue
        data = tf.extractfile(m)
        assert data is not None  # a regular file's data
        part = parent_part(rel)
        keep = rel == TOC or (rel.startswith(CODE_PREFIX) and rel.endswith(SUFFIXES)) or part == PARENT_ATTESTATION
        entries[rel], content = _hash_stream(data, m.size, keep=keep)
        if keep and content is None:
            problems.append(f"entry {m.name!r} is larger than {MAX_TOC_BYTES} bytes")
        elif content is not None:
            kept[rel] = content
        if part == PARENT_SOURCE:
            data.seek(0)
            nested[rel] = _read_nested(data, depth + 1)
    return Archive(root or "", entries, _parse_toc(kept.pop(TOC, None), problems), kept, tuple(problems), nested)


def _read_nested(f: IO[bytes], depth: int) -> Archive:
    """A parent's corresponding source inside this archive, read from the outer archive's bytes."""
    if depth > MAX_DEPTH:
        return Archive("", {}, None, {}, (f"archives nested more than {MAX_DEPTH} deep",))
    try:
        with tarfile.open(fileobj=f, mode="r:") as tf:
            return _read_members(tf, depth)
    except (OSError, tarfile.TarError, EOFError) as e:
        return Archive("", {}, None, {}, (f"not a readable tar file: {e}",))


def _hash_stream(f: IO[bytes], size: int, *, keep: bool) -> tuple[Entry, bytes | None]:
    import hashlib

    import blake3

    b3, sha = blake3.blake3(), hashlib.sha256()
    kept = bytearray() if keep and size <= MAX_TOC_BYTES else None
    while chunk := f.read(_CHUNK):
        b3.update(chunk)
        sha.update(chunk)
        if kept is not None:
            kept += chunk
    return Entry(size, {"sha256": sha.hexdigest(), "blake3": b3.hexdigest()}), (bytes(kept) if kept is not None
                                                                               else None)


def _parse_toc(data: bytes | None, problems: list[str]) -> object:
    from .._internal import jsonstrict

    if data is None:
        problems.append(f"no {TOC} (or one larger than {MAX_TOC_BYTES} bytes)")
        return None
    try:
        return jsonstrict.loads(data)
    except ValueError as e:
        problems.append(f"{TOC} is not strict JSON: {e}")
        return None


def claims_from_provenance(st: Statement) -> SourceClaims:
    """What the source of the build `st` attests must hold: its recipe, its inputs, its code digest and
    lock (where the build recorded them) and the texts of the licences the inputs are shipped under,
    the model's and the builder's (the writer's rule: builder/source.py's claims_for). A file's own
    SPDX tag is recorded in the dataset manifest, which the archive's inputs rebuild."""
    deps = st.buildDefinition.resolvedDependencies
    inputs, licences = [], {BUILDER_LICENCE}
    code = lock = None
    for d in deps:
        ann = d.annotations or {}
        if d.name and d.name.startswith("input:"):
            digest = dict(d.digest or {})
            artifact = str(ann.get("artifact", "")) if "sha256" in digest else ""
            parent = parse_parent(ann.get("parent")) if "parent" in ann else None
            inputs.append(SourceInput(d.name.removeprefix("input:"), artifact, digest, str(ann.get("license", "")),
                                      parent))
            licences |= spdx_ids(str(ann.get("license", "")))
        elif d.name == "builder-source:provenance":
            code = ann.get("code") if isinstance(ann.get("code"), str) else None
            lock = dict(ann["lock"]) if isinstance(ann.get("lock"), dict) else None
    out_licence = st.runDetails.provenance_outputs.output_license
    licences |= spdx_ids(out_licence or "")
    return SourceClaims(Path(st.recipe.path).name, dict(st.recipe.digest), tuple(inputs), code, lock,
                        frozenset(licences))


def claims_of_attestation(data: bytes) -> SourceClaims:
    """What the corresponding source of the build an attestation (one DSSE envelope, its signature not
    checked here: the caller holds the file to a pin) describes must hold. Raises ValueError."""
    from .._internal import jsonstrict
    from ..attest.model import parse_statement
    from .envelope import parse_envelope

    st, problems = parse_statement(jsonstrict.loads(parse_envelope(jsonstrict.loads(data)).payload))
    if st is None:
        raise ValueError("; ".join(problems[:3]))
    return claims_from_provenance(st)


def source_checks(report: Checks, archive: Archive, claims: SourceClaims) -> None:
    """The archive's parts against the claims, each a check of its own that names what is wrong."""
    accounted = {TOC, README}
    if not report.add(CheckName.SOURCE_ARCHIVE, *_toc_ok(archive)):
        return
    accounted |= _recipe_check(report, archive, claims)
    accounted |= _inputs_check(report, archive, claims)
    accounted |= _code_check(report, archive, claims)
    accounted |= _licences_check(report, archive, claims)
    extra = sorted(set(archive.entries) - accounted)
    missing = [p for p in (README, PYPROJECT) if p not in archive.entries]
    bad = [f"missing: {', '.join(missing)}"] * bool(missing) + [
        f"{len(extra)} entr{'y' if len(extra) == 1 else 'ies'} the source does not account for: "
        + ", ".join(extra[:5])] * bool(extra)
    report.add(CheckName.SOURCE_COMPLETE, not bad, "; ".join(bad) or
               f"nothing missing, nothing extra: {len(archive.entries)} entries under {archive.root}/")


def _toc_ok(archive: Archive) -> tuple[bool, str]:
    if archive.problems:
        return False, "; ".join(archive.problems[:5])
    files = archive.toc.get("files") if isinstance(archive.toc, dict) else None
    if not isinstance(files, dict):
        return False, f"{TOC} has no 'files' table"
    listed = {p for p in files if p != TOC}
    actual = set(archive.entries) - {TOC}
    wrong = sorted(p for p in listed & actual if files[p] != {"size": archive.entries[p].size,
                                                             "blake3": archive.entries[p].digest["blake3"]})
    bad = [f"listed but absent: {p}" for p in sorted(listed - actual)[:3]]
    bad += [f"present but not listed: {p}" for p in sorted(actual - listed)[:3]]
    bad += [f"changed since listed: {p}" for p in wrong[:3]]
    return (not bad, "; ".join(bad) if bad else
            f"{archive.root}/{TOC} lists exactly the archive's {len(actual)} other entries, digests equal")


def _recipe_check(report: Checks, archive: Archive, claims: SourceClaims) -> set[str]:
    want = f"recipe/{claims.recipe_path}"
    got = archive.entries.get(want)
    bad = _differ(claims.recipe_digest, got.digest) if got else ["absent"]
    report.add(CheckName.SOURCE_RECIPE, not bad,
               f"{want}: " + ("; ".join(bad) if bad else "the attested recipe, byte for byte"))
    return {p for p in archive.entries if p.startswith("recipe/")}


def _differ(want: dict[str, str], got: dict[str, str]) -> list[str]:
    shared = [a for a in ("sha256", "blake3") if a in want]
    if not shared:
        return ["the claim names no digest this verifier checks"]
    return [f"{a} attested {want[a][:16]}…, archive {got[a][:16]}…" for a in shared if want[a] != got[a]]


def _inputs_check(report: Checks, archive: Archive, claims: SourceClaims) -> set[str]:
    bad, accounted = [], set()
    for i in claims.inputs:
        pre = input_prefix(i.name)
        if i.parent is not None:
            why = _parent_differs(archive, pre, i.parent)
            accounted |= {pre + PARENT_ATTESTATION, pre + PARENT_KEY, pre + PARENT_SOURCE}
            accounted |= {pre + PARENT_MODEL + n for n in i.parent.files}
        elif i.artifact:
            got = archive.entries.get(pre + i.artifact)
            why = _differ(i.digest, got.digest) if got else ["absent"]
            accounted.add(pre + i.artifact)
        else:
            why = _tree_differs(archive, pre, i.digest)
            accounted |= {p for p in archive.entries if p.startswith(pre)}
        bad += [f"input {i.name!r}: {w}" for w in why]
    names = {i.name for i in claims.inputs}
    extra = sorted({p.split("/")[1] for p in archive.entries if p.startswith("inputs/")} - names)
    bad += [f"input {n!r} is not one the source names" for n in extra]
    report.add(CheckName.SOURCE_INPUTS, not bad, "; ".join(bad[:5]) if bad else
               f"{len(claims.inputs)} input(s) as pinned: " + ", ".join(sorted(names)))
    return accounted


def _parent_differs(archive: Archive, prefix: str, parent: ParentSource) -> list[str]:
    """A parent model's folder: its files, attestation and key as the child's provenance records them, and
    its source.tar the corresponding source of what that attestation describes."""
    model = {p.removeprefix(prefix + PARENT_MODEL): e for p, e in archive.entries.items()
             if p.startswith(prefix + PARENT_MODEL)}
    bad = [f"{PARENT_MODEL}{n}: absent" for n in sorted(set(parent.files) - set(model))]
    bad += [f"{PARENT_MODEL}{n}: not a file the parent's attestation signs"
            for n in sorted(set(model) - set(parent.files))]
    bad += [f"{PARENT_MODEL}{n}: sha256 {model[n].digest['sha256'][:16]}…, signed {want[:16]}…"
            for n, want in sorted(parent.files.items()) if n in model and model[n].digest["sha256"] != want]
    for name, want in ((PARENT_ATTESTATION, parent.attestation), (PARENT_KEY, parent.key)):
        got = archive.entries.get(prefix + name)
        if want is None:
            bad.append(f"{name}: the provenance records no digest of the parent's key (a parent signed keyless, "
                       "or recorded by an earlier version), so its folder cannot be checked")
        else:
            bad += [f"{name}: {w}" for w in (_differ(want, got.digest) if got else ["absent"])]
    return bad + _nested_differs(archive, prefix) if not bad else bad


def archive_problems(archive: Path, claims: SourceClaims) -> list[str]:
    """The source checks of the archive at `archive` against `claims`: each failed one, as "check: detail"."""
    checks = Checks()
    source_checks(checks, read_archive(archive), claims)
    return [f"{c.check.value}: {c.detail}" for c in checks.checks if not c.ok]


def _nested_differs(archive: Archive, prefix: str) -> list[str]:
    inner = archive.nested.get(prefix + PARENT_SOURCE)
    if inner is None:
        return [f"{PARENT_SOURCE}: absent (the parent's own corresponding source)"]
    try:
        claims = claims_of_attestation(archive.kept[prefix + PARENT_ATTESTATION])
    except (KeyError, ValueError) as e:
        return [f"{PARENT_SOURCE}: the parent's attestation does not say what its source holds ({e})"]
    checks = Checks()
    source_checks(checks, inner, claims)
    return [f"{PARENT_SOURCE}: {c.check.value}: {c.detail}" for c in checks.checks if not c.ok]


def _tree_differs(archive: Archive, prefix: str, want: dict[str, str]) -> list[str]:
    """A directory input: its files' Merkle root (inputs/store.py's tree digest) against the pin."""
    from .._internal.hashing import canonical_json, merkle_root

    files = sorted((p.removeprefix(prefix), e) for p, e in archive.entries.items() if p.startswith(prefix))
    if not files:
        return ["absent"]
    root = merkle_root(canonical_json({"path": rel, "size": e.size, "blake3": e.digest["blake3"]}) for rel, e in files)
    return [] if want.get("blake3") == root else [f"its files' tree digest is {root[:16]}…, attested "
                                                   f"{want.get('blake3', '(none)')[:16]}…"]


def _code_check(report: Checks, archive: Archive, claims: SourceClaims) -> set[str]:
    code = {p.removeprefix(CODE_PREFIX): p for p in archive.entries if p.startswith(CODE_PREFIX)}
    digest = _code_digest(archive, code)
    if claims.code is None:
        report.could_not_check(CheckName.SOURCE_CODE, "the attestation records no code digest (a build before they "
                               f"were recorded); the archive's code digest is {digest}")
    else:
        report.add(CheckName.SOURCE_CODE, digest == claims.code,
                   f"code/: the code digest {digest[:16]}… " + ("is the attested one" if digest == claims.code else
                                                               f"is not the attested {claims.code[:16]}… (another "
                                                               "version of provenance)"))
    lock = archive.entries.get(LOCK)
    if claims.lock is None:
        report.could_not_check(CheckName.SOURCE_LOCK, "the attestation records no toolchain lock digest")
    else:
        bad = _differ(claims.lock, lock.digest) if lock else ["absent"]
        report.add(CheckName.SOURCE_LOCK, not bad, f"{LOCK}: " + ("; ".join(bad) if bad else "the attested lock"))
    return set(code.values()) | {LOCK, PYPROJECT}


def _licences_check(report: Checks, archive: Archive, claims: SourceClaims) -> set[str]:
    have = {p.removeprefix("licenses/").removesuffix(".txt") for p in archive.entries
            if p.startswith("licenses/") and p.endswith(".txt")}
    missing = sorted(claims.licences - have)
    report.add(CheckName.SOURCE_LICENCES, not missing,
               f"no text for {', '.join(missing)} under licenses/" if missing else
               f"the text of every licence involved: {', '.join(sorted(claims.licences))}")
    return {licence_path(x) for x in claims.licences}


def source_statement_checks(report: Checks, payload: dict[str, Any],
                            archive_path: Path) -> tuple[SourceClaims, dict[str, dict[str, str]]] | None:
    """A signed corresponding-source statement: its fields, and that the archive is its subject.
    Returns (claims, the model subjects' digests by file name) when both hold."""
    from .._internal.hashing import hash_file
    from ..attest.model import STATEMENT_TYPE
    from ..attest.source import parse_predicate

    claims, name, problems = parse_predicate(payload.get("predicate"))
    if payload.get("_type") != STATEMENT_TYPE:
        problems.append(f"_type {payload.get('_type')!r}, expected {STATEMENT_TYPE!r}")
    subjects = payload.get("subject")
    digests = {s.get("name"): s.get("digest") for s in subjects if isinstance(s, dict)} \
        if isinstance(subjects, list) else {}
    model = {n.removeprefix("model/"): d for n, d in digests.items() if isinstance(n, str) and n.startswith("model/")
             and isinstance(d, dict) and isinstance(d.get("sha256"), str)}
    if claims is not None and not isinstance(digests.get(name), dict):
        problems.append(f"the archive {name!r} is not among the subjects")
    bad_names = [n for n in model if subject_name_problem(n)]
    problems += [f"subject 'model/{n}' {subject_name_problem(n)}" for n in bad_names]
    if not report.add(CheckName.SOURCE_STATEMENT, not problems and claims is not None,
                      "; ".join(problems[:5]) or f"corresponding-source statement for {name}, "
                      f"{len(model)} model file(s)") or claims is None:
        return None
    want = digests[name]
    bad = _differ(want, hash_file(archive_path)) if isinstance(want, dict) else ["no digest"]
    if not report.add(CheckName.SOURCE_SUBJECT, not bad,
                      f"{archive_path}: " + ("; ".join(bad) if bad else f"the signed subject {name!r}")):
        return None
    return claims, model


def _code_digest(archive: Archive, code: dict[str, str]) -> str:
    """The code digest of the archive's code/provenance/: its .py, .c, .h and .txt files (any other file there
    is left unaccounted for, so extra)."""
    from .._internal.codedigest import SUFFIXES, digest_entries, sort_paths

    rels = sort_paths(r for r in code if r.endswith(SUFFIXES))
    return digest_entries((r, archive.kept[code[r]]) for r in rels)
