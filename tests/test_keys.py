"""The verifier reads keys with `cryptography` alone; its key ids must equal securesystemslib's,
which the builder records in build.json and which DSSE signatures carry as hints."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from securesystemslib.signer import CryptoSigner, SSlibKey

from provenance.errors import InputError
from provenance.verify.keys import load_public_key


@pytest.mark.parametrize("make", [ed25519.Ed25519PrivateKey.generate, lambda: ec.generate_private_key(ec.SECP256R1()),
                                  lambda: ec.generate_private_key(ec.SECP384R1()),
                                  lambda: ec.generate_private_key(ec.SECP521R1())],
                         ids=["ed25519", "p256", "p384", "p521"])
def test_keyid_and_signatures_agree_with_securesystemslib(make, tmp_path):
    priv = make()
    pem = priv.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "k.pub").write_bytes(pem)
    ours = load_public_key(tmp_path / "k.pub")
    theirs = SSlibKey.from_crypto(priv.public_key())
    assert ours.keyid == theirs.keyid and ours.scheme == theirs.scheme
    sig = CryptoSigner(priv).sign(b"payload")
    assert ours.verifies(bytes.fromhex(sig.signature), b"payload")
    assert not ours.verifies(bytes.fromhex(sig.signature), b"payloaD")


def test_unsupported_and_malformed_keys_are_refused(tmp_path):
    rsa_pem = rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "rsa.pub").write_bytes(rsa_pem)
    with pytest.raises(InputError, match="unsupported key type"):
        load_public_key(tmp_path / "rsa.pub")
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(InputError, match="not a PEM"):
        load_public_key(tmp_path / "junk.pub")


def test_a_key_file_with_two_pem_blocks_is_refused(tmp_path):
    """Two keys in one file: the first was used silently; which key vouches must never be a guess."""
    pems = [ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo) for _ in range(2)]
    (tmp_path / "two.pub").write_bytes(pems[0] + pems[1])
    with pytest.raises(InputError, match="holds 2 PEM blocks"):
        load_public_key(tmp_path / "two.pub")
    (tmp_path / "one.pub").write_bytes(pems[0])
    assert load_public_key(tmp_path / "one.pub").keytype == "ecdsa"


def test_the_verifier_uses_cryptographys_public_api_only():
    """No private module of cryptography (`_rust`, `_serialization`, ...) is imported by the verifier."""
    import re

    src = "\n".join(p.read_text() for p in (Path(__file__).parents[1] / "provenance" / "verify").glob("*.py"))
    assert not re.search(r"cryptography[\w.]*\._", src), "a private cryptography module is used"


def test_ecdsa_verification_honours_the_schemes_hash(tmp_path):
    """Verification must hash with the scheme's digest: a P-256 signature over
    SHA-384 is valid under ec.ECDSA(SHA384) but not under ecdsa-sha2-nistp256."""
    from cryptography.hazmat.primitives import hashes

    priv = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "k.pub").write_bytes(priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    key = load_public_key(tmp_path / "k.pub")
    sha384_sig = priv.sign(b"payload", ec.ECDSA(hashes.SHA384()))
    priv.public_key().verify(sha384_sig, b"payload", ec.ECDSA(hashes.SHA384()))  # a real signature
    assert not key.verifies(sha384_sig, b"payload")
    assert key.verifies(priv.sign(b"payload", ec.ECDSA(hashes.SHA256())), b"payload")


@pytest.mark.parametrize("curve", ["ed25519", "secp256r1", "secp384r1", "secp521r1"])
def test_a_canonical_key_file_reads_as_cryptography_reads_it(curve, tmp_path):
    """The verifier reads cryptography's own PEM of a supported key without cryptography's PEM parser
    (provenance/verify/keys.py, SPKI_PREFIXES): the prefixes are cryptography's, and the key, its id and
    its verdicts are what `load_pem_public_key` gives."""
    from provenance.verify.keys import SPKI_PREFIXES, _known_spki, canonical_pem

    priv = (ed25519.Ed25519PrivateKey.generate() if curve == "ed25519"
            else ec.generate_private_key(getattr(ec, curve.upper())()))
    pub = priv.public_key()
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    prefix, size = SPKI_PREFIXES[curve]
    assert der[:len(prefix)] == prefix and len(der) == len(prefix) + size
    assert canonical_pem(der) == pem and _known_spki(pem) == (curve, der[len(prefix):])
    (tmp_path / "k.pub").write_bytes(pem)
    ours = load_public_key(tmp_path / "k.pub")
    assert ours.key == serialization.load_pem_public_key(pem)
    assert ours.keyid == SSlibKey.from_crypto(pub).keyid


def test_other_encodings_of_a_key_go_through_cryptographys_parser(tmp_path):
    """Only cryptography's own bytes take the short path: CRLF line ends, other line widths or a
    compressed point are read by load_pem_public_key (same key, same id); an off-curve point is refused."""
    pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    want = SSlibKey.from_crypto(pub).keyid
    from provenance.verify.keys import SPKI_PREFIXES, _known_spki

    crlf = pem.replace(b"\n", b"\r\n")
    import base64

    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    one_line = b"-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(der) + b"\n-----END PUBLIC KEY-----\n"
    point = pub.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    compressed = bytes.fromhex("3039") + der[2:23] + bytes.fromhex("032200") + point
    compressed = b"-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(compressed) + b"\n-----END PUBLIC KEY-----\n"
    for variant in (crlf, one_line, compressed):
        assert _known_spki(variant) is None
        (tmp_path / "k.pub").write_bytes(variant)
        assert load_public_key(tmp_path / "k.pub").keyid == want
    prefix, _ = SPKI_PREFIXES["secp256r1"]
    off_curve = der[:len(prefix)] + b"\x04" + b"\x01" * 64
    (tmp_path / "bad.pub").write_bytes(b"-----BEGIN PUBLIC KEY-----\n" + b"\n".join(
        base64.b64encode(off_curve)[i:i + 64] for i in range(0, 124, 64)) + b"\n-----END PUBLIC KEY-----\n")
    assert _known_spki((tmp_path / "bad.pub").read_bytes()) is not None
    with pytest.raises(InputError, match="not a PEM ed25519 or ECDSA public key"):
        load_public_key(tmp_path / "bad.pub")
