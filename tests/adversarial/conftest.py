"""A signed tiny build and helpers to mutate copies of it: the adversarial suite's raw material."""

from __future__ import annotations

import base64
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..conftest import run_cli


@pytest.fixture(scope="session")
def signed_tiny(tiny_build_copy, signing_key, tmp_path_factory):
    """A copy of the session's tiny build, signed with the suite's ECDSA key (here as keys/signer.key and
    signer.pub); another key, ed25519, to forge with. No build of its own: the session's is reused."""
    base = tmp_path_factory.mktemp("adversarial")
    keys = base / "keys"
    p = run_cli("keygen", str(keys), "--name", "other", "--type", "ed25519")
    assert p.returncode == 0, p.stderr
    shutil.copy(signing_key, keys / "signer.key")
    shutil.copy(signing_key.with_suffix(".pub"), keys / "signer.pub")
    out, _ = tiny_build_copy("adversarial")
    return out, keys


@dataclass
class Case:
    """A copy of the signed build to mutate, and the verify-attestation arguments to run on it."""

    dir: Path
    keys: Path
    args: list[str]

    @property
    def att(self) -> Path:
        return self.dir / "attestation.intoto.jsonl"

    @property
    def model(self) -> Path:
        return self.dir / "model"

    @property
    def weights(self) -> Path:
        return self.model / "model.safetensors"

    # ---- the envelope ---------------------------------------------------------------------------
    def envelope(self) -> dict:
        return json.loads(self.att.read_text().splitlines()[0])

    def write_envelope(self, env: dict | str) -> None:
        self.att.write_text((env if isinstance(env, str) else json.dumps(env)) + "\n")

    def statement(self) -> dict:
        return json.loads(base64.b64decode(self.envelope()["payload"]))

    def sign(self, payload: bytes, key: str = "signer", payload_type: str = "application/vnd.in-toto+json") -> dict:
        from provenance.attest.sign import load_signer, sign_envelope

        return sign_envelope(payload, payload_type, [load_signer(self.keys / f"{key}.key")])

    def resign(self, fn=None, *, raw: bytes | None = None, key: str = "signer") -> None:
        """Edit the statement and sign it again with the legitimate key: signed, but malicious."""
        st = self.statement()
        if fn is not None:
            fn(st)
        self.write_envelope(self.sign(raw if raw is not None else json.dumps(st).encode(), key))

    def resign_files(self) -> None:
        """Re-sign with the model dir's current digests: the model-files check then passes, so only
        the structural checks stand between the files and `verified`."""
        from provenance._internal.hashing import hash_file

        def fix(st):
            for s in st["subject"]:
                d = hash_file(self.model / s["name"])
                s["digest"]["sha256"] = d["sha256"]
                entry = st["predicate"]["runDetails"]["provenance_outputs"]["files"][s["name"]]
                entry["blake3"] = d["blake3"]
                if "size" in entry:
                    entry["size"] = (self.model / s["name"]).stat().st_size
        self.resign(fix)

    # ---- the weights ----------------------------------------------------------------------------
    def safetensors_parts(self) -> tuple[dict, bytes]:
        raw = self.weights.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        return json.loads(raw[8:8 + n]), raw[8 + n:]

    def write_safetensors(self, header: dict | bytes, data: bytes) -> None:
        h = header if isinstance(header, bytes) else json.dumps(header).encode()
        self.weights.write_bytes(len(h).to_bytes(8, "little") + h + data)


@pytest.fixture
def case(signed_tiny, tmp_path) -> Case:
    out, keys = signed_tiny
    d = tmp_path / "copy"
    shutil.copytree(out, d, symlinks=True)
    c = Case(d, keys, [])
    c.args = [str(c.att), "--key", str(keys / "signer.pub"), "--model", str(c.model)]
    return c
