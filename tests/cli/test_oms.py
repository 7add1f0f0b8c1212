"""OMS v1.0 interop: every build's model.sig verifies with OpenSSF's `model_signing` (installed in a
venv of its own, as a user has it), validates against the OMS JSON Schemas, and our verifier reads
model_signing's signatures and the specification's test vectors with the closed-set rules."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ..conftest import ROOT, TINY, build_json, run_cli

VECTORS = ROOT / "tests" / "vectors" / "oms-v1.0"


@pytest.fixture(scope="module")
def keys(tmp_path_factory, signing_key) -> Path:
    """ec: the session's default signing key (keygen's default type, ECDSA P-256), which signed the
    session's plain tiny build; ed: an ed25519 key of this module."""
    d = tmp_path_factory.mktemp("oms-keys")
    default = signing_key
    shutil.copy2(default, d / "ec.key")
    shutil.copy2(default.with_suffix(".pub"), d / "ec.pub")
    assert b"BEGIN PUBLIC KEY" in (d / "ec.pub").read_bytes()
    assert run_cli("keygen", str(d), "--name", "ed", "--type", "ed25519").returncode == 0
    return d


@pytest.fixture(scope="module")
def built(keys, tiny_build_copy):
    """The session's plain tiny build, signed with the ECDSA key `ec`."""
    out, p = tiny_build_copy("oms")
    assert "OMS signature: model.sig" in p.stderr
    return out


def _ms_verify(model_signing, model: Path, sig: Path, pub: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(model_signing), "verify", "key", str(model), "--signature", str(sig),
                           "--public_key", str(pub), *extra], capture_output=True, text=True)


def _verify(sig: Path, *args: str) -> tuple[int, dict]:
    p = run_cli("verify", str(sig), *args, "--json")
    return p.returncode, json.loads(p.stdout)


def _checks(obj) -> dict[str, dict]:
    return {c["check"]: c for c in obj["checks"]}


def test_model_signing_verifies_every_build_and_rejects_a_changed_byte(built, keys, model_signing, tmp_path):
    p = _ms_verify(model_signing, built / "model", built / "model.sig", keys / "ec.pub")
    assert p.returncode == 0 and "Verification succeeded" in p.stdout + p.stderr, p.stdout + p.stderr
    bad = tmp_path / "bad"
    shutil.copytree(built, bad)
    w = bad / "model" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    p = _ms_verify(model_signing, bad / "model", bad / "model.sig", keys / "ec.pub")
    assert p.returncode != 0 and "model.safetensors" in p.stdout + p.stderr
    p = _ms_verify(model_signing, built / "model", built / "model.sig", keys / "ed.pub")
    assert p.returncode != 0  # another key


def test_the_oms_signature_is_recorded_signed_and_checked_by_our_verifier(built, keys):
    b = build_json(built)
    assert b["oms"]["file"] == "model.sig"
    st = json.loads(base64.b64decode(json.loads((built / "attestation.intoto.jsonl").read_text())["payload"]))
    assert {x["name"]: x["digest"] for x in st["predicate"]["runDetails"]["byproducts"]}["model.sig"]["blake3"] == \
        b["oms"]["blake3"]
    code, obj = _verify(built / "model.sig", "--key", str(keys / "ec.pub"), "--model", str(built / "model"))
    assert code == 0 and obj["result"] == "verified", obj
    assert _checks(obj)["oms-statement"]["ok"] and "7 file(s)" in _checks(obj)["model-files"]["detail"]


def test_our_bundle_validates_against_the_oms_schemas(built):
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    schemas = {p.name: json.loads(p.read_text()) for p in (VECTORS / "schemas").glob("*.json")}
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas.values())
    bundle = json.loads((built / "model.sig").read_text())
    Draft202012Validator(schemas["bundle.schema.json"], registry=registry).validate(bundle)
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    Draft202012Validator(schemas["statement.schema.json"], registry=registry).validate(statement)
    broken = {k: v for k, v in bundle.items() if k != "dsseEnvelope"}
    errors = list(Draft202012Validator(schemas["bundle.schema.json"], registry=registry).iter_errors(broken))
    assert errors  # the check can fail: the schema refuses a bundle without its envelope


def test_an_ed25519_build_has_no_oms_signature_and_says_why(store, keys, tmp_path):
    out = tmp_path / "ed"
    p = run_cli("build", str(TINY), "--out", str(out), "--key", str(keys / "ed.key"), store=store)
    assert p.returncode == 0, p.stderr
    assert not (out / "model.sig").exists() and "OMS accepts ECDSA keys only" in p.stderr
    assert "ed25519" in build_json(out)["oms"]["skipped"]


