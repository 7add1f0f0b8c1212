"""A model's lineage, verified link by link (`verify-attestation --chain`).

A fine-tune's provenance names its parent (an input of kind "model", docs/recipe.md "Fine-tuning"): the
parent's weights digest, and under `annotations.parent` the sha256 of the parent's attestation, its
recipe's digests and every file of its model directory with the sha256 its attestation signs. The walk
starts at a verified attestation and, while the statement names a parent, finds the parent's attestation
among the ones given (by that sha256), verifies it with the same verifier (keys, threshold, policy; its
model directory too when one is beside it), and holds what it signs to what the child recorded. It stops
at a model trained from scratch (the root), at MAX_LINKS links, or at the first link that fails, which
it names. docs/formats.md ("verify-attestation --chain") describes the result.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .report import CheckName, Checks, Result

if TYPE_CHECKING:
    from . import Verifier

MAX_LINKS = 16  # a chain deeper than this is refused: a fine-tune of a fine-tune ... sixteen times over
ATTESTATION = "attestation.intoto.jsonl"


class Link(NamedTuple):
    """One model of a lineage, as its verified attestation describes it."""

    recipe: str  # the recipe's name
    recipe_blake3: str
    weights: str  # blake3-tensors-v1
    attestation_sha256: str
    output_license: str
    input_licenses: tuple[str, ...]
    via: str  # the child's input that names this model ("" for the model the walk starts at)

    def as_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "recipe_blake3": self.recipe_blake3, "weights": self.weights,
                "attestation_sha256": self.attestation_sha256, "output_license": self.output_license,
                "input_licenses": list(self.input_licenses), "input": self.via}


class _Candidate(NamedTuple):
    attestation: Path
    model: Path | None
    sha256: str


def candidates(paths: list[Path]) -> list[_Candidate]:
    """Each `--chain` path: an attestation file, or a build directory (its attestation.intoto.jsonl, and its
    model/ when there is one, whose files are then verified too)."""
    out = []
    for p in paths:
        att = p / ATTESTATION if p.is_dir() else p
        model = p / "model" if p.is_dir() and (p / "model").is_dir() else None
        try:
            digest = hashlib.sha256(att.read_bytes()).hexdigest()
        except OSError as e:
            from ..errors import InputError

            raise InputError(f"--chain {p}: cannot read {att}: {e.strerror or e}") from None
        out.append(_Candidate(att, model, digest))
    return out


def walk(verifier: Verifier, start: Result, attestation: Path, given: list[Path]) -> Result:
    """`start` (the verification of `attestation`, an SLSA provenance) with one `chain` check per parent
    link and its lineage; a start that did not verify is returned as it is (nothing to walk from)."""
    pool = candidates(given)
    if not start.ok or not isinstance(start.payload, dict) or start.parsed is None:
        return start
    checks = Checks(start.checks)
    payload = start.payload
    lineage = [_link(payload, "", hashlib.sha256(attestation.read_bytes()).hexdigest())]
    seen = {lineage[0].attestation_sha256}
    while True:
        parent = _parent_of(payload)
        if parent is None:
            if len(lineage) == 1:
                checks.add(CheckName.CHAIN, True, f"{lineage[0].recipe!r} names no parent model: it is its own root")
            break
        name, want = parent
        where = f"link {len(lineage)} (input {name!r} of {lineage[-1].recipe!r})"
        if len(lineage) > MAX_LINKS:
            checks.add(CheckName.CHAIN, False, f"{where}: the chain is deeper than {MAX_LINKS} links; refused")
            break
        found = _verified_parent(verifier, checks, where, want, pool, seen)
        if found is None:
            break
        payload = found
        lineage.append(_link(payload, name, want["attestation_sha256"]))
        seen.add(want["attestation_sha256"])
    return checks.result(model_checked=start.model_checked, payload=start.payload, parsed=start.parsed,
                         lineage=tuple(lineage))


def _verified_parent(verifier: Verifier, checks: Checks, where: str, want: dict[str, Any],
                     pool: list[_Candidate], seen: set[str]) -> dict[str, Any] | None:
    """The parent's verified payload, once it is shown to be the one the child recorded; else a failed check."""
    if want["attestation_sha256"] in seen:
        checks.add(CheckName.CHAIN, False, f"{where}: names attestation sha256:{want['attestation_sha256']}, "
                                           "already in this chain: a cycle")
        return None
    found = next((c for c in pool if c.sha256 == want["attestation_sha256"]), None)
    if found is None:
        checks.add(CheckName.CHAIN, False, f"{where}: its parent's attestation (sha256:{want['attestation_sha256']}) "
                                           "is not among the --chain files; a re-signed or other attestation is not it")
        return None
    result = verifier.verify(found.attestation, model=found.model)
    if not result.ok or not isinstance(result.payload, dict):
        failed = "; ".join(f"{c.check.value}: {c.detail}" for c in result.checks if not c.ok)
        checks.add(CheckName.CHAIN, False, f"{where}: {found.attestation} does not verify: {failed}")
        return None
    problem = _mismatch(result.payload, want)
    if problem:
        checks.add(CheckName.CHAIN, False, f"{where}: {found.attestation}: {problem}")
        return None
    files = "its files checked in " + str(found.model) if found.model else "its attestation only (no model/ beside it)"
    checks.add(CheckName.CHAIN, True, f"{where}: {_recipe_name(result.payload)!r}, weights blake3:{want['weights']}, "
                                      f"verified ({files})")
    return result.payload


