"""Signing: key pairs, DSSE envelopes (securesystemslib), and Sigstore keyless bundles.

The reading side (envelopes, public keys) is the verifier's own, in provenance/verify/.

Private keys are PKCS#8 PEM files with mode 0600, created at run time and never under this
repository. Public keys are SubjectPublicKeyInfo PEM; their securesystemslib key id is derived
from the key itself, so a verifier needs only the .pub file.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from pathlib import Path

from ..errors import InputError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

    from securesystemslib.signer import CryptoSigner, Signer  # type: ignore[attr-defined]  # documented; no __all__
    from sigstore.models import ClientTrustConfig
    from sigstore.oidc import IdentityToken

    from .._internal.jsonstrict import JSONObject

KEY_TYPES = ("ed25519", "ecdsa")
DEFAULT_KEY_ENV = "PROVENANCE_KEY"


def default_key_path() -> Path:
    env = os.environ.get(DEFAULT_KEY_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "provenance" / "keys" / "provenance.key"


def _repo_root() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").exists() and (root / "provenance").is_dir() else None


def keygen(directory: Path, *, name: str = "provenance", key_type: str = "ecdsa") -> tuple[Path, Path]:
    """Write NAME.key (0600) and NAME.pub into `directory`. Refuses to overwrite or to write into the repo."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    directory = Path(directory).expanduser().resolve()
    repo = _repo_root()
    if repo is not None and (directory == repo or repo in directory.parents):
        raise InputError(f"{directory}: refusing to write a private key inside the source tree {repo}; "
                         "choose a directory outside it (keys are never committed)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name or ""):
        raise InputError(f"--name {name!r}: expected a plain key name (letters, digits, '.', '_', '-'; "
                         "no '/' or '..', not starting with '.' or '-')")
    if key_type not in KEY_TYPES:
        raise InputError(f"--type {key_type!r}: expected one of {', '.join(KEY_TYPES)}")
    priv_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists():
            raise InputError(f"{p}: already exists; refusing to overwrite a key")
    key = ed25519.Ed25519PrivateKey.generate() if key_type == "ed25519" else ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    from .._internal.atomic import atomic_write_bytes

    # Public key first, private key last and all at once (written under a temporary name, then
    # linked into place, which fails rather than overwrites): a failure never leaves a private key
    # without its public key, nor half a key that blocks a retry.
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(pub_path, pub_pem)
        try:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.key.")
            try:
                with os.fdopen(fd, "wb") as f:  # mkstemp creates the file with mode 0600
                    f.write(private_pem)
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, priv_path)
            finally:
                Path(tmp).unlink(missing_ok=True)
        except BaseException:
            pub_path.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise InputError(f"{directory}: cannot write the key pair: {e.strerror}") from None
    return priv_path, pub_path


def load_signer(path: Path) -> CryptoSigner:
    """A securesystemslib CryptoSigner for a PKCS#8 PEM private key. Raises InputError."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]  # documented; no __all__

    from .._internal.reading import read_regular_file

    data = read_regular_file(Path(path), "private key", 64 << 10)
    if b"-----BEGIN PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise InputError(f"{path}: a public key, where the private key that signs was expected "
                         "(keygen writes NAME.key to sign with and NAME.pub to verify with)")
    try:
        key = load_pem_private_key(data, password=None)
        return CryptoSigner(key)
    except (ValueError, TypeError) as e:
        raise InputError(f"{path}: not an unencrypted PKCS#8 PEM ed25519 or ECDSA private key ({e})") from None


def key_is_private_enough(path: Path) -> bool:
    return not (Path(path).stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def sign_envelope(payload: bytes, payload_type: str, signers: Iterable[Signer]) -> JSONObject:
    """A DSSE envelope over `payload`, signed by each signer, as a JSON-ready dict."""
    from securesystemslib.dsse import Envelope

    env = Envelope(payload=payload, payload_type=payload_type, signatures={})
    for s in signers:
        env.sign(s)
    return env.to_dict()


def envelope_line(envelope: JSONObject) -> bytes:
    return json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode() + b"\n"


# ---- Sigstore keyless ---------------------------------------------------------------------------

def trust_config(path: Path | None, *, staging: bool = False) -> ClientTrustConfig:
    from sigstore.models import ClientTrustConfig

    if path is None:
        return ClientTrustConfig.staging() if staging else ClientTrustConfig.production()
    try:
        return ClientTrustConfig.from_json(Path(path).read_text())
    except OSError as e:
        raise InputError(f"{path}: cannot read trust config: {e.strerror}") from None
    except Exception as e:  # sigstore raises several error types for malformed configs
        raise InputError(f"{path}: not a Sigstore client trust config ({e})") from None


def identity_token(explicit: str | None) -> IdentityToken:
    """The OIDC token: --identity-token, $SIGSTORE_ID_TOKEN, or an ambient CI credential."""
    from sigstore.oidc import IdentityToken, detect_credential

    raw = explicit or os.environ.get("SIGSTORE_ID_TOKEN")
    if not raw:
        try:
            raw = detect_credential()
        except Exception as e:  # detection talks to CI metadata services
            raise InputError(f"no OIDC identity token for Sigstore: {e}") from None
    if not raw:
        raise InputError("no OIDC identity token for Sigstore: pass --identity-token or set SIGSTORE_ID_TOKEN "
                         "(interactive browser sign-in is not supported by provenance)")
    try:
        return IdentityToken(raw)
    except Exception as e:
        raise InputError(f"the OIDC identity token is not usable: {e}") from None


def sign_sigstore(statement_bytes: bytes, token: IdentityToken, config: ClientTrustConfig | None) -> str:
    """Sign the exact statement bytes with Sigstore keyless (`config` None: the public-good
    instance's); returns the bundle's JSON."""
    from sigstore.dsse import Statement
    from sigstore.sign import SigningContext

    ctx = SigningContext.from_trust_config(config if config is not None else trust_config(None))
    # cache=True: sigstore-python 4.5 otherwise certifies one ephemeral key and signs with another.
    with ctx.signer(token, cache=True) as signer:
        bundle = signer.sign_dsse(Statement(statement_bytes))
    return bundle.to_json()