def test_we_verify_a_model_signing_signed_dir_with_the_closed_set_rules(built, keys, model_signing, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(built / "model", model)
    sig = tmp_path / "m.sig"
    p = subprocess.run([str(model_signing), "sign", "key", str(model), "--signature", str(sig), "--private_key",
                        str(keys / "ec.key")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    code, obj = _verify(sig, "--key", str(keys / "ec.pub"), "--model", str(model))
    assert code == 0 and obj["result"] == "verified", obj
    # model_signing's default: the signature inside the model folder, ignored by name.
    inside = model / "model.sig"
    p = subprocess.run([str(model_signing), "sign", "key", str(model), "--signature", str(inside), "--private_key",
                        str(keys / "ec.key")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    code, obj = _verify(inside, "--key", str(keys / "ec.pub"), "--model", str(model))
    assert code == 0, obj
    code, obj = _verify(inside, "--key", str(keys / "ed.pub"), "--model", str(model))
    assert code == 1 and not _checks(obj)["signature"]["ok"]
    inside.unlink()
    (model / "chat_template.jinja").write_text("{{ messages }}")  # model_signing would not sign-check this file
    code, obj = _verify(sig, "--key", str(keys / "ec.pub"), "--model", str(model))
    assert code == 1 and "chat_template.jinja" in _checks(obj)["unlisted-files"]["detail"]
    (model / "chat_template.jinja").unlink()
    (model / "config.json").write_text((model / "config.json").read_text() + " ")
    code, obj = _verify(sig, "--key", str(keys / "ec.pub"), "--model", str(model))
    assert code == 1 and "config.json" in _checks(obj)["model-files"]["detail"]


@pytest.mark.parametrize("name", ["empty", "missing-envelope", "missing-tlog-entries", "missing-verification-material"])
def test_the_invalid_vectors_are_refused_at_the_bundle(name, keys):
    code, obj = _verify(VECTORS / "test-vectors" / "invalid" / f"{name}.bundle.json", "--key", str(keys / "ec.pub"))
    last = obj["checks"][-1]
    # An empty file holds no envelope at all; the others are bundles of the wrong shape.
    assert code == 1 and last["check"] == ("envelope" if name == "empty" else "bundle") and not last["ok"], obj


def test_the_wrong_predicate_vector_is_refused_at_its_statement(keys, tmp_path):
    """Without the vector's key its signature cannot hold; re-signed with ours (a signed-but-wrong
    statement), the statement check names the predicate type."""
    path = VECTORS / "test-vectors" / "invalid-payload" / "wrong-predicate.bundle.json"
    code, obj = _verify(path, "--key", str(keys / "ec.pub"))
    assert code == 1 and not _checks(obj)["signature"]["ok"]
    from provenance.attest.oms import key_bundle
    from provenance.attest.sign import load_signer

    bundle = json.loads(path.read_text())
    payload = base64.b64decode(bundle["dsseEnvelope"]["payload"])
    resigned = tmp_path / "wrong.bundle.json"
    resigned.write_text(json.dumps(key_bundle(payload, load_signer(keys / "ec.key"))))
    code, obj = _verify(resigned, "--key", str(keys / "ec.pub"))
    checks = _checks(obj)
    assert code == 1 and checks["signature"]["ok"] and not checks["predicate-type"]["ok"], obj
    assert "https://example.com/wrong-predicate/v1.0" in checks["predicate-type"]["detail"]


def test_the_valid_vectors_verify_where_their_keys_are_available(keys):
    """The Sigstore vector verifies offline against the public-good trusted root sigstore-python
    ships; the key vector's public key is not published with the vectors (its shape passes, its
    signature cannot); the certificate vector's CA is not either (see docs/formats.md)."""
    valid = VECTORS / "test-vectors" / "valid"
    code, obj = _verify(valid / "sigstore.bundle.json", "--identity", "stefanb@us.ibm.com",
                        "--issuer", "https://sigstore.verify.ibm.com/oauth2")
    assert code == 0 and obj["result"] == "verified" and _checks(obj)["oms-statement"]["ok"], obj
    code, obj = _verify(valid / "sigstore.bundle.json", "--identity", "someone@example.com",
                        "--issuer", "https://sigstore.verify.ibm.com/oauth2")
    assert code == 1 and not _checks(obj)["signature"]["ok"]
    code, obj = _verify(valid / "key.bundle.json", "--key", str(keys / "ec.pub"))
    checks = _checks(obj)
    assert code == 1 and checks["bundle"]["ok"] and checks["payload-type"]["ok"] and not checks["signature"]["ok"]


def test_publish_lays_out_a_folder_that_verifies_as_published(built, keys, model_signing, tmp_path):
    out = tmp_path / "hub"
    p = run_cli("publish", str(built), "--out", str(out), "--key", str(keys / "ec.pub"), "--json")
    res = json.loads(p.stdout)
    assert p.returncode == 0 and res["ok"] and res["oms"], res
    names = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    assert names == sorted([*res["files"], "model.sig", *(f".provenance/{n}" for n in res["receipts"])])
    assert (out / "model.safetensors").read_bytes() == (built / "model" / "model.safetensors").read_bytes()
    # The tools a user has accept it as it is published.
    p = _ms_verify(model_signing, out, out / "model.sig", out / ".provenance" / "signing-key.pub")
    assert p.returncode == 0, p.stdout + p.stderr
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    assert ModelCard.load(out / "README.md").data.license == "mit"
    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() == build_json(built)["model"]["parameters"]
    # --published passes over the known receipts only.
    att = out / ".provenance" / "attestation.intoto.jsonl"
    code, obj = _verify(att, "--key", str(keys / "ec.pub"), "--model", str(out), "--published")
    assert code == 0, obj
    code, obj = _verify(att, "--key", str(keys / "ec.pub"), "--model", str(out))
    assert code == 1 and "model.sig" in _checks(obj)["unlisted-files"]["detail"]
    assert "add --published" in _checks(obj)["unlisted-files"]["detail"]  # it names the flag meant
    (out / ".provenance" / "modeling_llama.py").write_text("import os")
    code, obj = _verify(att, "--key", str(keys / "ec.pub"), "--model", str(out), "--published")
    assert code == 1 and ".provenance/modeling_llama.py" in _checks(obj)["unlisted-files"]["detail"]
    code, obj = _verify(att, "--key", str(keys / "ec.pub"), "--model", str(out))
    assert code == 1 and "add --published" not in _checks(obj)["unlisted-files"]["detail"]  # not only receipts
    p = run_cli("publish", str(built), "--out", str(out), "--key", str(keys / "ec.pub"))
    assert p.returncode == 2 and "not an empty directory" in p.stderr
    # The commands it prints name the announced key, never the copy it says proves nothing.
    p = run_cli("publish", str(built), "--out", str(tmp_path / "text"), "--key", str(keys / "ec.pub"))
    commands = [x for x in p.stdout.splitlines() if "verify" in x and "--" in x]
    assert p.returncode == 0 and len(commands) == 2 and all("PUBLIC_KEY" in x for x in commands), p.stdout
    assert "signing-key.pub" not in " ".join(commands) and "with the key you announce as PUBLIC_KEY" in p.stdout
    p = run_cli("publish", str(built), "--out", str(tmp_path / "other"), "--key", str(keys / "ed.pub"))
    assert p.returncode == 1 and not (tmp_path / "other").exists()  # the build does not verify with that key


def test_a_published_folder_verifies_after_a_round_trip_through_the_hub(built, keys, model_signing, tmp_path):
    """What a hub user downloads with `hf download REPO --local-dir DIR`: the folder as published, the
    .gitattributes every hub repository has, and huggingface_hub's bookkeeping under .cache/huggingface/
    (written here by huggingface_hub's own code). --published passes over exactly those, by name, and
    model_signing does too; anything else there still fails."""
    from huggingface_hub._local_folder import write_download_metadata

    out = tmp_path / "hub"
    p = run_cli("publish", str(built), "--out", str(out), "--key", str(keys / "ec.pub"))
    assert p.returncode == 0, p.stderr
    kid = next(x for x in p.stdout.splitlines() if x.startswith("signing key id ")).split()[3].rstrip(":")
    assert "proves nothing by itself" in p.stdout
    names = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    (out / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    for n in [*names, ".gitattributes"]:
        write_download_metadata(out, n, "0" * 40, "e" * 64)
    assert (out / ".cache" / "huggingface" / "download" / "model.safetensors.metadata").is_file()
    pub, att, sig = str(keys / "ec.pub"), out / ".provenance" / "attestation.intoto.jsonl", out / "model.sig"
    for receipt in (att, sig):
        code, obj = _verify(receipt, "--key", pub, "--model", str(out), "--published")
        assert code == 0, obj
        assert "the hub's .gitattributes" in _checks(obj)["unlisted-files"]["detail"]
        assert "huggingface_hub's download bookkeeping" in _checks(obj)["unlisted-files"]["detail"]
    p = _ms_verify(model_signing, out, sig, out / ".provenance" / "signing-key.pub")
    assert p.returncode == 0, p.stdout + p.stderr
    # The model card's own command for such a folder, as a hub user would copy it.
    line = next(x for x in (out / "README.md").read_text().splitlines() if x.startswith("verify-attestation DIR/"))
    argv = [a.replace("DIR", str(out)).replace("PUBLIC_KEY", pub) for a in line.split()[1:]]
    p = run_cli("verify", *argv)
    assert p.returncode == 0 and p.stdout.strip().endswith("verdict: verified"), line + "\n" + p.stdout
    assert f"ecdsa {kid}" in p.stdout  # the key id publish told the publisher to announce
    code, obj = _verify(att, "--key", pub, "--model", str(out))
    assert code == 1 and "add --published" in _checks(obj)["unlisted-files"]["detail"], obj
    for planted in (".cache/huggingface/download/modeling_llama.py.metadata", ".cache/modeling_llama.py",
                    ".cache/huggingface/download/model.safetensors.incomplete"):
        (out / planted).write_text("import os")
        code, obj = _verify(att, "--key", pub, "--model", str(out), "--published")
        assert code == 1 and planted in _checks(obj)["unlisted-files"]["detail"], (planted, obj)
        (out / planted).unlink()


def test_a_snapshot_in_huggingface_hubs_cache_verifies_through_its_links(built, keys, model_signing, tmp_path):
    """What from_pretrained("org/name") loads: a snapshot in huggingface_hub's cache, relative symlinks
    into the repository's blobs/ (named by their etags). The closed set is the snapshot's names, each read
    through its link as a loader reads it; any other link still fails. huggingface_hub finds the files in
    this layout, model_signing (--allow_symlinks) accepts it, and transformers loads the verified bytes."""
    import hashlib

    from huggingface_hub import try_to_load_from_cache
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pub"
    p = run_cli("publish", str(built), "--out", str(out), "--key", str(keys / "ec.pub"))
    assert p.returncode == 0, p.stderr
    (out / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    names = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    cache, rev = tmp_path / "cache", "a" * 40
    repo = cache / "models--me--tiny"
    snap = repo / "snapshots" / rev

    def link(name: str, data: bytes) -> Path:
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).symlink_to(os.path.relpath(blob, (snap / name).parent))
        return blob

    blobs = {n: link(n, (out / n).read_bytes()) for n in names}
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    assert try_to_load_from_cache("me/tiny", "model.safetensors", cache_dir=cache) == str(snap / "model.safetensors")
    pub = str(keys / "ec.pub")
    att = snap / ".provenance" / "attestation.intoto.jsonl"
    for receipt in (att, snap / "model.sig"):
        code, obj = _verify(receipt, "--key", pub, "--model", str(snap), "--published")
        assert code == 0, obj
        detail = _checks(obj)["unlisted-files"]["detail"]
        signed_files = [n for n in names
                        if not n.startswith(".provenance/") and n not in ("model.sig", ".gitattributes")]
        assert f"{len(signed_files)} of them, a snapshot in huggingface_hub's cache, read through their links" in detail
    card = (snap / "README.md").read_text()  # read through its link too
    assert "where `from_pretrained` finds it in huggingface_hub's cache" in card
    line = next(x for x in card.splitlines() if x.startswith("verify-attestation DIR/"))
    p = run_cli("verify", *[a.replace("DIR", str(snap)).replace("PUBLIC_KEY", pub) for a in line.split()[1:]])
    assert p.returncode == 0 and p.stdout.strip().endswith("verdict: verified"), line + "\n" + p.stdout
    p = _ms_verify(model_signing, snap, snap / "model.sig", Path(pub), "--allow_symlinks")
    assert p.returncode == 0, p.stdout + p.stderr
    loaded = AutoModelForCausalLM.from_pretrained("me/tiny", cache_dir=cache, local_files_only=True)
    signed = load_file(str(out / "model.safetensors"))
    assert all(loaded.state_dict()[k].equal(v) for k, v in signed.items())
    # A changed blob is a changed file.
    weights = blobs["model.safetensors"]
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    code, obj = _verify(att, "--key", pub, "--model", str(snap), "--published")
    assert code == 1 and "model.safetensors: blake3 expected" in _checks(obj)["model-files"]["detail"], obj
    weights.write_bytes(good)
    # Links that are not the cache's own: out of blobs/ (to the same bytes), absolute, to a link, and one
    # the signer never listed.
    config = snap / "config.json"
    elsewhere = tmp_path / "config.json"
    elsewhere.write_bytes((out / "config.json").read_bytes())
    odd = repo / "blobs" / "odd"
    odd.symlink_to(blobs["config.json"].name)
    for target in (os.path.relpath(elsewhere, snap), str(blobs["config.json"]), "../../blobs/odd"):
        config.unlink()
        config.symlink_to(target)
        code, obj = _verify(att, "--key", pub, "--model", str(snap), "--published")
        detail = _checks(obj)["unlisted-files"]["detail"]
        assert code == 1 and f"config.json: a symlink (-> {target})" in detail, (target, obj)
        assert "only a relative link to a file in the repository's blobs/" in detail
    config.unlink()
    config.symlink_to(os.path.relpath(blobs["config.json"], snap))
    link("modeling_llama.py", b"import os\n")
    code, obj = _verify(att, "--key", pub, "--model", str(snap), "--published")
    assert code == 1 and "modeling_llama.py: " in _checks(obj)["unlisted-files"]["detail"], obj
