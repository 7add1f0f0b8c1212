"""Reading an attestation file and checking its signatures: DSSE envelopes and Sigstore bundles.

An attestation file (`.intoto.jsonl`) holds exactly one DSSE envelope; a second line is refused,
because a verifier that checks one line and reports on the file would vouch for lines it never
checked. Every signature is tried against every given key (the DSSE `keyid` is an unauthenticated
hint); a key counts once towards the threshold however many signatures it made.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import NamedTuple

from .._internal import jsonstrict
from .._internal.reading import read_regular_file
from ..attest.model import PAYLOAD_TYPE
from ..errors import InputError
from .report import CheckName, Checks

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .._internal.jsonstrict import JSONObject
    from .keys import PublicKey

MAX_ATTESTATION_BYTES = 64 << 20
ENVELOPE_FIELDS = {"payload", "payloadType", "signatures"}
SIGNATURE_FIELDS = {"keyid", "sig"}


def read_attestation(path: Path) -> tuple[str, list[str]]:
    """("dsse", [non-empty lines]), ("sigstore", [bundle text]) for a certificate-signed Sigstore bundle, or
    ("key-bundle", [bundle text]) for a bundle signed with a bare key (OMS `sign key`) or one that lacks its
    verification material. Raises InputError if unreadable."""
    path = Path(path)
    if path.is_dir():
        inside = [n for n in ("attestation.intoto.jsonl", ".provenance/attestation.intoto.jsonl", "model.sig")
                  if (path / n).is_file()]
        hint = f" (did you mean {path / inside[0]}?)" if inside else ""
        raise InputError(f"{path}: attestation is a directory, not a file{hint}")
    data = read_regular_file(path, "attestation", MAX_ATTESTATION_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: attestation is not UTF-8 text") from None
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            whole = jsonstrict.loads(stripped)
        except ValueError:
            whole = None
        if isinstance(whole, dict) and "payload" not in whole and (
                str(whole.get("mediaType", "")).startswith("application/vnd.dev.sigstore.bundle")
                or set(whole) & {"mediaType", "verificationMaterial", "dsseEnvelope", "messageSignature"}
                or not whole):
            material = whole.get("verificationMaterial")
            if isinstance(material, dict) and "publicKey" in material or not isinstance(material, dict):
                return "key-bundle", [stripped]  # signed with a key (as OMS `sign key`), or not a bundle at all
            return "sigstore", [stripped]
        if isinstance(whole, dict) and not set(whole) & {"payload", "payloadType", "signatures"}:
            raise InputError(f"{path}: not an attestation: a JSON object that is neither a DSSE envelope nor a "
                             f"Sigstore bundle{_what_it_is(whole, path)}")
    return "dsse", [line for line in text.splitlines() if line.strip()]


# The JSON files a build writes beside its attestation, by their `format` field (docs/formats.md).
OUR_FILES = {"provenance-build-v1": "the build record (build.json), which the attestation signs as a byproduct",
             "provenance-memorization-audit-v1": "the memorization audit (audit.json); its signed form is "
                                                 "audit.intoto.jsonl, checked with --audit",
             "provenance-dataset-manifest-v1": "the dataset manifest (dataset-manifest.json)",
             "provenance-fingerprint-v1": "the weights' fingerprint (fingerprint.json)"}


def _what_it_is(obj: JSONObject, path: Path) -> str:
    """'; it is X: pass Y instead' for a file of ours given as the attestation, else ''."""
    form = obj.get("format")
    what = OUR_FILES.get(form) if isinstance(form, str) else None
    if what is None and ("bomFormat" in obj or "@graph" in obj):
        what = "an SBOM, which the attestation signs as a byproduct"
    if what is None:
        return ""
    att = Path(path).parent / "attestation.intoto.jsonl"
    return f"; it is {what}. The attestation is {att}" if att.is_file() else f"; it is {what}"


def b64decode_any(text: object) -> bytes:
    """Standard or URL-safe base64, padded or not (DSSE verifiers must accept both). Raises ValueError."""
    if not isinstance(text, str):
        raise ValueError("expected a base64 string")
    s = text.strip()
    if "-" in s or "_" in s:
        if "+" in s or "/" in s:
            raise ValueError("mixes the standard and URL-safe base64 alphabets")
        s = s.replace("-", "+").replace("_", "/")
    s += "=" * (-len(s) % 4)
    try:
        return base64.b64decode(s, validate=True)
    except binascii.Error as e:
        raise ValueError(f"not base64: {e}") from None


class Envelope(NamedTuple):
    payload: bytes
    payload_type: str
    signatures: tuple[tuple[str | None, bytes], ...]  # (keyid hint, raw signature)

    def pae(self) -> bytes:
        """DSSE's pre-authentication encoding: "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body."""
        t = self.payload_type.encode()
        return b"DSSEv1 %d %b %d %b" % (len(t), t, len(self.payload), self.payload)


