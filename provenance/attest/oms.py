"""OpenSSF Model Signing (OMS) v1.0: the signature a build writes beside its model, and its exact shape.

What `model_signing` and the OMS specification define (docs/formats.md, "OMS signature"):
an in-toto Statement v1 with predicate type `https://model_signing/signature/v1.0`, one subject
named after the model folder whose sha256 is taken over the raw bytes of every resource digest in
name order, and a predicate holding `serialization` (method `files`, `hash_type`, `allow_symlinks`,
`ignore_paths`) and `resources` (`{name, algorithm, digest}`, sorted by name). It is wrapped in
a DSSE envelope inside a Sigstore bundle v0.3; a key-signed bundle names its key only by a hint,
the sha256 of the public key's PEM, and has no transparency-log entries. OMS accepts ECDSA keys
(P-256, P-384, P-521) only: an ed25519 key gives the SLSA attestation, never an OMS signature.

The reader's side (structure, predicate, root digest) is `parse_oms`, shared by the writer, which
checks what it signs with it, and the verifier.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from .._internal.hashing import sha256_hex
from .model import HEX64, STATEMENT_TYPE, subject_name_problem

if TYPE_CHECKING:
    from securesystemslib.signer import Signer  # type: ignore[attr-defined]  # documented; no __all__

    from .._internal.jsonstrict import JSONObject

OMS_PREDICATE_TYPE = "https://model_signing/signature/v1.0"
BUNDLE_MEDIA_TYPES = ("application/vnd.dev.sigstore.bundle.v0.3+json",
                      "application/vnd.dev.sigstore.bundle+json;version=0.3")
OMS_FILE = "model.sig"  # model_signing's default name
# The paths model_signing ignores by default when it signs, the receipts folder of a published
# model (docs/receipts.md), and huggingface_hub's bookkeeping in a `--local-dir` download, so that
# `model_signing verify` passes over them in a published folder that went to the hub and back.
# This project's verifier excuses none of them but the receipts and hub files it knows, in exact
# shapes and only with --published (verify/model_dir.py).
DEFAULT_IGNORE = [".git", ".gitattributes", ".github", ".gitignore", ".provenance", ".cache/huggingface"]


class OmsManifest(NamedTuple):
    model_name: str
    hash_type: str
    method: str
    allow_symlinks: bool
    ignore_paths: tuple[str, ...]
    resources: dict[str, str]  # name -> hex digest


def root_digest(resources: dict[str, str]) -> str:
    """sha256 over the raw bytes of every resource digest, in name order (the OMS subject's digest)."""
    return sha256_hex(*(bytes.fromhex(resources[name]) for name in sorted(resources)))


def oms_statement(model_name: str, files: dict[str, dict[str, str]], *, signature_name: str = OMS_FILE) -> JSONObject:
    """The OMS Statement over a model directory's files (`files`: name -> {"sha256": ...})."""
    resources = {name: d["sha256"] for name, d in files.items()}
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model_name, "digest": {"sha256": root_digest(resources)}}],
        "predicateType": OMS_PREDICATE_TYPE,
        "predicate": {
            "serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": False,
                              "ignore_paths": [*DEFAULT_IGNORE, signature_name]},
            "resources": [{"name": n, "algorithm": "sha256", "digest": resources[n]} for n in sorted(resources)],
        },
    }


def key_hint(public_pem: bytes) -> str:
    """model_signing's key hint: the sha256 of the public key's PEM (SubjectPublicKeyInfo)."""
    return sha256_hex(public_pem)


# The securesystemslib key schemes of the keys OMS accepts (ECDSA on a NIST curve).
OMS_SCHEMES = ("ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521")


def is_oms_key(signer: Signer) -> bool:
    """Whether a securesystemslib signer holds a key OMS accepts, read from its public key."""
    return signer.public_key.keytype == "ecdsa" and signer.public_key.scheme in OMS_SCHEMES


