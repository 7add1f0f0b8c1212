"""The statement-level checks: types, field rules, builder, the embedded recipe, inputs, licences."""

from __future__ import annotations

from pathlib import Path

from .._internal.hashing import hash_bytes
from ..attest.model import PREDICATE_TYPE, STATEMENT_TYPE, Statement, parse_statement
from ..errors import ProvenanceError
from .policy import Policy
from .report import CheckName, Checks

TYPE_CHECKING = False
if TYPE_CHECKING:
    from license_expression import Licensing

MAX_RECIPE_BYTES = 16 << 20


def statement_checks(report: Checks, obj: object, policy: Policy) -> Statement | None:
    """Types, the in-toto/SLSA field rules (one model shared with the writer), build type, builder."""
    if not isinstance(obj, dict):
        report.add(CheckName.STATEMENT, False,
                   f"the signed payload is {type(obj).__name__ if obj is not None else 'null'}, "
                   "not a JSON object")
        return None
    t = obj.get("_type")
    ok = report.add(CheckName.STATEMENT_TYPE, t == STATEMENT_TYPE,
                    f"_type {t!r}" + ("" if t == STATEMENT_TYPE else f", expected {STATEMENT_TYPE!r}"))
    pt = obj.get("predicateType")
    ok &= report.add(CheckName.PREDICATE_TYPE, pt == PREDICATE_TYPE,
                     f"predicateType {pt!r}" + ("" if pt == PREDICATE_TYPE else f", expected {PREDICATE_TYPE!r}"))
    if not ok:
        return None
    st, problems = parse_statement(obj)
    if st is None:
        report.add(CheckName.SLSA_FIELDS, False,
                   "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))
        return None
    report.add(CheckName.SLSA_FIELDS, True, "in-toto Statement v1 and SLSA Provenance v1 field rules hold")
    bt = st.buildDefinition.buildType
    ok = report.add(CheckName.BUILD_TYPE, bt in policy.allowed_build_types,
                    bt + ("" if bt in policy.allowed_build_types else f" is not an allowed build type "
                          f"(allowed: {policy.allowed_build_types})"))
    bid = st.runDetails.builder_id
    ok &= report.add(CheckName.BUILDER_ID, bid in policy.allowed_builders,
                     bid + ("" if bid in policy.allowed_builders else f" is not an allowed builder "
                            f"(allowed: {policy.allowed_builders}; a policy file's allowed_builders names others)"))
    ok &= embedded_recipe_check(report, st)
    return st if ok else None


def _mismatches(want: dict[str, str], got: dict[str, str], got_is: str = "computed") -> list[str]:
    return [f"{a} attested {want[a]}, {got_is} {got[a]}" for a in ("blake3", "sha256") if a in want and
            want[a] != got[a]]


def embedded_recipe_check(report: Checks, st: Statement) -> bool:
    """The embedded recipe text must hash to every recorded digest this verifier knows."""
    rec = st.recipe
    bad = _mismatches(rec.digest, hash_bytes(rec.content.encode()))
    return report.add(CheckName.RECIPE_EMBEDDED, not bad,
                      "the embedded recipe does not match its recorded digest: " + "; ".join(bad) if bad
                      else f"the embedded recipe {rec.path!r} matches its recorded "
                      f"{' and '.join(a for a in ('blake3', 'sha256') if a in rec.digest)}")


def recipe_file_check(report: Checks, st: Statement, recipe_path: Path) -> None:
    from .._internal.reading import read_regular_file

    data = read_regular_file(Path(recipe_path), "recipe", MAX_RECIPE_BYTES)
    bad = _mismatches(st.recipe.digest, hash_bytes(data), "this file")
    report.add(CheckName.RECIPE, not bad,
               f"{recipe_path} is not the attested recipe ({st.recipe.path!r}, embedded in the "
               f"attestation): their contents differ; {'; '.join(bad)}" if bad else
               f"{recipe_path} matches externalParameters.recipe ({st.recipe.path!r})")


def inputs_check(report: Checks, st: Statement, store_root: Path | None) -> dict[str, int] | None:
    """Re-hash the stored inputs and rebuild the dataset manifest from the embedded recipe.

    Returns the licences re-derived from the inputs' files (for the policy), or None."""
    from ..inputs.dataset import select_dataset
    from ..inputs.store import Store, fetch_input
    from ..recipe import parse_recipe

    bd = st.buildDefinition
    rec = st.recipe
    path = Path(Path(rec.path).name or "embedded-recipe.toml")
    manifest_dep = next((d for d in bd.resolvedDependencies if d.name == "dataset-manifest"), None)
    root_ann = (manifest_dep.annotations or {}).get("merkle_root") if manifest_dep else None
    want_root = root_ann.get("digest") if isinstance(root_ann, dict) else None
    attested = {d.name.removeprefix("input:"): d.digest or {} for d in bd.resolvedDependencies
                if d.name is not None and d.name.startswith("input:")}
    store = Store(store_root)
    try:
        recipe = parse_recipe(path, rec.content)
        stored = []
        for inp in recipe.inputs:
            s = fetch_input(inp, store, recipe_dir=Path("."), offline=True, limits=recipe.limits)
            want = attested.get(inp.name)
            if want is None:
                report.add(CheckName.INPUTS, False,
                           f"input {inp.name!r} of the embedded recipe is not among the attested "
                           "resolvedDependencies")
                return None
            bad = [f"{a} attested {h}, stored {s.digests[a]}" for a, h in want.items()
                   if a in s.digests and s.digests[a] != h]
            if bad:
                report.add(CheckName.INPUTS, False, f"input {inp.name!r}: " + "; ".join(bad))
                return None
            stored.append(s)
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            _, m = select_dataset(recipe.dataset, stored, Path(work), path, recipe.limits)
    except ProvenanceError as e:
        msg = e.diagnostics().replace("--offline forbids fetching it", "verify-attestation never fetches")
        msg = msg.split("\n  Obtain the file elsewhere")[0]
        if "not in the store" in msg:  # a missing prerequisite, not a finding against the attestation
            report.could_not_check(CheckName.INPUTS, msg + " (run `provenance fetch RECIPE` first)")
        else:
            report.add(CheckName.INPUTS, False, msg)
        return None
    root = m["merkle_root"]["digest"]
    report.add(CheckName.INPUTS, root == want_root,
               f"{len(stored)} input(s) re-hashed from {store.root}; manifest root {root}"
               + ("" if root == want_root else f", attested {want_root}"))
    return m["licenses"] if root == want_root else None


def _licensing() -> Licensing:
    from license_expression import get_spdx_licensing

    return get_spdx_licensing()


def _keys(licensing: Licensing, expr: str) -> set[str] | None:
    """The licence identifiers in an SPDX expression (lower case), or None if it does not parse."""
    try:
        return {k.lower() for k in licensing.license_keys(licensing.parse(expr))}
    except Exception:  # license_expression raises several error types for malformed expressions
        return None


def policy_check(report: Checks, st: Statement, policy: Policy, derived: dict[str, int] | None) -> None:
    """Licence rules over SPDX expressions: an expression that names a forbidden licence anywhere
    (`GPL-2.0-only OR MIT`) is reported with the expression. With --inputs, the licences are the
    ones re-derived from the re-hashed inputs, not the statement's annotations."""
    lic = _licensing()
    if derived is not None:
        expressions, source = set(derived), "re-derived from the inputs"
    else:
        expressions, source = set(), "from the statement's annotations"
        for d in st.buildDefinition.resolvedDependencies:
            if (d.name or "").startswith("input:") and isinstance(d.annotations, dict):
                expressions.add(str(d.annotations.get("license", "NOASSERTION")))
                expressions.update(str(x) for x in d.annotations.get("file_licenses", []) or [])
    problems, parsed = [], {}
    for e in sorted(expressions):
        keys = _keys(lic, e)
        if keys is None:
            problems.append(f"input licence {e!r} is not an SPDX expression")
        else:
            parsed[e] = keys
    for f in policy.forbidden_licenses:
        fk = _keys(lic, f) or {f.lower()}
        for e, keys in sorted(parsed.items()):
            if keys & fk:
                problems.append(f"forbidden licence {f} appears in the input licence expression {e!r}")
    present = set().union(*parsed.values()) if parsed else set()
    for r in policy.required_licenses:
        if not (_keys(lic, r) or {r.lower()}) <= present:
            problems.append(f"required licence {r} is absent from the input licences")
    out_lic = st.runDetails.provenance_outputs.output_license
    if policy.allowed_output_licenses is not None:
        allowed = set().union(*[(_keys(lic, a) or {a.lower()}) for a in policy.allowed_output_licenses])
        ok_keys = _keys(lic, out_lic) if isinstance(out_lic, str) else None
        if ok_keys is None or not ok_keys <= allowed:
            problems.append(f"output licence {out_lic!r} is not within {policy.allowed_output_licenses}")
    if policy.require_clean_source:
        src = next((d for d in st.buildDefinition.resolvedDependencies
                    if d.name == "builder-source:provenance"), None)
        if src is None or not isinstance(src.annotations, dict) or src.annotations.get("dirty", True) is not False:
            problems.append("the builder's source tree was dirty or unknown")
    report.add(CheckName.POLICY, not problems,
               "; ".join(problems) or f"input licences {sorted(parsed)} ({source}), output licence {out_lic!r}")