def parse_envelope(obj: object) -> Envelope:
    """A DSSE envelope from its JSON object, exactly: no unknown fields. Raises ValueError."""
    if not isinstance(obj, dict):
        raise ValueError("the envelope is not a JSON object")
    missing = ENVELOPE_FIELDS - set(obj)
    if missing:
        raise ValueError(f"the envelope has no {', '.join(sorted(missing))}")
    extra = set(obj) - ENVELOPE_FIELDS
    if extra:
        raise ValueError(f"unsigned field(s) {sorted(extra)} beside the envelope (DSSE defines only payload, "
                         "payloadType, signatures)")
    if not isinstance(obj["payloadType"], str):
        raise ValueError("payloadType is not a string")
    payload = b64decode_any(obj["payload"])
    sigs = obj["signatures"]
    if not isinstance(sigs, list) or not sigs:
        raise ValueError("signatures must be a non-empty array")
    out = []
    for i, s in enumerate(sigs):
        if not isinstance(s, dict) or "sig" not in s:
            raise ValueError(f"signatures[{i}] is not an object with 'sig'")
        if set(s) - SIGNATURE_FIELDS:
            raise ValueError(f"signatures[{i}] has unknown field(s) {sorted(set(s) - SIGNATURE_FIELDS)}")
        keyid = s.get("keyid")
        if keyid is not None and not isinstance(keyid, str):
            raise ValueError(f"signatures[{i}].keyid is not a string")
        try:
            raw = b64decode_any(s["sig"])
        except ValueError as e:
            raise ValueError(f"signatures[{i}].sig: {e}") from None
        out.append((keyid or None, raw))
    return Envelope(payload, obj["payloadType"], tuple(out))


def distinct_keys(keys: list[PublicKey]) -> list[PublicKey]:
    """The given public keys with repeats removed (a key counts once towards a threshold)."""
    seen: set[str] = set()
    out: list[PublicKey] = []
    for k in keys:
        if k.keyid not in seen:
            seen.add(k.keyid)
            out.append(k)
    return out


def verified_keys(env: Envelope, keys: list[PublicKey]) -> list[PublicKey]:
    """The distinct keys that made at least one valid signature over the envelope's PAE."""
    pae = env.pae()
    return [key for key in keys if any(key.verifies(raw, pae) for _, raw in env.signatures)]


def verify_dsse(report: Checks, lines: list[str], keys: list[PublicKey], threshold: int) -> object | None:
    """Check the one envelope and its signatures; return the parsed payload, or None after a failed check."""
    if not lines:
        report.add(CheckName.ENVELOPE, False, "the attestation file holds no envelope")
        return None
    if len(lines) > 1:
        report.add(CheckName.ENVELOPE, False,
                   f"the attestation file holds {len(lines)} lines; an attestation file holds "
                   "exactly one DSSE envelope (docs/build-type.md), so the others would go unchecked")
        return None
    try:
        env = parse_envelope(jsonstrict.loads(lines[0]))
    except ValueError as e:
        report.add(CheckName.ENVELOPE, False, f"not a DSSE envelope: {e}")
        return None
    return _signed_payload(report, env, keys, threshold)


BUNDLE_FIELDS = frozenset({"mediaType", "verificationMaterial", "dsseEnvelope"})
KEY_BUNDLE_MEDIA_TYPES = ("application/vnd.dev.sigstore.bundle.v0.3+json",
                          "application/vnd.dev.sigstore.bundle+json;version=0.3")


def verify_key_bundle(report: Checks, text: str, keys: list[PublicKey], threshold: int) -> object | None:
    """A Sigstore bundle v0.3 signed with a bare key (OMS `sign key`): the bundle's shape exactly, then
    its DSSE envelope against every given key. The key hint is only a hint, like a DSSE keyid."""
    try:
        obj = jsonstrict.loads(text)
    except ValueError as e:
        report.add(CheckName.BUNDLE, False, f"not strict JSON: {e}")
        return None
    problems = []
    if not isinstance(obj, dict) or not obj:
        problems.append("the bundle is empty")
    else:
        if obj.get("mediaType") not in KEY_BUNDLE_MEDIA_TYPES:
            problems.append(f"mediaType {obj.get('mediaType')!r}, expected {KEY_BUNDLE_MEDIA_TYPES[0]!r}")
        vm = obj.get("verificationMaterial")
        if not isinstance(vm, dict):
            problems.append("no verificationMaterial")
        else:
            pk = vm.get("publicKey")
            if not isinstance(pk, dict) or not isinstance(pk.get("hint", ""), str) or set(pk) - {"hint"}:
                problems.append("verificationMaterial.publicKey must be an object with a string hint")
            if not isinstance(vm.get("tlogEntries"), list):
                problems.append("verificationMaterial.tlogEntries is missing (an empty list for a key signature)")
            if set(vm) - {"publicKey", "tlogEntries", "timestampVerificationData"}:
                problems.append(f"verificationMaterial has unknown field(s) "
                                f"{sorted(set(vm) - {'publicKey', 'tlogEntries', 'timestampVerificationData'})}")
        if "dsseEnvelope" not in obj:
            problems.append("no dsseEnvelope (a message signature cannot carry a statement)")
        if set(obj) - BUNDLE_FIELDS:
            problems.append(f"unknown field(s) {sorted(set(obj) - BUNDLE_FIELDS)}")
    if problems:
        report.add(CheckName.BUNDLE, False, "not a key-signed Sigstore bundle v0.3: " + "; ".join(problems))
        return None
    report.add(CheckName.BUNDLE, True, f"Sigstore bundle {obj['mediaType']} signed with a key (hint "
               f"{obj['verificationMaterial']['publicKey'].get('hint', '')[:16] or 'none'})")
    try:
        env = parse_envelope(obj["dsseEnvelope"])
    except ValueError as e:
        report.add(CheckName.ENVELOPE, False, f"not a DSSE envelope: {e}")
        return None
    return _signed_payload(report, env, keys, threshold)


