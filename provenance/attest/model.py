"""The one model of what this project signs: an in-toto Statement v1 carrying SLSA Provenance v1.

The writer (attest/statement.py) validates every statement it signs against this model, and
the verifier (verify/) parses every statement it reads with it, so what is written is exactly
what is accepted. Plain named tuples and one parser that collects every problem with its
dotted path: the verifier's exact path imports no validation framework, which keeps its start-up
cost small next to hashing (docs/benchmarks.md). in-toto says consumers must ignore unknown
fields, so the Statement and the predicate's open objects ignore them; SLSA says verifiers should
reject unknown `externalParameters`, so that object, and this project's own extension objects,
refuse them.
Subject names are paths inside the model directory and are validated before anyone uses them.
"""

from __future__ import annotations

import posixpath
import re
import unicodedata
from typing import TYPE_CHECKING, NamedTuple, TypeGuard

if TYPE_CHECKING:
    from .._internal.jsonstrict import JSONObject

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
VSA_TYPE = "https://slsa.dev/verification_summary/v1"
# This project has no public home yet; `.invalid` says so honestly (docs/build-type.md).
BUILD_TYPE = "https://provenance.invalid/build-types/recipe/v1"
LOCAL_BUILDER_ID = "https://provenance.invalid/builders/local/v1"
RFC3339 = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"
HEX = re.compile(r"[0-9a-f]+")
HEX64 = re.compile(r"[0-9a-f]{64}")
RFC3339_RE = re.compile(RFC3339)
# The digest algorithms this project can check; a digest set naming none of them checks nothing.
CHECKABLE = ("sha256", "blake3")