def _mismatch(payload: dict[str, Any], want: dict[str, Any]) -> str | None:
    """What the parent's statement signs that the child did not record (None when all agree)."""
    subjects = {s["name"]: s["digest"].get("sha256") for s in payload["subject"]}
    if subjects != want["files"]:
        differ = sorted(n for n in set(subjects) | set(want["files"]) if subjects.get(n) != want["files"].get(n))
        return f"its signed files differ from the ones the child recorded ({', '.join(differ[:5])})"
    recipe = payload["predicate"]["buildDefinition"]["externalParameters"]["recipe"]["digest"]
    if recipe.get("blake3") != want["recipe"].get("blake3"):
        return f"its recipe is blake3:{recipe.get('blake3')}, the child recorded blake3:{want['recipe'].get('blake3')}"
    weights = _outputs(payload).get("tensors", {}).get("digest")
    if weights != want["weights"]:
        return f"its weights are blake3:{weights}, the child was built on blake3:{want['weights']}"
    return None


def _parent_of(payload: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(input name, what the child recorded of it) for the statement's parent model, if it names one."""
    deps = payload.get("predicate", {}).get("buildDefinition", {}).get("resolvedDependencies", [])
    for dep in deps if isinstance(deps, list) else []:
        notes = dep.get("annotations") if isinstance(dep, dict) else None
        parent = notes.get("parent") if isinstance(notes, dict) and notes.get("kind") == "model" else None
        if isinstance(parent, dict):
            att, files, recipe = (_obj(parent.get(k)) for k in ("attestation", "files", "recipe"))
            return str(dep.get("name", "")).removeprefix("input:"), {
                "attestation_sha256": att.get("sha256"), "files": files, "recipe": recipe,
                "weights": _obj(dep.get("digest")).get("blake3")}
    return None


def _obj(value: object) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one (an annotation is an open, unvalidated object)."""
    return value if isinstance(value, dict) else {}


def _outputs(payload: dict[str, Any]) -> dict[str, Any]:
    return _obj(_obj(_obj(payload.get("predicate")).get("runDetails")).get("provenance_outputs"))


def _recipe_name(payload: dict[str, Any]) -> str:
    import tomllib

    content = payload["predicate"]["buildDefinition"]["externalParameters"]["recipe"]["content"]
    try:
        return str(tomllib.loads(content).get("recipe", {}).get("name", ""))
    except tomllib.TOMLDecodeError:
        return ""


def _link(payload: dict[str, Any], via: str, attestation_sha256: str) -> Link:
    outputs = _outputs(payload)
    recipe = payload.get("predicate", {}).get("buildDefinition", {}).get("externalParameters", {}).get("recipe", {})
    return Link(_recipe_name(payload), recipe.get("digest", {}).get("blake3", ""),
                outputs.get("tensors", {}).get("digest", ""), attestation_sha256,
                str(outputs.get("output_license", "")), tuple(outputs.get("input_licenses", [])), via)
