"""Public keys for DSSE verification, read and checked with `cryptography` alone.

Key ids are computed exactly as securesystemslib computes them (sha256 of the OLPC canonical JSON
of keytype, scheme and keyval), so the ids shown here are the ones `provenance build` records;
a test holds the two to the same value. Only cryptography's public, documented API is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .._internal.hashing import sha256_hex
from ..errors import InputError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

MAX_KEY_BYTES = 64 << 10
# The DER SubjectPublicKeyInfo that cryptography writes for each supported key, up to the key itself
# (an uncompressed point for ECDSA, the 32 raw bytes for ed25519), and the key's length. A key file
# that is byte for byte the PEM cryptography writes for one of these is read by the curve's public
# constructor, which checks the key; any other file goes through `load_pem_public_key`. Importing that
# (cryptography's `serialization`, with its SSH support and `dataclasses`) is about 40 ms of the
# verifier's start-up (docs/benchmarks.md); tests/test_keys.py derives these from cryptography.
SPKI_PREFIXES = {
    "ed25519": (bytes.fromhex("302a300506032b6570032100"), 32),
    "secp256r1": (bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200"), 65),
    "secp384r1": (bytes.fromhex("3076301006072a8648ce3d020106052b81040022036200"), 97),
    "secp521r1": (bytes.fromhex("30819b301006072a8648ce3d020106052b8104002303818600"), 133),
}
_PEM_HEAD, _PEM_TAIL = b"-----BEGIN PUBLIC KEY-----\n", b"-----END PUBLIC KEY-----\n"
_CURVES = {"secp256r1": ("ecdsa-sha2-nistp256", "sha256"), "secp384r1": ("ecdsa-sha2-nistp384", "sha384"),
           "secp521r1": ("ecdsa-sha2-nistp521", "sha512")}


def _olpc(obj: object) -> str:
    """OLPC canonical JSON of nested dicts of strings (what securesystemslib hashes for a key id)."""
    if isinstance(obj, dict):
        return "{" + ",".join(f"{_olpc(k)}:{_olpc(obj[k])}" for k in sorted(obj)) + "}"
    return '"' + str(obj).replace("\\", "\\\\").replace('"', '\\"') + '"'


class PublicKey(NamedTuple):
    keyid: str
    keytype: str  # "ed25519" | "ecdsa"
    scheme: str
    key: Ed25519PublicKey | EllipticCurvePublicKey
    hash_name: str | None = None  # ECDSA's digest

    def verifies(self, sig: bytes, data: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519

        try:
            if isinstance(self.key, ed25519.Ed25519PublicKey):
                self.key.verify(sig, data)
            elif isinstance(self.key, ec.EllipticCurvePublicKey) and self.hash_name is not None:
                self.key.verify(sig, data, ec.ECDSA(getattr(hashes, self.hash_name.upper())()))
            else:
                return False
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True


def canonical_pem(der: bytes) -> bytes:
    """The PEM cryptography writes for a DER SubjectPublicKeyInfo: base64 in lines of 64."""
    import base64

    b64 = base64.b64encode(der)
    return _PEM_HEAD + b"".join(b64[i:i + 64] + b"\n" for i in range(0, len(b64), 64)) + _PEM_TAIL


def _known_spki(data: bytes) -> tuple[str, bytes] | None:
    """(curve name, key bytes) when `data` is exactly cryptography's PEM of a supported key, else None."""
    import base64
    import binascii

    if not (data.startswith(_PEM_HEAD) and data.endswith(_PEM_TAIL)):
        return None
    try:
        der = base64.b64decode(data[len(_PEM_HEAD):-len(_PEM_TAIL)].replace(b"\n", b""), validate=True)
    except binascii.Error:
        return None
    if canonical_pem(der) != data:
        return None
    for name, (prefix, size) in SPKI_PREFIXES.items():
        if len(der) == len(prefix) + size and der.startswith(prefix):
            return name, der[len(prefix):]
    return None


def _from_known(name: str, raw: bytes) -> Ed25519PublicKey | EllipticCurvePublicKey:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if name == "ed25519":
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    curves: dict[str, ec.EllipticCurve] = {"secp256r1": ec.SECP256R1(), "secp384r1": ec.SECP384R1(),
                                           "secp521r1": ec.SECP521R1()}
    return ec.EllipticCurvePublicKey.from_encoded_point(curves[name], raw)


def _parse(data: bytes) -> tuple[object, str | None]:
    """(key, its canonical PEM text when the file is that) for the key file's bytes. Raises ValueError."""
    known = _known_spki(data)
    if known is not None:
        return _from_known(*known), data.decode()
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    return load_pem_public_key(data), None


def load_public_key(path: Path) -> PublicKey:
    """An ed25519 or ECDSA (P-256/384/521) PEM SubjectPublicKeyInfo key. Raises InputError."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    from .._internal.reading import read_regular_file

    data = read_regular_file(Path(path), "public key", MAX_KEY_BYTES)
    blocks = data.count(b"-----BEGIN ")
    if blocks > 1:
        raise InputError(f"{path}: holds {blocks} PEM blocks; a key file holds exactly one public key (pass each "
                         "key with its own --key)")
    try:
        key, pem = _parse(data)
    except (ValueError, TypeError) as e:
        raise InputError(f"{path}: not a PEM ed25519 or ECDSA public key ({e})") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        keytype, scheme, hash_name = "ed25519", "ed25519", None
        public = key.public_bytes_raw().hex()
    elif isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVES:
        keytype = "ecdsa"
        scheme, hash_name = _CURVES[key.curve.name]
        public = pem if pem is not None else _spki_pem(key)
    else:
        raise InputError(f"{path}: unsupported key type {type(key).__name__} (ed25519 or ECDSA P-256/384/521)")
    keyid = sha256_hex(_olpc({"keytype": keytype, "scheme": scheme, "keyval": {"public": public}}).encode())
    return PublicKey(keyid, keytype, scheme, key, hash_name)


def _spki_pem(key: EllipticCurvePublicKey) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