def subject_name_problem(name: object) -> str | None:
    """Why `name` is not a safe, canonical relative path inside a model directory (None if it is)."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if len(name) > 1024:
        return "is longer than 1024 characters"
    if "\x00" in name:
        return "contains NUL"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "contains a control character"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if ".." in name.split("/"):
        return "contains '..'"
    if posixpath.normpath(name) != name:
        return "is not a normalized path (empty, '.' or trailing components)"
    if not unicodedata.is_normalized("NFC", name):
        return "is not in Unicode NFC"
    return None


class _Problems(list[str]):
    def add(self, loc: str, msg: str) -> None:
        self.append(f"{loc}: {msg}")


def _is_size(v: object) -> bool:
    return type(v) is int and 0 <= v <= (1 << 53) - 1


def _is_obj(v: object, loc: str, p: _Problems) -> TypeGuard[JSONObject]:
    if not isinstance(v, dict):
        p.add(loc, "must be an object" if v is not None else "required field is missing")
        return False
    return True


def _closed(d: JSONObject, allowed: set[str], loc: str, p: _Problems) -> None:
    for k in sorted(set(d) - allowed):
        p.add(f"{loc}.{k}", "unknown field (refused: docs/build-type.md lists every field)")


def _str(d: JSONObject, key: str, loc: str, p: _Problems, *, required: bool = True) -> str | None:
    v = d.get(key)
    if v is None:
        if required:
            p.add(f"{loc}.{key}", "required field is missing")
        return None
    if not isinstance(v, str):
        p.add(f"{loc}.{key}", "must be a string")
        return None
    return v


def _digest(v: object, loc: str, p: _Problems) -> dict[str, str] | None:
    if not isinstance(v, dict):
        p.add(loc, "must be an object mapping algorithm names to lowercase hex")
        return None
    for k, h in v.items():
        if not isinstance(h, str) or not HEX.fullmatch(h):
            p.add(f"{loc}.{k}", "must be lowercase hex")
            return None
    return dict(v)


class ResourceDescriptor(NamedTuple):
    name: str | None = None
    uri: str | None = None
    digest: dict[str, str] | None = None
    content: str | None = None
    annotations: JSONObject | None = None

    @classmethod
    def parse(cls, v: object, loc: str, p: _Problems) -> ResourceDescriptor | None:
        if not _is_obj(v, loc, p):
            return None
        n = len(p)
        name, uri, content = (_str(v, k, loc, p, required=False) for k in ("name", "uri", "content"))
        digest = _digest(v["digest"], f"{loc}.digest", p) if "digest" in v else None
        ann = v.get("annotations")
        if ann is not None and not isinstance(ann, dict):
            p.add(f"{loc}.annotations", "must be an object")
        if uri is None and digest is None and content is None:
            p.add(loc, "a ResourceDescriptor needs one of uri, digest, content")
        return cls(name, uri, digest, content, ann if isinstance(ann, dict) else None) if len(p) == n else None


class Subject(NamedTuple):
    """A model file: its path inside the model directory, and its sha256."""

    name: str
    digest: dict[str, str]

    @classmethod
    def parse(cls, v: object, loc: str, p: _Problems) -> Subject | None:
        if not _is_obj(v, loc, p):
            return None
        name = _str(v, "name", loc, p)
        problem = subject_name_problem(name) if name is not None else None
        if problem:
            p.add(f"{loc}.name", f"subject name {name!r} {problem}")
            return None
        digest = _digest(v.get("digest"), f"{loc}.digest", p)
        if digest is not None and not HEX64.fullmatch(digest.get("sha256", "")):
            p.add(f"{loc}.digest", "a subject's digest must hold a 64-hex-digit sha256")
            return None
        return cls(name, digest) if name is not None and digest is not None else None


class RecipeParameter(NamedTuple):
    path: str
    digest: dict[str, str]
    content: str

    @classmethod
    def parse(cls, v: object, loc: str, p: _Problems) -> RecipeParameter | None:
        if not _is_obj(v, loc, p):
            return None
        n = len(p)
        _closed(v, {"path", "digest", "content"}, loc, p)
        path, content = _str(v, "path", loc, p), _str(v, "content", loc, p)
        digest = _digest(v.get("digest"), f"{loc}.digest", p)
        if digest is not None:
            if not any(a in digest for a in CHECKABLE):
                p.add(f"{loc}.digest", f"names no algorithm this verifier checks ({', '.join(CHECKABLE)}): "
                      f"{sorted(digest)}")
            for a in CHECKABLE:
                if a in digest and not HEX64.fullmatch(digest[a]):
                    p.add(f"{loc}.digest.{a}", "must be 64 hex digits")
        if len(p) != n or path is None or digest is None or content is None:
            return None
        return cls(path, digest, content)


class BuildDefinition(NamedTuple):
    buildType: str
    recipe: RecipeParameter  # externalParameters.recipe: SLSA asks verifiers to reject unknown external parameters
    internalParameters: JSONObject
    resolvedDependencies: tuple[ResourceDescriptor, ...]


class Outputs(NamedTuple):
    """runDetails.provenance_outputs: this project's vendor extension (SLSA's `<vendor>_<field>`)."""

    files: dict[str, str]  # subject name -> blake3
    tensors: JSONObject  # tensor name -> digests (docs/build-type.md)
    output_license: str | None = None
    fingerprint: JSONObject | None = None
    recitation: JSONObject | None = None
    sizes: dict[str, int] | None = None  # subject name -> byte size, where the statement signs one


class RunDetails(NamedTuple):
    builder_id: str
    provenance_outputs: Outputs


class Statement(NamedTuple):
    subject: tuple[Subject, ...]
    predicateType: str
    buildDefinition: BuildDefinition
    runDetails: RunDetails

    @property
    def recipe(self) -> RecipeParameter:
        return self.buildDefinition.recipe

    @property
    def files(self) -> dict[str, str]:
        return self.runDetails.provenance_outputs.files


def _build_definition(v: object, loc: str, p: _Problems) -> BuildDefinition | None:
    if not _is_obj(v, loc, p):
        return None
    n = len(p)
    bt = _str(v, "buildType", loc, p)
    ext = v.get("externalParameters")
    recipe = None
    if _is_obj(ext, f"{loc}.externalParameters", p):
        _closed(ext, {"recipe"}, f"{loc}.externalParameters", p)
        recipe = RecipeParameter.parse(ext.get("recipe"), f"{loc}.externalParameters.recipe", p)
    internal = v.get("internalParameters", {})
    if not isinstance(internal, dict):
        p.add(f"{loc}.internalParameters", "must be an object")
    deps = v.get("resolvedDependencies", [])
    parsed = []
    if not isinstance(deps, list):
        p.add(f"{loc}.resolvedDependencies", "must be an array")
    else:
        parsed = [ResourceDescriptor.parse(d, f"{loc}.resolvedDependencies[{i}]", p) for i, d in enumerate(deps)]
    deps_ok = [d for d in parsed if d is not None]
    if len(p) != n or bt is None or recipe is None or not isinstance(internal, dict) or len(deps_ok) != len(parsed):
        return None
    return BuildDefinition(bt, recipe, internal, tuple(deps_ok))


def _run_details(v: object, loc: str, p: _Problems) -> RunDetails | None:
    if not _is_obj(v, loc, p):
        return None
    n = len(p)
    builder = v.get("builder")
    bid = _str(builder, "id", f"{loc}.builder", p) if _is_obj(builder, f"{loc}.builder", p) else None
    meta = v.get("metadata", {})
    if _is_obj(meta, f"{loc}.metadata", p):
        for k in ("startedOn", "finishedOn"):
            t = _str(meta, k, f"{loc}.metadata", p, required=False)
            if t is not None and not RFC3339_RE.fullmatch(t):
                p.add(f"{loc}.metadata.{k}", "must be an RFC 3339 timestamp")
    byproducts = v.get("byproducts", [])
    if not isinstance(byproducts, list):
        p.add(f"{loc}.byproducts", "must be an array")
    else:
        for i, b in enumerate(byproducts):
            ResourceDescriptor.parse(b, f"{loc}.byproducts[{i}]", p)
    out, outputs = v.get("provenance_outputs"), None
    oloc = f"{loc}.provenance_outputs"
    if _is_obj(out, oloc, p):
        files = out.get("files")
        names: dict[str, str] = {}
        sizes: dict[str, int] = {}
        if _is_obj(files, f"{oloc}.files", p):
            for name, d in files.items():
                if not isinstance(d, dict) or set(d) - {"size"} != {"blake3"} or not isinstance(d["blake3"], str) \
                        or not HEX64.fullmatch(d["blake3"]) or ("size" in d and not _is_size(d["size"])):
                    p.add(f"{oloc}.files.{name}", "must be exactly {\"blake3\": <64 hex digits>} and optionally "
                          "\"size\": <bytes, a non-negative integer>")
                else:
                    names[name] = d["blake3"]
                    if "size" in d:
                        sizes[name] = d["size"]
        lic = out.get("output_license")
        if lic is not None and not isinstance(lic, str):
            p.add(f"{oloc}.output_license", "must be a string")
        tensors, fp, rec = out.get("tensors", {}), out.get("fingerprint"), out.get("recitation")
        outputs = Outputs(names, tensors if isinstance(tensors, dict) else {}, lic,
                          fp if isinstance(fp, dict) else None, rec if isinstance(rec, dict) else None, sizes or None)
    if len(p) != n or bid is None or outputs is None:
        return None
    return RunDetails(bid, outputs)


def parse_statement(obj: object) -> tuple[Statement | None, list[str]]:
    """(Statement, []) or (None, every problem with its dotted path)."""
    p = _Problems()
    if not _is_obj(obj, "(statement)", p):
        return None, p
    if obj.get("_type") != STATEMENT_TYPE:
        p.add("_type", f"must be {STATEMENT_TYPE!r}")
    pt = _str(obj, "predicateType", "(statement)", p)
    subjects = obj.get("subject")
    parsed: list[Subject | None] = []
    names: list[str] = []
    if not isinstance(subjects, list) or not subjects:
        p.add("subject", "must be a non-empty array")
    else:
        parsed = [Subject.parse(s, f"subject[{i}]", p) for i, s in enumerate(subjects)]
        names = [s.name for s in parsed if s is not None]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            p.add("subject", f"subject names must be unique, repeated: {dup}")
    pred = obj.get("predicate")
    bd = rd = None
    if _is_obj(pred, "predicate", p):
        bd = _build_definition(pred.get("buildDefinition"), "predicate.buildDefinition", p)
        rd = _run_details(pred.get("runDetails"), "predicate.runDetails", p)
    subjects_ok = [s for s in parsed if s is not None]
    if rd is not None and parsed and len(subjects_ok) == len(parsed):
        listed = set(names)
        if set(rd.provenance_outputs.files) != listed:
            p.add("predicate.runDetails.provenance_outputs.files",
                  f"subjects and files list different names: {sorted(set(rd.provenance_outputs.files) ^ listed)}")
    if p or pt is None or bd is None or rd is None:
        return None, list(p) or ["(statement): incomplete"]
    return Statement(tuple(subjects_ok), pt, bd, rd), []
