"""The verifier: does an attestation vouch for exactly these files?

Stands apart from the builder: it imports nothing from `provenance.builder` or `provenance.repro`,
and neither torch nor transformers (a test holds it to that). It answers one question, **verified**:
the signature holds, the statement is well formed and from an allowed builder, its embedded
recipe matches its digest, and, with --model, the directory holds exactly the signed files, byte
for byte. Whether other weights are a *rebuild* of the attested model is a different question,
answered by `provenance.repro` (`verify-attestation --reproduced`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeGuard

from ..errors import InputError
from .policy import PolicyFile
from .report import Check, CheckName, Checks, Result, render  # noqa: F401

if TYPE_CHECKING:
    from .keys import PublicKey


def load_keys(paths: Sequence[Path], threshold: int) -> list[PublicKey]:
    """Distinct public keys; the threshold must be reachable. Raises InputError (exit 2)."""
    from .envelope import distinct_keys
    from .keys import load_public_key

    if threshold < 1:
        raise InputError(f"--threshold must be at least 1, got {threshold}")
    keys = distinct_keys([load_public_key(p) for p in paths])
    if threshold > len(keys) and paths:
        raise InputError(f"--threshold {threshold} needs {threshold} distinct keys; {len(paths)} --key option(s) "
                         f"name {len(keys)} distinct key(s)")
    return keys


class SigstoreTrust(NamedTuple):
    """Whom a Sigstore bundle must come from, and which trust root says so (docs/receipts.md)."""

    identity: str | None = None
    issuer: str | None = None
    trust_config: Path | None = None
    trusted_root: Path | None = None
    staging: bool = False


class Verifier(NamedTuple):
    """A verifier configured once (keys, threshold, policy, Sigstore identity, store) and then asked
    about any number of attestations: `Verifier.configure(keys=[...]).verify(attestation, model=DIR)`.
    Configuring reads and checks every key and the policy file, so a bad option fails (exit 2)
    before any file is hashed."""

    keys: tuple[PublicKey, ...] = ()
    threshold: int = 1
    policy: PolicyFile = PolicyFile()
    policy_given: bool = False  # a policy file was named: its rules are checked, not only its allowed builders
    sigstore: SigstoreTrust = SigstoreTrust()
    sha256: bool = False  # also check the subjects' sha256 (blake3 always)
    store: Path | None = None  # where --inputs finds the pinned inputs

    @classmethod
    def configure(cls, *, keys: Sequence[Path] = (), threshold: int = 1, policy: Path | None = None,
                  sigstore: SigstoreTrust = SigstoreTrust(), sha256: bool = False,
                  store: Path | None = None) -> Verifier:
        from .policy import load_policy

        policy_file = load_policy(policy)  # the policy first: its errors name the file that is wrong
        return cls(tuple(load_keys(keys, threshold)), threshold, policy_file, policy is not None, sigstore, sha256,
                   store)

    def verify(self, attestation: Path, *, model: Path | None = None, recipe: Path | None = None,
               inputs: bool = False, audit: Path | None = None, published: bool = False, prefetch: Any = None,
               needs_build: tuple[str, ...] = (), source: Path | None = None) -> Result:
        """Run every applicable check. Raises InputError when a check cannot be made (exit 2).

        `model`: the directory must hold exactly the signed files. `prefetch` (model_dir.Prefetch)
        lets hashing start before the signature is checked. The signed memorization audit (`audit`,
        or audit.intoto.jsonl beside the attestation) is checked when present, and required by a
        policy with `[audit] require = true`. `published`: the model dir is a published folder
        whose `.provenance/` receipts are not part of it. `needs_build`: the caller's own options
        that judge a build (repro/'s "--reproduced"), refused by name with the options here when
        the attestation is a files-only signature (OMS or VSA). `source`: a corresponding-source
        archive, held to the build's provenance or to a signed corresponding-source statement."""
        from .envelope import read_attestation

        kind, items = read_attestation(attestation)
        checks = Checks()
        payload = self._signed_payload(checks, kind, items)
        if not checks.ok:
            return checks.result(model_checked=model is not None)
        mdir = Path(model) if model is not None else None
        asked = _build_options(recipe=recipe, inputs=inputs, audit=audit, policy=self.policy_given) + needs_build
        if _is_source_statement(payload):
            return _source_statement(checks, payload, mdir, attestation, source, asked, prefetch, published)
        if _files_only(payload):
            asked += ("--source",) if source is not None else ()
            return _files_only_checks(checks, payload, mdir, Path(attestation), asked, prefetch, published)
        _refuse_audit_as_attestation(attestation, payload)
        return self._statement(checks, kind, attestation, payload, mdir, recipe, inputs, audit, published, prefetch,
                               source)

    def _signed_payload(self, checks: Checks, kind: str, items: list[str]) -> object | None:
        """The envelope, signature and payload-type checks of each kind of attestation file."""
        from .envelope import sigstore_bundle_shape, verify_bundle, verify_dsse, verify_key_bundle

        if kind in ("dsse", "key-bundle") and not self.keys:
            raise InputError("a DSSE attestation is verified with public keys: pass --key PUBLIC_KEY")
        if kind == "dsse":
            return verify_dsse(checks, items, list(self.keys), self.threshold)
        if kind == "key-bundle":
            return verify_key_bundle(checks, items[0], list(self.keys), self.threshold)
        if sigstore_bundle_shape(checks, items[0]):
            s = self.sigstore
            return verify_bundle(checks, items[0], identity=s.identity, issuer=s.issuer,
                                 trust_config_path=s.trust_config, trusted_root_path=s.trusted_root,
                                 staging=s.staging)
        return None

    def _statement(self, checks: Checks, kind: str, attestation: Path, payload: Any, mdir: Path | None,
                   recipe: Path | None, inputs: bool, audit: Path | None, published: bool, prefetch: Any,
                   source: Path | None = None) -> Result:
        """An SLSA provenance statement's checks: its fields, the files, the recipe, the audit, the
        inputs, the policy and a corresponding-source archive."""
        from .audit import audit_checks
        from .checks import inputs_check, policy_check, recipe_file_check, statement_checks

        pf = self.policy
        st = statement_checks(checks, payload, pf.policy)
        if st is None:
            return checks.result(model_checked=mdir is not None)
        if mdir is not None:
            from .model_dir import inspect, report_exact

            report_exact(checks, inspect(st, mdir, sha256=self.sha256, prefetch=prefetch, published=published),
                         sha256=self.sha256)
        if recipe is not None:
            recipe_file_check(checks, st, Path(recipe))
        if kind == "dsse":
            audit_checks(checks, attestation, audit, list(self.keys), self.threshold, payload, pf.audit,
                         pf.policy.licence_compatibility if self.policy_given else "ignore")
        derived = inputs_check(checks, st, self.store) if inputs else None
        if self.policy_given:
            policy_check(checks, st, pf.policy, derived)
        if source is not None:
            from .source import claims_from_provenance, read_archive, source_checks

            source_checks(checks, read_archive(Path(source)), claims_from_provenance(st))
        return checks.result(model_checked=mdir is not None, payload=payload, parsed=st)


def _files_only(payload: object) -> TypeGuard[dict[str, Any]]:
    from ..attest.model import VSA_TYPE
    from ..attest.oms import OMS_PREDICATE_TYPE

    return isinstance(payload, dict) and payload.get("predicateType") in (VSA_TYPE, OMS_PREDICATE_TYPE)


def _is_source_statement(payload: object) -> TypeGuard[dict[str, Any]]:
    from ..attest.source import SOURCE_PREDICATE_TYPE

    return isinstance(payload, dict) and payload.get("predicateType") == SOURCE_PREDICATE_TYPE


def _source_statement(checks: Checks, payload: dict[str, Any], mdir: Path | None, attestation: Path,
                      source: Path | None, asked: tuple[str, ...], prefetch: Any, published: bool) -> Result:
    """A signed corresponding-source statement: the archive it names, and with --model the model files."""
    from .source import read_archive, source_checks, source_statement_checks

    if source is None:
        raise InputError(f"{attestation}: this is a corresponding-source statement; pass the archive it signs "
                         "with --source ARCHIVE")
    if asked:
        raise InputError(f"{attestation}: a corresponding-source statement names an archive and model files: "
                         f"{', '.join(asked)} cannot be applied to it; pass the build's attestation for that")
    got = source_statement_checks(checks, payload, Path(source))
    if got is not None:
        claims, model = got
        source_checks(checks, read_archive(Path(source)), claims)
        if mdir is not None:
            from .model_dir import inspect_digests, report_exact

            report_exact(checks, inspect_digests(model, mdir, prefetch=prefetch, published=published), sha256=True,
                         algos="sha256")
    return checks.result(model_checked=mdir is not None, payload=payload)


def _refuse_audit_as_attestation(attestation: Path, payload: object) -> None:
    from ..attest.audit import AUDIT_PREDICATE_TYPE

    if isinstance(payload, dict) and payload.get("predicateType") == AUDIT_PREDICATE_TYPE:
        raise InputError(f"{attestation}: this is the signed memorization audit (audit.intoto.jsonl), not the "
                         "build's attestation: pass attestation.intoto.jsonl, with this file as --audit (it is "
                         "read from beside the attestation by default)")


def _build_options(*, recipe: Path | None, inputs: bool, audit: Path | None, policy: bool) -> tuple[str, ...]:
    return tuple(flag for flag, given in (("--recipe", recipe is not None), ("--inputs", inputs),
                                          ("--audit", audit is not None), ("--policy", policy)) if given)


def _files_only_checks(checks: Checks, payload: dict[str, Any], mdir: Path | None, attestation: Path,
                       asked: tuple[str, ...], prefetch: Any, published: bool) -> Result:
    """A VSA or an OMS signature: the files it names (the options that judge a build refused)."""
    from ..attest.model import VSA_TYPE

    is_vsa = payload["predicateType"] == VSA_TYPE
    _refuse_for_files_only("a VSA summarises another verification" if is_vsa else "an OMS signature names files only",
                           asked)
    if is_vsa:
        from .vsa import vsa_checks

        vsa_checks(checks, payload, mdir, prefetch=prefetch, published=published)
    else:
        from .oms import oms_checks

        oms_checks(checks, payload, mdir, attestation, prefetch=prefetch, published=published)
    return checks.result(model_checked=mdir is not None, payload=payload)


def _refuse_for_files_only(what: str, asked: tuple[str, ...]) -> None:
    """An OMS signature or a VSA says which files, not how they were built: the options that judge a
    build cannot be applied to it, and are refused (exit 2) rather than silently passed over."""
    if asked:
        raise InputError(f"{what}: {', '.join(asked)} cannot be applied to it (no builder, recipe, inputs, licences, "
                         "audit or fingerprint to judge); pass the SLSA attestation (attestation.intoto.jsonl) for "
                         "that")
