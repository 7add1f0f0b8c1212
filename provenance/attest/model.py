"""The one model of what this project signs: an in-toto Statement v1 carrying SLSA Provenance v1.

The writer (attest/statement.py) validates every statement it signs against these models, and
the verifier (verify/) parses every statement it reads with them, so what is written is exactly
what is accepted. in-toto says consumers must ignore unknown fields, so the Statement and the
predicate's open objects ignore them; SLSA says verifiers should reject unknown
`externalParameters`, so that object, and this project's own extension objects, forbid them.
Subject names are paths inside the model directory and are validated before anyone uses them.
"""

from __future__ import annotations

import posixpath
import re
import unicodedata
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
# This project has no public home yet; `.invalid` says so honestly (docs/build-type.md).
BUILD_TYPE = "https://provenance.invalid/build-types/recipe/v1"
LOCAL_BUILDER_ID = "https://provenance.invalid/builders/local/v1"
RFC3339 = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"
Hex = Annotated[str, Field(pattern=r"^[0-9a-f]+$")]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
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


class Open(BaseModel):
    """An object whose unknown fields are ignored (in-toto: consumers must ignore them)."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class Closed(BaseModel):
    """An object this project defines completely: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ResourceDescriptor(Open):
    name: str | None = None
    uri: str | None = None
    digest: dict[str, Hex] | None = None
    content: str | None = None
    downloadLocation: str | None = None
    mediaType: str | None = None
    annotations: dict | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ResourceDescriptor:
        if self.uri is None and self.digest is None and self.content is None:
            raise ValueError("a ResourceDescriptor needs one of uri, digest, content")
        return self


class Subject(ResourceDescriptor):
    """A model file: its path inside the model directory, and its sha256."""

    name: str
    digest: dict[str, Hex]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        problem = subject_name_problem(v)
        if problem:
            raise ValueError(f"subject name {v!r} {problem}")
        return v

    @field_validator("digest")
    @classmethod
    def _sha256(cls, v: dict[str, str]) -> dict[str, str]:
        if not re.fullmatch(r"[0-9a-f]{64}", v.get("sha256", "")):
            raise ValueError("a subject's digest must hold a 64-hex-digit sha256")
        return v


class RecipeParameter(Closed):
    path: str
    digest: dict[str, Hex]
    content: str

    @field_validator("digest")
    @classmethod
    def _checkable(cls, v: dict[str, str]) -> dict[str, str]:
        if not any(a in v for a in CHECKABLE):
            raise ValueError(f"the recipe digest names no algorithm this verifier checks ({', '.join(CHECKABLE)}): "
                             f"{sorted(v)}")
        for a in CHECKABLE:
            if a in v and not re.fullmatch(r"[0-9a-f]{64}", v[a]):
                raise ValueError(f"recipe digest {a} must be 64 hex digits")
        return v


class ExternalParameters(Closed):
    """SLSA: verifiers should reject external parameters they do not know; the recipe is the only one."""

    recipe: RecipeParameter


class BuildDefinition(Open):
    buildType: str
    externalParameters: ExternalParameters
    internalParameters: dict = {}
    resolvedDependencies: list[ResourceDescriptor] = []


class Builder(Open):
    id: str
    version: dict[str, str] = {}
    builderDependencies: list[ResourceDescriptor] = []


class BuildMetadata(Open):
    invocationId: str | None = None
    startedOn: Annotated[str, Field(pattern=RFC3339)] | None = None
    finishedOn: Annotated[str, Field(pattern=RFC3339)] | None = None


class FileDigest(Closed):
    blake3: Hex64


class Outputs(Open):
    """runDetails.provenance_outputs: this project's vendor extension (SLSA's `<vendor>_<field>`)."""

    files: dict[str, FileDigest]
    tensors: dict = {}
    recitation: dict | None = None
    output_license: str | None = None
    input_licenses: list[str] = []
    fingerprint: dict | None = None


class RunDetails(Open):
    builder: Builder
    metadata: BuildMetadata = BuildMetadata()
    byproducts: list[ResourceDescriptor] = []
    provenance_outputs: Outputs


class Provenance(Open):
    buildDefinition: BuildDefinition
    runDetails: RunDetails


class Statement(Open):
    type_: str = Field(alias="_type")
    subject: Annotated[list[Subject], Field(min_length=1)]
    predicateType: str
    predicate: Provenance

    @model_validator(mode="after")
    def _consistent(self) -> Statement:
        names = [s.name for s in self.subject]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"subject names must be unique, repeated: {dup}")
        files = set(self.predicate.runDetails.provenance_outputs.files)
        if files != set(names):
            raise ValueError(f"subjects and runDetails.provenance_outputs.files list different files: "
                             f"{sorted(files ^ set(names))}")
        return self


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(statement)"


def statement_problems(err: ValidationError) -> list[str]:
    """One line per problem, with its dotted path."""
    out = []
    for e in err.errors(include_url=False):
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (refused: docs/build-type.md lists every field)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        out.append(f"{_loc(e['loc'])}: {msg}")
    return out


def parse_statement(obj: object) -> tuple[Statement | None, list[str]]:
    """(Statement, []) or (None, problems)."""
    try:
        return Statement.model_validate(obj), []
    except ValidationError as e:
        return None, statement_problems(e)
