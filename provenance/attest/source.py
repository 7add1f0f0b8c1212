"""The corresponding-source archive's names and its signed statement (docs/formats.md, "Corresponding
source"): one model shared by the writer (repro/source.py) and the verifier (verify/source.py).

The archive is a plain POSIX tar whose entries all sit under one folder, `<recipe name>-source/`:

    README.md              how to rebuild, and the digests
    SOURCE.json            the table of contents: every other entry's path, size and digests
    recipe/<file>          the recipe, byte for byte
    inputs/<name>/...      each input as pinned: its artifact file, or a directory input's files;
                           a parent model (a fine-tune's or an export's) as a folder of its own:
                           model/... (every file its attestation signs), attestation.intoto.jsonl,
                           signing-key.pub and source.tar, the parent's own corresponding source
    code/provenance/...    this project's .py, .c, .h and licence .txt files: the code digest recorded
    code/pyproject.toml    how the code is installed
    code/locks/dev.lock    the toolchain, pinned with hashes
    licenses/<SPDX-ID>.txt the text of every licence involved

The statement's subjects are the archive and the model's files; its predicate names what the
archive holds, so a verifier can hold an archive to it without trusting the archive's own table.
"""

from __future__ import annotations

import re
from typing import NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .._internal.jsonstrict import JSONObject

SOURCE_PREDICATE_TYPE = "https://provenance.invalid/corresponding-source/v1"
ARCHIVE_FORMAT = "provenance-source-v1"
CODE_DIGEST = "provenance-code-v1"  # the code digest's algorithm (docs/formats.md, "Code digest")
TOC = "SOURCE.json"
README = "README.md"
PYPROJECT = "code/pyproject.toml"
LOCK = "code/locks/dev.lock"
CODE_PREFIX = "code/provenance/"
# The licence of this project's own code, which every archive carries.
BUILDER_LICENCE = "Apache-2.0"
SPDX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]{0,63}")


def spdx_ids(expression: str) -> set[str]:
    """The licence (and exception) identifiers an SPDX expression names."""
    return {t for t in re.findall(r"[A-Za-z0-9.+:-]+", expression) if t not in ("AND", "OR", "WITH")}


def input_prefix(name: str) -> str:
    return f"inputs/{name}/"


def licence_path(spdx_id: str) -> str:
    return f"licenses/{spdx_id}.txt"


# A parent model's folder under inputs/<name>/ (the same layout `--input NAME=DIR` takes for a parent).
PARENT_MODEL = "model/"
PARENT_ATTESTATION = "attestation.intoto.jsonl"
PARENT_KEY = "signing-key.pub"
PARENT_SOURCE = "source.tar"


def parent_part(rel: str) -> str | None:
    """Which of a parent folder's attestation and source.tar `rel` (a path under an archive's top folder)
    is, when it is inputs/<name>/<that file>; else None."""
    parts = rel.split("/")
    return parts[2] if len(parts) == 3 and parts[0] == "inputs" and parts[2] in (PARENT_ATTESTATION,
                                                                                  PARENT_SOURCE) else None


class ParentSource(NamedTuple):
    """What a parent model's folder in an archive must hold, as the child's provenance records it."""

    attestation: dict[str, str]  # the parent's attestation file's digests
    key: dict[str, str] | None  # the public key it is signed with (None: not recorded, or keyless)
    files: dict[str, str]  # every file of its model directory -> its signed sha256


class SourceInput(NamedTuple):
    name: str
    artifact: str  # the file name of a file input; "" for a directory input or a parent model
    digest: dict[str, str]
    license: str
    parent: ParentSource | None = None  # a parent model (kind = "model")


class SourceClaims(NamedTuple):
    """What an archive must hold: from the source statement's predicate, or from a build's provenance."""

    recipe_path: str
    recipe_digest: dict[str, str]
    inputs: tuple[SourceInput, ...]
    code: str | None  # None: the provenance does not record it (built before it was recorded)
    lock: dict[str, str] | None
    licences: frozenset[str]


def predicate(claims: SourceClaims, archive_name: str) -> JSONObject:
    return {
        "archive": {"name": archive_name, "format": ARCHIVE_FORMAT},
        "recipe": {"path": claims.recipe_path, "digest": dict(claims.recipe_digest)},
        "inputs": [_input_json(i) for i in claims.inputs],
        "code": {"digest": claims.code, "algorithm": CODE_DIGEST},
        "lock": {"path": LOCK, "digest": dict(claims.lock or {})},
        "licenses": sorted(claims.licences),
    }


