"""The attestation: an in-toto Statement v1 carrying SLSA Provenance v1 for one build.

Subjects are the model directory's files with sha256 (what sigstore, slsa-verifier and GitHub
accept); blake3 file digests and the canonical tensor digest live in the predicate under the
vendor extension field `provenance_outputs` (SLSA's `<vendor>_<field>` rule). docs/build-type.md
documents every parameter.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from .._internal.jsonstrict import JSONObject
from .model import BUILD_TYPE, LOCAL_BUILDER_ID, PAYLOAD_TYPE, PREDICATE_TYPE, STATEMENT_TYPE  # noqa: F401

if TYPE_CHECKING:
    from ..recipe import Input, LoadedExport, LoadedRecipe

TOOLCHAIN_DISTRIBUTIONS = ("torch", "transformers", "tokenizers", "safetensors")


def builder_id() -> str:
    """Who this build says built it: $PROVENANCE_BUILDER_ID (e.g. a CI workflow's URI), else the local builder.

    This is the writer's identity only; which builders a verifier trusts is the verifier's policy."""
    return os.environ.get("PROVENANCE_BUILDER_ID") or LOCAL_BUILDER_ID


def canonical(obj: object) -> bytes:
    """RFC 8785 canonical JSON. Raises rfc8785.IntegerDomainError for integers beyond 2^53-1."""
    import rfc8785

    return bytes(rfc8785.dumps(obj))  # type: ignore[arg-type]  # any JSON value; rfc8785 refuses the rest


def _record_digest(dist: str) -> JSONObject | None:
    from importlib import metadata

    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return None
    from .._internal.hashing import hash_bytes

    record = d.read_text("RECORD")
    if record is None:
        return None
    return {"name": f"toolchain:{dist}", "uri": f"pkg:pypi/{dist}@{d.version}",
            "digest": hash_bytes(record.encode()), "annotations": {"digest_of": "RECORD"}}


def toolchain_dependencies() -> list[JSONObject]:
    from .._internal.hashing import hash_file

    exe = Path(sys.executable).resolve()
    deps: list[JSONObject] = [{"name": "toolchain:python", "uri": f"pkg:generic/cpython@{platform.python_version()}",
             "digest": hash_file(exe), "annotations": {"digest_of": "interpreter binary",
                                                       "implementation": platform.python_implementation()}}]
    deps += [d for d in (_record_digest(n) for n in TOOLCHAIN_DISTRIBUTIONS) if d]
    return deps


def source_revision() -> JSONObject:
    """This project's own source: its code digest, its toolchain lock's digest, the git commit it runs
    from and whether the tree is dirty."""
    from .._internal.codedigest import code_digest, package_root

    root = package_root().parent
    annotations: JSONObject = {"version": __version__, "code": code_digest()}
    lock = root / "locks" / "dev.lock"
    if lock.is_file():  # the toolchain lock a corresponding-source archive carries (docs/formats.md)
        from .._internal.hashing import hash_file

        annotations["lock"] = hash_file(lock)
    entry: JSONObject = {"name": "builder-source:provenance", "uri": f"pkg:pypi/provenance@{__version__}",
                         "annotations": annotations}
    if not (root / ".git").exists():
        annotations["git"] = "not a git checkout"
        entry["digest"] = {"sha256": hashlib.sha256(__version__.encode()).hexdigest()}
        return entry
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip() != ""
    except (OSError, subprocess.CalledProcessError):
        annotations["git"] = "git unavailable"
        entry["digest"] = {"sha256": hashlib.sha256(__version__.encode()).hexdigest()}
        return entry
    entry["digest"] = {"gitCommit": commit}
    annotations["dirty"] = dirty
    return entry


def input_uri(inp: Input) -> str:
    if inp.kind == "pypi":
        return f"pkg:pypi/{inp.package}@{inp.version}"
    if inp.kind == "url" and inp.url is not None:
        return inp.url
    if inp.kind == "model":
        return f"file:{inp.path}#model"
    return f"file:{inp.path}"


def statement(*, recipe: LoadedRecipe, record: JSONObject, manifest: JSONObject, model_files: dict[str, dict[str, str]],
              byproducts: dict[str, dict[str, str]], invocation_id: str,
              fingerprint: JSONObject | None = None, model_sizes: dict[str, int] | None = None) -> JSONObject:
    """Assemble the Statement for a finished build (its build.json content is `record`)."""
    r = recipe.recipe
    specs = {i.name: i for i in r.inputs}
    per_input: dict[str, dict[str, Any]] = {}
    for f in manifest["files"]:
        s = per_input.setdefault(f["input"], {"files": 0, "bytes": 0, "licenses": set()})
        s["files"] += 1
        s["bytes"] += f["size"]
        s["licenses"].add(f["license"])
    inputs = []
    for rec in record["inputs"]:
        stats = per_input.get(rec["name"], {"files": 0, "bytes": 0, "licenses": set()})
        inputs.append({
            "name": f"input:{rec['name']}",
            "uri": input_uri(specs[rec["name"]]),
            "digest": {"sha256": rec["sha256"], "blake3": rec["blake3"]} if "sha256" in rec else
                       {"blake3": rec["blake3"]},
            "annotations": {"license": rec["license"], "kind": rec["kind"], "artifact": rec["artifact"],
                            "selected_files": stats["files"], "selected_bytes": stats["bytes"],
                            "file_licenses": sorted(stats["licenses"]),
                            **({"parent": rec["parent"]} if "parent" in rec else {})},
        })
    carried = {lic for rec in record["inputs"] for lic in rec.get("parent", {}).get("input_licenses", {})}
    dm = record["dataset_manifest"]
    tok = record["tokenizer"]
    deps = inputs + [
        {"name": "dataset-manifest", "digest": {"sha256": dm["sha256"], "blake3": dm["blake3"]},
         "annotations": {"merkle_root": dm["merkle_root"], "files": dm["totals"]["files"],
                         "bytes": dm["totals"]["bytes"], "licenses": dm["licenses"]}},
        {"name": "tokenizer", "digest": dict(tok["tokenizer.json"]),
         "annotations": {"file": "tokenizer.json", "vocab_size": tok["vocab_size"]}},
        *toolchain_dependencies(),
        source_revision(),
    ]
    outputs = {
        "tensors": record["weights"]["tensors"],
        "files": {name: {"blake3": d["blake3"], **({"size": model_sizes[name]} if model_sizes else {})}
                  for name, d in sorted(model_files.items())},
        "recitation": record["recitation"],
        "output_license": r.output.license,
        "input_licenses": sorted({lic for s in per_input.values() for lic in s["licenses"]} | carried),
    }
    if fingerprint is not None:
        outputs["fingerprint"] = fingerprint
    internal = {
        "determinism": record["determinism"],
        "machine": record.get("machine", {}),
        "toolchain_mismatches": record["toolchain"]["mismatches"],
        "distributed": record.get("distributed", {"world_size": 1, "backend": None}),
        "training": {k: record["training"][k] for k in ("resumed_after_step", "stage_cache", "portable")
                     if k in record["training"]},
    }
    return _provenance(recipe, model_files, record, internal=internal, deps=deps, outputs=outputs,
                       byproducts=byproducts, invocation_id=invocation_id)


def _provenance(recipe: LoadedRecipe | LoadedExport, model_files: dict[str, dict[str, str]], record: JSONObject, *,
                internal: JSONObject, deps: list[JSONObject], outputs: JSONObject,
                byproducts: dict[str, dict[str, str]], invocation_id: str) -> JSONObject:
    """The Statement around a build's parts, checked with the reader's own model before it is signed."""
    st = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": d["sha256"]}} for name, d in sorted(model_files.items())],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "recipe": {"path": Path(recipe.path).name, "digest": dict(recipe.digests), "content": recipe.text},
                },
                "internalParameters": internal,
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {"id": builder_id(), "version": {"provenance": __version__}},
                "metadata": {"invocationId": invocation_id, "startedOn": record["started"],
                             "finishedOn": record["finished"]},
                "byproducts": [{"name": name, "digest": dict(d)} for name, d in sorted(byproducts.items())],
                "provenance_outputs": outputs,
            },
        },
    }
    from .model import parse_statement

    _, problems = parse_statement(st)
    if problems:  # the reader would refuse it: a bug in this writer, never the user's fault
        raise RuntimeError("the statement this build would sign does not validate: " + "; ".join(problems))
    return st


def export_statement(*, recipe: LoadedExport, record: JSONObject, model_files: dict[str, dict[str, str]],
                     model_sizes: dict[str, int], byproducts: dict[str, dict[str, str]]) -> JSONObject:
    """The Statement of an export (builder/export.py): the same build type and fields as a training build's,
    its one dependency the parent model (with what the parent's attestation says), no dataset."""
    (rec,) = record["inputs"]
    (spec,) = recipe.recipe.inputs
    parent = rec["parent"]
    dep = {"name": f"input:{rec['name']}", "uri": input_uri(spec), "digest": {"blake3": rec["blake3"]},
           "annotations": {"license": rec["license"], "kind": rec["kind"], "artifact": rec["artifact"],
                           "selected_files": 0, "selected_bytes": 0, "file_licenses": [], "parent": parent}}
    outputs = {
        "tensors": record["weights"]["tensors"],
        "files": {name: {"blake3": d["blake3"], "size": model_sizes[name]} for name, d in sorted(model_files.items())},
        "output_license": recipe.recipe.output.license,
        "input_licenses": sorted(parent["input_licenses"]),
    }
    return _provenance(recipe, model_files, record, internal={"export": record["export"]},
                       deps=[dep, *toolchain_dependencies(), source_revision()], outputs=outputs, byproducts=byproducts,
                       invocation_id=record["invocation_id"])
