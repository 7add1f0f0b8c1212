"""Signing a build's outputs: the provenance attestation (and its Sigstore bundle), the audit's own
attestation and the OMS signature of the model directory, each written atomically into the build's
staging directory. The keys and envelopes are attest/sign.py's; the statements attest/statement.py's,
attest/audit.py's and attest/oms.py's."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .._internal.atomic import atomic_write_bytes
from .._internal.hashing import hash_bytes
from ..errors import InputError
from ..recipe import LoadedRecipe

TYPE_CHECKING = False
if TYPE_CHECKING:
    from securesystemslib.signer import Signer  # type: ignore[attr-defined]  # documented; no __all__
    from sigstore.models import ClientTrustConfig
    from sigstore.oidc import IdentityToken

    from .._internal.jsonstrict import JSONObject
    from .._internal.progress import Reporter
    from .source import SourceClaims


@dataclass
class Signing:
    """How the attestation is signed: local securesystemslib signers, and optionally Sigstore."""

    signers: list[Signer]
    sigstore_token: IdentityToken | None = None
    sigstore_config: ClientTrustConfig | None = None


@dataclass(frozen=True)
class KeylessRequest:
    """Sign keyless with Sigstore too: the OIDC token (else $SIGSTORE_ID_TOKEN or an ambient CI credential)
    and the instance (a client trust config, or the public staging instance; default: the public one)."""

    identity_token: str | None = None
    trust_config: Path | None = None
    staging: bool = False


def prepare_signing(keys: list[Path], reporter: Reporter, keyless: KeylessRequest | None = None) -> Signing:
    """Load the private `keys` (none: the default key, created on first use) and prove that each can
    sign, before any long work starts; then the Sigstore identity when `keyless` asks for it. Raises
    InputError naming the key."""
    from .sign import default_key_path, identity_token, key_is_private_enough, keygen, load_signer, trust_config

    if not keys:
        keys = [default_key_path()]
        if not keys[0].exists():
            priv, pub = keygen(keys[0].parent, name=keys[0].stem)
            reporter.log(f"created a signing key pair: {priv} (private, 0600) and {pub}")
    signing = Signing(signers=[load_signer(k) for k in keys])  # a public key given here fails first
    for k in keys:
        if k.exists() and not key_is_private_enough(k):
            reporter.log(f"warning: private key {k} is readable by group or others")
    for k, signer in zip(keys, signing.signers):
        try:  # preflight: a key that loads but cannot sign fails now, not after training
            signer.sign(b"provenance preflight")
        except Exception as e:  # noqa: BLE001 - any signer failure is the key's
            raise InputError(f"{k}: the key loads but cannot sign ({e})") from None
    if keyless is not None:
        signing.sigstore_config = trust_config(keyless.trust_config, staging=keyless.staging)
        signing.sigstore_token = identity_token(keyless.identity_token)
    return signing


def write_oms(staging: Path, files: dict[str, dict[str, str]], signing: Signing | None,
              reporter: Reporter) -> JSONObject | None:
    """Write OUT/model.sig, an OMS v1.0 signature of the model directory (attest/oms.py): through
    Sigstore for a keyless (--sigstore) build, else with the build's first ECDSA key. None when the build is unsigned;
    a record saying why when no key can make one (ed25519: OMS accepts ECDSA keys only)."""
    if signing is None:
        return None
    from ..attest.oms import OMS_FILE, is_oms_key, key_bundle, oms_statement
    from ..attest.statement import canonical

    payload = canonical(oms_statement("model", files))
    ec_signers = [s for s in signing.signers if is_oms_key(s)]
    if signing.sigstore_token is not None:  # keyless: what `model_signing verify sigstore` checks
        from ..attest.sign import sign_sigstore

        data = sign_sigstore(payload, signing.sigstore_token, signing.sigstore_config).encode()
        how = "Sigstore, keyless"
    elif ec_signers:
        data = (json.dumps(key_bundle(payload, ec_signers[0]), indent=1) + "\n").encode()
        how = f"key {ec_signers[0].public_key.keyid[:16]}"
    else:
        why = "no OMS signature: OMS accepts ECDSA keys only and this build signs with ed25519 (keygen --type ecdsa)"
        reporter.log(why)
        return {"skipped": why}
    atomic_write_bytes(staging / OMS_FILE, data)
    reporter.log(f"OMS signature: {OMS_FILE} ({how})")
    return {"file": OMS_FILE, "format": "OMS v1.0 Sigstore bundle", **hash_bytes(data)}


def attest_and_sign(staging: Path, recipe: LoadedRecipe, record: JSONObject, manifest_doc: JSONObject,
                    byproducts: dict[str, dict[str, str]], signing: Signing,
                    fingerprint: JSONObject | None = None) -> JSONObject:
    """Write attestation.intoto.jsonl (and attestation.sigstore.json) into `staging`."""
    from ..attest.model import PAYLOAD_TYPE
    from ..attest.sign import envelope_line, sign_envelope, sign_sigstore
    from ..attest.statement import canonical, statement

    sizes = {name: (staging / "model" / name).stat().st_size for name in record["weights"]["files"]}
    st = statement(recipe=recipe, record=record, manifest=manifest_doc, model_files=record["weights"]["files"],
                   byproducts=byproducts, invocation_id=record["invocation_id"], fingerprint=fingerprint,
                   model_sizes=sizes)
    payload = canonical(st)
    atomic_write_bytes(staging / "attestation.intoto.jsonl",
                       envelope_line(sign_envelope(payload, PAYLOAD_TYPE, signing.signers)))
    if signing.sigstore_token is not None:
        bundle = sign_sigstore(payload, signing.sigstore_token, signing.sigstore_config)
        atomic_write_bytes(staging / "attestation.sigstore.json", bundle.encode() + b"\n")
    return st


def sign_audit(staging: Path, provenance_st: JSONObject, audit_doc: JSONObject, manifest_digest: dict[str, str],
               audit_digest: dict[str, str], signing: Signing) -> None:
    """Write audit.intoto.jsonl: the audit as its own Statement, signed with the build's keys."""
    from ..attest.audit import AUDIT_FILE, audit_statement

    st = audit_statement(provenance_st, audit_doc, manifest_digest=manifest_digest, audit_json_digest=audit_digest)
    write_signed(staging / AUDIT_FILE, st, signing.signers)


def sign_source(dest: Path, claims: SourceClaims, archive_name: str, archive_digest: dict[str, str],
                model_files: dict[str, dict[str, str]], signers: list[Signer]) -> None:
    """Write the corresponding-source statement (attest/source.py), signed, at `dest`."""
    from ..attest.source import source_statement

    write_signed(dest, source_statement(claims, archive_name, archive_digest, model_files), signers)


def write_signed(dest: Path, statement: JSONObject, signers: list[Signer]) -> None:
    """Write `statement` (RFC 8785 canonical JSON) at `dest` as one DSSE envelope signed by `signers`."""
    from ..attest.model import PAYLOAD_TYPE
    from ..attest.sign import envelope_line, sign_envelope
    from ..attest.statement import canonical

    atomic_write_bytes(dest, envelope_line(sign_envelope(canonical(statement), PAYLOAD_TYPE, signers)))
