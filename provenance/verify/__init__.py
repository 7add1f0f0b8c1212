"""The verifier: does an attestation vouch for exactly these files?

Stands apart from the builder: it imports nothing from `provenance.builder` or `provenance.repro`,
and neither torch nor transformers (a test holds it to that). It answers one question, **verified**:
the signature holds, the statement is well formed and from an allowed builder, its embedded
recipe matches its digest, and, with --model, the directory holds exactly the signed files, byte
for byte. Whether other weights are a *rebuild* of the attested model is a different question,
answered by `provenance.repro` (`verify-attestation --reproduced`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .report import Check, Report, render  # noqa: F401


def load_keys(paths: list[Path], threshold: int) -> list:
    """Distinct public keys; the threshold must be reachable. Raises InputError (exit 2)."""
    from .envelope import distinct_keys
    from .keys import load_public_key

    if not paths:
        raise InputError("a DSSE attestation is verified with public keys: pass --key PUBLIC_KEY")
    keys = distinct_keys([load_public_key(p) for p in paths])
    if threshold < 1:
        raise InputError(f"--threshold must be at least 1, got {threshold}")
    if threshold > len(keys):
        raise InputError(f"--threshold {threshold} needs {threshold} distinct keys; {len(paths)} --key option(s) "
                         f"name {len(keys)} distinct key(s)")
    return keys


def verify(attestation: Path, *, keys: list[Path], threshold: int = 1, model: Path | None = None,
           recipe: Path | None = None, inputs: bool = False, store: Path | None = None,
           policy_path: Path | None = None, sha256: bool = False, identity: str | None = None,
           issuer: str | None = None, trust_config: Path | None = None, trusted_root: Path | None = None,
           staging: bool = False, check_model: bool = True, prefetch=None, audit: Path | None = None,
           published: bool = False) -> Report:
    """Run every applicable check. Raises InputError when a check cannot be made (exit 2).

    With `check_model=False` the model dir is left to the caller (the reproduced question).
    `prefetch` (model_dir.Prefetch) lets hashing start before the signature is checked.
    The signed memorization audit (`audit`, or audit.intoto.jsonl beside the attestation) is
    checked when present, and required by a policy with `[audit] require = true`. `published`: the
    model dir is a published folder whose `.provenance/` receipts are not part of it."""
    from ..attest.audit import AUDIT_PREDICATE_TYPE
    from ..attest.model import VSA_TYPE
    from ..attest.oms import OMS_PREDICATE_TYPE
    from .checks import inputs_check, policy_check, recipe_file_check, statement_checks
    from .envelope import read_attestation, sigstore_bundle_shape, verify_bundle, verify_dsse, verify_key_bundle
    from .policy import load_policy

    pf = load_policy(policy_path)
    kind, items = read_attestation(attestation)
    report = Report()
    report.model_checked = model is not None
    loaded = load_keys(keys, threshold) if kind in ("dsse", "key-bundle") else []
    if kind == "dsse":
        payload = verify_dsse(report, items, loaded, threshold)
    elif kind == "key-bundle":
        payload = verify_key_bundle(report, items[0], loaded, threshold)
    elif sigstore_bundle_shape(report, items[0]):
        payload = verify_bundle(report, items[0], identity=identity, issuer=issuer, trust_config_path=trust_config,
                                trusted_root_path=trusted_root, staging=staging)
    else:
        payload = None
    if not report.ok:
        return report
    if isinstance(payload, dict) and payload.get("predicateType") == AUDIT_PREDICATE_TYPE:
        raise InputError(f"{attestation}: this is the signed memorization audit (audit.intoto.jsonl), not the "
                         "build's attestation: pass attestation.intoto.jsonl, with this file as --audit (it is "
                         "read from beside the attestation by default)")
    if isinstance(payload, dict) and payload.get("predicateType") in (VSA_TYPE, OMS_PREDICATE_TYPE):
        what = "a VSA summarises another verification" if payload["predicateType"] == VSA_TYPE else \
            "an OMS signature names files only"
        _refuse_for_files_only(what, recipe=recipe, inputs=inputs, audit=audit, policy_path=policy_path,
                               reproduced=model is not None and not check_model)
        report.statement = payload
        mdir = Path(model) if model is not None else None
        if payload["predicateType"] == VSA_TYPE:
            from .vsa import vsa_checks

            vsa_checks(report, payload, mdir, prefetch=prefetch, published=published)
        else:
            from .oms import oms_checks

            oms_checks(report, payload, mdir, Path(attestation), prefetch=prefetch, published=published)
        return report
    st = statement_checks(report, payload, pf.policy)
    if st is None:
        return report
    report.statement = payload
    report.parsed = st
    if model is not None and check_model:
        from .model_dir import inspect, report_exact

        report_exact(report, inspect(st, Path(model), sha256=sha256, prefetch=prefetch, published=published),
                     sha256=sha256)
    if recipe is not None:
        recipe_file_check(report, st, Path(recipe))
    if kind == "dsse":
        from .audit import audit_checks

        audit_checks(report, attestation, audit, loaded, threshold, payload, pf.audit,
                     pf.policy.licence_compatibility if policy_path is not None else "ignore")
    derived = inputs_check(report, st, store) if inputs else None
    if policy_path is not None:
        policy_check(report, st, pf.policy, derived)
    return report


def _refuse_for_files_only(what: str, *, recipe, inputs: bool, audit, policy_path, reproduced: bool) -> None:
    """An OMS signature or a VSA says which files, not how they were built: the options that judge a
    build cannot be applied to it, and are refused (exit 2) rather than silently passed over."""
    asked = [flag for flag, given in (("--recipe", recipe is not None), ("--inputs", inputs),
                                      ("--audit", audit is not None), ("--policy", policy_path is not None),
                                      ("--reproduced", reproduced)) if given]
    if asked:
        raise InputError(f"{what}: {', '.join(asked)} cannot be applied to it (no builder, recipe, inputs, licences, "
                         "audit or fingerprint to judge); pass the SLSA attestation (attestation.intoto.jsonl) for "
                         "that")