def _signed_payload(report: Checks, env: Envelope, keys: list[PublicKey], threshold: int) -> object | None:
    report.add(CheckName.ENVELOPE, True, f"one DSSE envelope with {len(env.signatures)} signature(s)")
    if not report.add(CheckName.PAYLOAD_TYPE, env.payload_type == PAYLOAD_TYPE,
                      f"payloadType {env.payload_type!r}"
                      + ("" if env.payload_type == PAYLOAD_TYPE else f", expected exactly {PAYLOAD_TYPE!r}")):
        return None
    good = verified_keys(env, keys)
    names = ", ".join(f"{k.keytype} {k.keyid[:16]}" for k in good) or "none"
    if not report.add(CheckName.SIGNATURE, len(good) >= threshold,
                      f"{len(good)} of {len(keys)} distinct key(s) made a valid signature (threshold {threshold}): "
                      f"{names}; {len(env.signatures)} signature(s) in the envelope"):
        return None
    try:
        payload: object = jsonstrict.loads(env.payload)
        return payload
    except ValueError as e:
        report.add(CheckName.STATEMENT, False, f"the signed payload is not strict JSON: {e}")
        return None


def sigstore_bundle_shape(report: Checks, text: str) -> bool:
    """A certificate-signed bundle must carry its transparency-log entries and a DSSE envelope; checked
    before anything asks for an identity, so a malformed bundle fails as such (check `bundle`)."""
    obj = jsonstrict.loads(text)
    vm = obj.get("verificationMaterial") if isinstance(obj, dict) else None
    problems = []
    if not isinstance(vm, dict):
        problems.append("no verificationMaterial")
    elif not isinstance(vm.get("tlogEntries"), list) or not vm["tlogEntries"]:
        problems.append("verificationMaterial.tlogEntries is missing or empty (a certificate signature is logged)")
    if not isinstance(obj, dict) or not isinstance(obj.get("dsseEnvelope"), dict):
        problems.append("no dsseEnvelope")
    if problems:
        report.add(CheckName.BUNDLE, False, "not a Sigstore bundle with a DSSE envelope: " + "; ".join(problems))
        return False
    return True


def verify_bundle(report: Checks, text: str, *, identity: str | None, issuer: str | None,
                  trust_config_path: Path | None, trusted_root_path: Path | None, staging: bool) -> object | None:
    """Check a Sigstore bundle against an identity; return the parsed payload, or None after a failed check."""
    from sigstore.errors import VerificationError
    from sigstore.models import Bundle
    from sigstore.verify import Verifier
    from sigstore.verify.policy import Identity

    if not identity or not issuer:
        raise InputError("a Sigstore bundle is verified against an identity: pass --identity and --issuer")
    try:
        bundle = Bundle.from_json(text)
    except Exception as e:  # sigstore raises several types for malformed bundles
        report.add(CheckName.ENVELOPE, False, f"not a Sigstore bundle: {e}")
        return None
    report.add(CheckName.ENVELOPE, True, "Sigstore bundle with a DSSE envelope")
    if trust_config_path is not None:
        from ..attest.sign import trust_config

        verifier = Verifier(trusted_root=trust_config(trust_config_path).trusted_root)
    elif trusted_root_path is not None:
        from sigstore.models import TrustedRoot

        try:
            verifier = Verifier(trusted_root=TrustedRoot.from_file(str(trusted_root_path)))
        except Exception as e:
            raise InputError(f"{trusted_root_path}: not a Sigstore trusted root ({e})") from None
    else:
        verifier = Verifier.staging(offline=True) if staging else Verifier.production(offline=True)
    try:
        payload_type, payload = verifier.verify_dsse(bundle, Identity(identity=identity, issuer=issuer))
    except VerificationError as e:
        report.add(CheckName.SIGNATURE, False,
                   f"Sigstore verification failed for identity {identity!r} / issuer {issuer!r}: "
                                       f"{e}")
        return None
    if not report.add(CheckName.PAYLOAD_TYPE, payload_type == PAYLOAD_TYPE, f"payloadType {payload_type!r}"):
        return None
    report.add(CheckName.SIGNATURE, True,
               f"Sigstore certificate for {identity!r} from {issuer!r}, in the transparency log")
    try:
        parsed: object = jsonstrict.loads(payload)
        return parsed
    except ValueError as e:
        report.add(CheckName.STATEMENT, False, f"the signed payload is not strict JSON: {e}")
        return None
