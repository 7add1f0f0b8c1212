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


def load_public_key(path: Path) -> PublicKey:
    """An ed25519 or ECDSA (P-256/384/521) PEM SubjectPublicKeyInfo key. Raises InputError."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

    from .._internal.reading import read_regular_file

    data = read_regular_file(Path(path), "public key", MAX_KEY_BYTES)
    blocks = data.count(b"-----BEGIN ")
    if blocks > 1:
        raise InputError(f"{path}: holds {blocks} PEM blocks; a key file holds exactly one public key (pass each "
                         "key with its own --key)")
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise InputError(f"{path}: not a PEM ed25519 or ECDSA public key ({e})") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        keytype, scheme, hash_name = "ed25519", "ed25519", None
        public = key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    elif isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVES:
        keytype = "ecdsa"
        scheme, hash_name = _CURVES[key.curve.name]
        public = key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    else:
        raise InputError(f"{path}: unsupported key type {type(key).__name__} (ed25519 or ECDSA P-256/384/521)")
    keyid = sha256_hex(_olpc({"keytype": keytype, "scheme": scheme, "keyval": {"public": public}}).encode())
    return PublicKey(keyid, keytype, scheme, key, hash_name)
