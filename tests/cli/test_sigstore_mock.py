"""Sigstore keyless signing end to end against a local mock Sigstore, and a real public-good
bundle verified offline.

The mock (npm's @sigstore/mock behind tests/sigstore_mock/server.js on 127.0.0.1) exercises this
project's client code and identity policy, not real Fulcio or Rekor: hence `mock` in the names.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from provenance.inputs.store import Store, fetch_input
from provenance.recipe import Input

from ..conftest import ROOT, TINY, run_cli

IDENTITY = "https://ci.provenance.test/builder"
ISSUER = "https://oidc.provenance.test"


@pytest.fixture(scope="module")
def mock_sigstore(tmp_path_factory):
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.fail("node and npm are needed for the mock Sigstore tests (this machine kind ships both)")
    d = tmp_path_factory.mktemp("sigstore-mock")
    for name in ("package.json", "server.js"):
        shutil.copy(ROOT / "tests" / "sigstore_mock" / name, d / name)
    p = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=d,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"npm install @sigstore/mock failed:\n{p.stderr[-2000:]}"
    proc = subprocess.Popen([node, "server.js"], cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "MOCK_MAX_SECONDS": "900"})
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        info = json.loads(line)
        config = d / "trust-config.json"
        config.write_text(json.dumps(info["trustConfig"]))
        yield config
    finally:
        proc.kill()
        proc.wait()


def token(identity: str = IDENTITY, issuer: str = ISSUER) -> str:
    """An HS256 OIDC-shaped token: the mock CA reads its claims and does not check a signature."""
    import jwt

    now = int(time.time())
    return jwt.encode({"iss": issuer, "sub": identity, "aud": "sigstore", "iat": now, "nbf": now, "exp": now + 600},
                      os.urandom(32).hex(), algorithm="HS256")


@pytest.fixture(scope="module")
def keyless_build(mock_sigstore, store, tmp_path_factory):
    out = tmp_path_factory.mktemp("keyless") / "out"
    p = run_cli("build", str(TINY), "--out", str(out), "--sigstore", "--trust-config", str(mock_sigstore),
                store=store, env={"SIGSTORE_ID_TOKEN": token()})
    assert p.returncode == 0, p.stderr
    return out


def vjson(*args):
    p = run_cli("verify", *args, "--json")
    return p.returncode, json.loads(p.stdout)


def test_mock_sigstore_keyless_build_verifies(keyless_build, mock_sigstore):
    bundle = keyless_build / "attestation.sigstore.json"
    assert json.loads(bundle.read_text())["mediaType"].startswith("application/vnd.dev.sigstore.bundle")
    code, obj = vjson(str(bundle), "--identity", IDENTITY, "--issuer", ISSUER, "--trust-config", str(mock_sigstore),
                      "--model", str(keyless_build / "model"), "--recipe", str(TINY))
    assert code == 0 and obj["ok"], obj
    # The bundle and the DSSE envelope sign the same statement bytes.
    from sigstore.models import Bundle

    payload = Bundle.from_json(bundle.read_text())._dsse_envelope._inner.payload
    env = json.loads((keyless_build / "attestation.intoto.jsonl").read_text())
    import base64

    assert payload == base64.b64decode(env["payload"])


def test_mock_sigstore_keyless_build_writes_a_keyless_oms_signature(keyless_build, mock_sigstore, model_signing,
                                                                     tmp_path):
    """model.sig of a keyless build is an OMS bundle with the Fulcio certificate; it verifies with the
    identity and the closed-set rules, and not after a file changes."""
    sig = keyless_build / "model.sig"
    bundle = json.loads(sig.read_text())
    assert "certificate" in bundle["verificationMaterial"] and bundle["verificationMaterial"]["tlogEntries"]
    code, obj = vjson(str(sig), "--identity", IDENTITY, "--issuer", ISSUER, "--trust-config", str(mock_sigstore),
                      "--model", str(keyless_build / "model"))
    assert code == 0 and obj["result"] == "verified", obj
    assert {c["check"] for c in obj["checks"]} >= {"oms-statement", "model-files", "unlisted-files"}
    # OpenSSF's model_signing accepts it too, against the same (mock) trust config.
    ms = [str(model_signing), "verify", "sigstore", "--signature", str(sig), "--trust_config", str(mock_sigstore),
          "--identity", IDENTITY, "--identity_provider", ISSUER]
    p = subprocess.run([*ms, str(keyless_build / "model")], capture_output=True, text=True)
    assert p.returncode == 0 and "Verification succeeded" in p.stdout + p.stderr, p.stdout + p.stderr
    d = tmp_path / "changed"
    shutil.copytree(keyless_build, d)
    (d / "model" / "config.json").write_text((d / "model" / "config.json").read_text() + " ")
    p = subprocess.run([*ms, str(d / "model")], capture_output=True, text=True)
    assert p.returncode != 0 and "config.json" in p.stdout + p.stderr
    code, obj = vjson(str(d / "model.sig"), "--identity", IDENTITY, "--issuer", ISSUER, "--trust-config",
                      str(mock_sigstore), "--model", str(d / "model"))
    assert code == 1 and "config.json" in {c["check"]: c for c in obj["checks"]}["model-files"]["detail"]


@pytest.mark.parametrize("identity,issuer", [("https://evil.test/builder", ISSUER), (IDENTITY, "https://evil.test")])
def test_mock_sigstore_wrong_identity_is_rejected(keyless_build, mock_sigstore, identity, issuer):
    code, obj = vjson(str(keyless_build / "attestation.sigstore.json"), "--identity", identity, "--issuer", issuer,
                      "--trust-config", str(mock_sigstore))
    assert code == 1 and [c["check"] for c in obj["checks"] if not c["ok"]] == ["signature"]


def test_mock_sigstore_tampered_model_is_caught(keyless_build, mock_sigstore, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(keyless_build, d)
    cfg = d / "model" / "config.json"
    cfg.write_text(cfg.read_text().replace('"num_hidden_layers": 1', '"num_hidden_layers": 2'))
    code, obj = vjson(str(d / "attestation.sigstore.json"), "--identity", IDENTITY, "--issuer", ISSUER,
                      "--trust-config", str(mock_sigstore), "--model", str(d / "model"))
    assert code == 1 and "model-files" in [c["check"] for c in obj["checks"] if not c["ok"]]


def test_mock_sigstore_without_token_exits_2(mock_sigstore, store, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SIGSTORE_ID_TOKEN"}
    p = subprocess.run([str(ROOT / ".venv" / "bin" / "provenance") if (ROOT / ".venv" / "bin" / "provenance").exists()
                        else "provenance", "build", str(TINY), "--out", str(tmp_path / "o"), "--sigstore",
                        "--trust-config", str(mock_sigstore)], capture_output=True, text=True,
                       env={**env, "PROVENANCE_STORE": str(store)})
    assert p.returncode == 2 and "identity token" in p.stderr
    assert not (tmp_path / "o" / "model").exists()


# A real public-good Sigstore bundle (GitHub Actions identity, DSSE) shipped in the test assets
# of the pypi-attestations 0.0.30 sdist, and the production trusted root shipped in sigstore 4.5.1.
PYPI_ATTESTATIONS_SHA256 = "14ff13c76bbef02a483c2b77532da02bfd746b5141b881f355e06b9807434423"
BUNDLE = "pypi_attestations-0.0.30/test/assets/pypi_attestation_models-0.0.4a2.tar.gz.sigstore"
BUNDLE_SHA256 = "faf6ebd0a6573479d34ffd0610eba529b155a1cebf643f50d30308daaa675994"
TRUSTED_ROOT_SHA256 = "6494e21ea73fa7ee769f85f57d5a3e6a08725eae1e38c755fc3517c9e6bc0b66"
REAL_IDENTITY = "https://github.com/trailofbits/pypi-attestation-models/.github/workflows/release.yml@refs/tags/v0.0.4a2"
REAL_ISSUER = "https://token.actions.githubusercontent.com"


@pytest.fixture(scope="module")
def real_bundle(store, tmp_path_factory):
    inp = Input(name="pypi-attestations", kind="pypi", package="pypi-attestations", version="0.0.30",
                sha256=PYPI_ATTESTATIONS_SHA256)
    sdist = fetch_input(inp, Store(store), recipe_dir=ROOT)
    d = tmp_path_factory.mktemp("real")
    with tarfile.open(sdist.path) as tar:
        data = tar.extractfile(BUNDLE).read()
    assert hashlib.sha256(data).hexdigest() == BUNDLE_SHA256
    (d / "bundle.sigstore.json").write_bytes(data)
    import sigstore

    root = Path(sigstore.__file__).parent / "_store" / "https%3A%2F%2Ftuf-repo-cdn.sigstore.dev" / "trusted_root.json"
    assert hashlib.sha256(root.read_bytes()).hexdigest() == TRUSTED_ROOT_SHA256, "pinned trusted root changed"
    shutil.copy(root, d / "trusted_root.json")
    return d


def test_real_public_good_bundle_verifies_offline(real_bundle):
    code, obj = vjson(str(real_bundle / "bundle.sigstore.json"), "--identity", REAL_IDENTITY, "--issuer", REAL_ISSUER,
                      "--trusted-root", str(real_bundle / "trusted_root.json"))
    checks = {c["check"]: c for c in obj["checks"]}
    assert checks["signature"]["ok"] and checks["statement-type"]["ok"], obj
    # It is a PyPI publish attestation, not SLSA provenance: the predicate check says so.
    assert code == 1 and not checks["predicate-type"]["ok"]
    assert "https://docs.pypi.org/attestations/publish/v1" in checks["predicate-type"]["detail"]


def test_real_public_good_bundle_rejects_another_identity(real_bundle):
    code, obj = vjson(str(real_bundle / "bundle.sigstore.json"), "--identity", "https://github.com/evil/repo",
                      "--issuer", REAL_ISSUER, "--trusted-root", str(real_bundle / "trusted_root.json"))
    assert code == 1 and [c["check"] for c in obj["checks"] if not c["ok"]] == ["signature"]


def test_mock_sigstore_parent_named_by_identity_is_verified_before_a_fine_tune(keyless_build, mock_sigstore, store,
                                                                                tmp_path):
    """A fine-tune whose parent was signed keyless: the recipe pins the bundle and names the identity and
    issuer (and this mock's trust config); another identity is refused before any work (exit 1)."""
    from .test_lineage import _recipe

    bundle = keyless_build / "attestation.sigstore.json"
    recipe = _recipe(keyless_build, tmp_path / "ft.toml", key=Path("unused.pub"))
    envelope = keyless_build / "attestation.intoto.jsonl"
    text = recipe.read_text().replace(str(envelope), str(bundle))
    sha = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in (envelope, bundle)}
    text = text.replace(sha[envelope], sha[bundle])
    signed_by = f'identity = "{IDENTITY}"\nissuer = "{ISSUER}"\ntrust_config = "{mock_sigstore}"'
    recipe.write_text(text.replace('key = "unused.pub"', signed_by))
    p = run_cli("build", str(recipe), "--out", str(tmp_path / "ft"), store=store)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "input parent: the model of 'tiny', verified against its attestation" in p.stderr
    recipe.write_text(recipe.read_text().replace(IDENTITY, "https://evil.test/builder"))
    p = run_cli("build", str(recipe), "--out", str(tmp_path / "other"), store=store)
    assert p.returncode == 1 and "Sigstore identity (https://evil.test/builder" in p.stderr, p.stderr[-2000:]
    assert "FAIL  signature" in p.stderr and not (tmp_path / "other").exists()