def key_bundle(statement_bytes: bytes, signer: Signer) -> JSONObject:
    """A Sigstore bundle v0.3 holding one DSSE signature by `signer` (an ECDSA key), as model_signing
    writes it for `sign key`: the public key named by its hint, no transparency-log entries."""
    from .model import PAYLOAD_TYPE
    from .sign import sign_envelope

    env = sign_envelope(statement_bytes, PAYLOAD_TYPE, [signer])
    # securesystemslib's public key value of an ECDSA key is its SubjectPublicKeyInfo PEM
    pem = str(signer.public_key.keyval["public"]).encode()
    return {
        "mediaType": BUNDLE_MEDIA_TYPES[0],
        "verificationMaterial": {"publicKey": {"hint": key_hint(pem)}, "tlogEntries": []},
        "dsseEnvelope": {"payload": env["payload"], "payloadType": env["payloadType"],
                         "signatures": [{"sig": s["sig"], "keyid": ""} for s in env["signatures"]]},
    }


def parse_oms(st: object) -> tuple[OmsManifest | None, list[str]]:
    """An OMS v1.0 statement, exactly as the specification shapes it: (manifest, []) or (None, problems)."""
    problems: list[str] = []
    if not isinstance(st, dict):
        return None, ["the statement is not a JSON object"]
    if st.get("_type") != STATEMENT_TYPE:
        problems.append(f"_type {st.get('_type')!r}, expected {STATEMENT_TYPE!r}")
    if st.get("predicateType") != OMS_PREDICATE_TYPE:
        problems.append(f"predicateType {st.get('predicateType')!r}, expected {OMS_PREDICATE_TYPE!r}")
    subjects = st.get("subject")
    if not isinstance(subjects, list) or len(subjects) != 1 or not isinstance(subjects[0], dict):
        return None, problems + ["subject must hold exactly one entry: the model"]
    subj = subjects[0]
    name = subj.get("name")
    digest = subj.get("digest")
    if not isinstance(name, str) or not name:
        problems.append("subject[0].name must be the model's name")
    if not isinstance(digest, dict) or not isinstance(digest.get("sha256"),
                                                      str) or not HEX64.fullmatch(digest["sha256"]):
        problems.append("subject[0].digest.sha256 must be 64 lower-case hex digits")
    pred = st.get("predicate")
    if not isinstance(pred, dict):
        return None, problems + ["predicate must be an object"]
    ser = pred.get("serialization")
    if not isinstance(ser, dict):
        return None, problems + ["predicate.serialization must be an object"]
    method, hash_type = ser.get("method"), ser.get("hash_type")
    if method != "files":
        problems.append(f"predicate.serialization.method {method!r}: only 'files' is checked here "
                        "(per-file digests); 'shards' is not supported yet")
    if hash_type != "sha256":
        problems.append(f"predicate.serialization.hash_type {hash_type!r}: only 'sha256' is checked here")
    if not isinstance(ser.get("allow_symlinks"), bool):
        problems.append("predicate.serialization.allow_symlinks must be a boolean")
    ignore = ser.get("ignore_paths", [])
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        problems.append("predicate.serialization.ignore_paths must be a list of strings")
        ignore = []
    res = pred.get("resources")
    if not isinstance(res, list) or not res:
        return None, problems + ["predicate.resources must be a non-empty list"]
    resources: dict[str, str] = {}
    names = []
    for i, r in enumerate(res):
        loc = f"predicate.resources[{i}]"
        if not isinstance(r, dict) or set(r) != {"name", "algorithm", "digest"}:
            problems.append(f"{loc} must be exactly {{name, algorithm, digest}}")
            continue
        why = subject_name_problem(r["name"])
        if why:
            problems.append(f"{loc}.name {r['name']!r} {why}")
            continue
        if r["algorithm"] != hash_type:
            problems.append(f"{loc}.algorithm {r['algorithm']!r} differs from hash_type {hash_type!r}")
        if not isinstance(r["digest"], str) or not HEX64.fullmatch(r["digest"]):
            problems.append(f"{loc}.digest must be 64 lower-case hex digits")
            continue
        if r["name"] in resources:
            problems.append(f"{loc}.name {r['name']!r} is listed twice")
        resources[r["name"]] = r["digest"]
        names.append(r["name"])
    if names != sorted(names):
        problems.append("predicate.resources must be sorted by name")
    if problems or not isinstance(name, str) or not isinstance(digest, dict):  # (the checks above narrow both)
        return None, problems
    if root_digest(resources) != digest["sha256"]:
        return None, [f"subject[0].digest.sha256 {digest['sha256']} is not the sha256 over the resources' "
                      f"digests ({root_digest(resources)})"]
    return OmsManifest(name, "sha256", "files", ser["allow_symlinks"], tuple(ignore), resources), []