def _input_json(i: SourceInput) -> JSONObject:
    out: JSONObject = {"name": i.name, "artifact": i.artifact, "digest": dict(i.digest), "license": i.license}
    if i.parent is not None:
        out["parent"] = {"attestation": dict(i.parent.attestation), "files": dict(i.parent.files),
                         **({"key": dict(i.parent.key)} if i.parent.key is not None else {})}
    return out


def parse_parent(p: object) -> ParentSource | None:
    """A parent's record (the predicate's `parent`, or the provenance's `annotations.parent`) as the source
    claims it; None when it lacks the attestation's sha256 or the files' table."""
    if not isinstance(p, dict):
        return None
    att, key, files = p.get("attestation"), p.get("key"), p.get("files")
    if not (_digest(att) and isinstance(files, dict) and files and "sha256" in att  # type: ignore[operator]
            and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
        return None
    return ParentSource(dict(att), dict(key) if _digest(key) else None, dict(files))  # type: ignore[arg-type]


def parse_predicate(p: object) -> tuple[SourceClaims | None, str, list[str]]:
    """(claims, archive name, problems) of a corresponding-source predicate."""
    if not isinstance(p, dict):
        return None, "", ["predicate must be an object"]
    archive, recipe, inputs = _obj(p.get("archive")), _obj(p.get("recipe")), p.get("inputs")
    code, lock, licences = _obj(p.get("code")), _obj(p.get("lock")), p.get("licenses")
    problems: list[str] = []
    name = archive.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        problems.append("predicate.archive.name must be a file name")
    elif archive.get("format") != ARCHIVE_FORMAT:
        problems.append(f"predicate.archive.format {archive.get('format')!r}, expected {ARCHIVE_FORMAT!r}")
    if not (isinstance(recipe.get("path"), str) and _digest(recipe.get("digest"))):
        problems.append("predicate.recipe needs a path and a digest")
    parsed = [_input(i) for i in inputs] if isinstance(inputs, list) else [None]
    if None in parsed:
        problems.append("predicate.inputs must list objects with a name, an artifact, a digest and a license")
    if not (code.get("algorithm") == CODE_DIGEST and isinstance(code.get("digest"), str)):
        problems.append(f"predicate.code needs a digest of algorithm {CODE_DIGEST!r}")
    if not (lock.get("path") == LOCK and _digest(lock.get("digest"))):
        problems.append(f"predicate.lock needs path {LOCK!r} and a digest")
    if not (isinstance(licences, list) and all(isinstance(x, str) and SPDX_ID.fullmatch(x) for x in licences)):
        problems.append("predicate.licenses must list SPDX identifiers")
    if problems or not isinstance(name, str) or not isinstance(licences, list):
        return None, "", problems
    return SourceClaims(recipe["path"], dict(recipe["digest"]), tuple(i for i in parsed if i is not None),
                        code["digest"], dict(lock["digest"]), frozenset(licences)), name, []


def _obj(v: object) -> JSONObject:
    return v if isinstance(v, dict) else {}


def _digest(d: object) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(k, str) and isinstance(v, str) and v
                                                   for k, v in d.items())


def _input(i: object) -> SourceInput | None:
    if not (isinstance(i, dict) and isinstance(i.get("name"), str) and isinstance(i.get("artifact"), str)
            and _digest(i.get("digest")) and isinstance(i.get("license"), str)):
        return None
    parent = parse_parent(i["parent"]) if "parent" in i else None
    if "parent" in i and parent is None:
        return None
    return SourceInput(i["name"], i["artifact"], dict(i["digest"]), i["license"], parent)


def source_statement(claims: SourceClaims, archive_name: str, archive_digest: dict[str, str],
                     model_files: dict[str, dict[str, str]]) -> JSONObject:
    """The in-toto Statement binding the archive to the model files it is the source of."""
    from .model import STATEMENT_TYPE

    subjects = [{"name": archive_name, "digest": {"sha256": archive_digest["sha256"],
                                                  "blake3": archive_digest["blake3"]}}]
    subjects += [{"name": f"model/{n}", "digest": {"sha256": d["sha256"]}} for n, d in sorted(model_files.items())]
    return {"_type": STATEMENT_TYPE, "subject": subjects, "predicateType": SOURCE_PREDICATE_TYPE,
            "predicate": predicate(claims, archive_name)}
