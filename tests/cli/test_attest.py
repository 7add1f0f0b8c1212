"""Signed attestations: verification, an independent securesystemslib check, and the tamper matrix."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys

import pytest

from provenance.attest.model import parse_statement

from ..conftest import ROOT, TINY, cli_here, run_cli, sign_as_is


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    for name, kind in (("signer", "ed25519"), ("other", "ed25519"), ("p256", "ecdsa")):
        p = run_cli("keygen", str(d), "--name", name, "--type", kind)
        assert p.returncode == 0, p.stderr
    return d


@pytest.fixture(scope="module")
def signed(store, keys, tmp_path_factory, tiny_other_seed):
    """The tiny recipe built and signed by two keys (the build under test, "main"), and another build
    (seed 1235, the session's) whose statement the same signer signed too ("other", for replay)."""
    base = tmp_path_factory.mktemp("signed")
    main = base / "main"
    p = run_cli("build", str(TINY), "--out", str(main), "--key", str(keys / "signer.key"), "--key",
                str(keys / "p256.key"), store=store)
    assert p.returncode == 0, p.stderr
    other = base / "other"
    shutil.copytree(tiny_other_seed[0], other)
    sign_as_is(other / "attestation.intoto.jsonl", keys / "signer.key")
    return {"main": main, "other": other}


def vjson(*args):
    p = run_cli("verify", *args, "--json")
    return p.returncode, json.loads(p.stdout)


def vjson_here(*args):
    """vjson in this process (conftest.cli_here): for the checks that load the model."""
    p = cli_here("verify", *args, "--json")
    return p.returncode, json.loads(p.stdout)


def failing(obj) -> list[str]:
    return [c["check"] for c in obj["checks"] if not c["ok"]]


def test_build_attestation_verifies(signed, keys):
    out = signed["main"]
    code, obj = vjson(str(out / "attestation.intoto.jsonl"), "--key", str(keys / "signer.pub"),
                      "--model", str(out / "model"), "--recipe", str(TINY))
    assert code == 0 and obj["ok"] is True, obj
    assert {c["check"] for c in obj["checks"]} >= {"envelope", "signature", "payload-type", "statement-type",
                                                   "predicate-type", "build-type", "builder-id", "model-files",
                                                   "unlisted-files", "recipe"}


def test_verify_attestation_console_script_and_sha256(signed, keys):
    exe = shutil.which("verify-attestation", path=str(ROOT / ".venv" / "bin")) or "verify-attestation"
    out = signed["main"]
    p = subprocess.run([exe, str(out / "attestation.intoto.jsonl"), "--key", str(keys / "p256.pub"),
                        "--model", str(out / "model"), "--sha256"], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "blake3 and sha256" in p.stdout and p.stdout.strip().endswith("verdict: verified")


def test_threshold_of_two_keys(signed, keys):
    att = str(signed["main"] / "attestation.intoto.jsonl")
    code, _ = vjson(att, "--key", str(keys / "signer.pub"), "--key", str(keys / "p256.pub"), "--threshold", "2")
    assert code == 0
    code, obj = vjson(att, "--key", str(keys / "signer.pub"), "--key", str(keys / "other.pub"), "--threshold", "2")
    assert code == 1 and failing(obj) == ["signature"]


def test_without_a_model_dir_the_verdict_says_no_file_was_checked(signed, keys):
    """`verified` without --model covers the attestation alone, and says so in both forms; a build's
    output dir given as --model fails (it is not the closed set) and names the model dir meant."""
    out = signed["main"]
    att, pub = str(out / "attestation.intoto.jsonl"), str(keys / "signer.pub")
    code, obj = vjson(att, "--key", pub)
    assert code == 0 and obj["result"] == "verified" and obj["model_checked"] is False, obj
    p = run_cli("verify", att, "--key", pub)
    assert p.returncode == 0 and p.stdout.strip().endswith(
        "verdict: verified (the attestation only; add --model DIR to check the files)"), p.stdout
    code, obj = vjson(att, "--key", pub, "--model", str(out / "model"))
    assert code == 0 and obj["model_checked"] is True, obj
    code, obj = vjson(att, "--key", pub, "--model", str(out))
    assert code == 1 and failing(obj) == ["model-files", "unlisted-files"], obj
    detail = next(c["detail"] for c in obj["checks"] if c["check"] == "model-files")
    assert f"did you mean --model {out / 'model'}?" in detail, detail
    assert detail.startswith("every signed file is in model/"), detail  # the hint first, before the missing files
    # the build dir given as the attestation: exit 2 (nothing was checked), naming the file meant
    p = run_cli("verify", str(out), "--key", pub)
    assert p.returncode == 2 and f"did you mean {out / 'attestation.intoto.jsonl'}?" in p.stderr, p.stderr


def test_independent_check_with_securesystemslib_alone(signed, keys):
    """Verify the envelope without this project's verifier, then check the field rules by hand."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    line = (signed["main"] / "attestation.intoto.jsonl").read_text().splitlines()[0]
    env = Envelope.from_dict(json.loads(line))
    key = SSlibKey.from_crypto(load_pem_public_key((keys / "signer.pub").read_bytes()))
    assert key.keyid in env.verify([key], 1)
    assert env.payload_type == "application/vnd.in-toto+json"
    st = json.loads(env.payload)
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    assert st["predicateType"] == "https://slsa.dev/provenance/v1"
    assert all(set(s["digest"]) == {"sha256"} for s in st["subject"])
    pred = st["predicate"]
    bd, rd = pred["buildDefinition"], pred["runDetails"]
    assert set(bd) == {"buildType", "externalParameters", "internalParameters", "resolvedDependencies"}
    assert set(rd) <= {"builder", "metadata", "byproducts"} | {k for k in rd if k.startswith("provenance_")}
    assert bd["externalParameters"]["recipe"]["content"] == TINY.read_text()
    names = {d["name"] for d in bd["resolvedDependencies"]}
    assert {"input:ethtool", "dataset-manifest", "tokenizer", "toolchain:python", "toolchain:torch",
            "toolchain:transformers", "toolchain:tokenizers", "toolchain:safetensors",
            "builder-source:provenance"} <= names
    gpl = next(d for d in bd["resolvedDependencies"] if d["name"] == "input:ethtool")
    assert gpl["annotations"]["license"] == "GPL-2.0-only" and gpl["annotations"]["selected_files"] == 3
    for k in ("startedOn", "finishedOn"):
        assert rd["metadata"][k].endswith("Z") and len(rd["metadata"][k]) == 20
    assert {b["name"] for b in rd["byproducts"]} == {"transcript.jsonl", "build.json", "dataset-manifest.json",
                                                         "fingerprint.json", "audit.json", "sbom.cdx.json",
                                                         "sbom.spdx3.json", "model.sig",  # ECDSA key: OMS too
                                                         "source.tar"}  # the corresponding source
    assert bd["internalParameters"]["determinism"]["seed"] == "1234"  # a string: may exceed 2^53
    assert parse_statement(st)[1] == []
    # The payload is RFC 8785 canonical JSON.
    import rfc8785
    assert rfc8785.dumps(st) == env.payload


# ---- the tamper matrix --------------------------------------------------------------------------

def _rewrite(att, fn):
    env = json.loads(att.read_text().splitlines()[0])
    fn(env)
    att.write_text(json.dumps(env) + "\n")


def _edit_payload(env, fn):
    st = json.loads(base64.b64decode(env["payload"]))
    fn(st)
    env["payload"] = base64.b64encode(json.dumps(st).encode()).decode()


def _resign(att, keys, fn):
    """Edit the statement and sign it again with the legitimate key (an insider's mistake)."""
    from provenance.attest.sign import envelope_line, load_signer, sign_envelope

    env = json.loads(att.read_text().splitlines()[0])
    st = json.loads(base64.b64decode(env["payload"]))
    fn(st)
    new = sign_envelope(json.dumps(st).encode(), env["payloadType"], [load_signer(keys / "signer.key")])
    att.write_bytes(envelope_line(new))


def _swap_digest(st):
    a, b = st["subject"][0], st["subject"][1]
    a["digest"], b["digest"] = b["digest"], a["digest"]
    files = st["predicate"]["runDetails"]["provenance_outputs"]["files"]
    files[a["name"]], files[b["name"]] = files[b["name"]], files[a["name"]]


def _flip_byte(path, offset=-1, mask=0x40):
    """Flip one bit of the last float32's high byte (sign and exponent): a gross change."""
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


TAMPER = {
    "weights-byte-flipped": (lambda d, k, o: _flip_byte(d / "model" / "model.safetensors"), "model-files", None),
    "config-edited": (lambda d, k, o: (d / "model" / "config.json").write_text(
        (d / "model" / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05')),
        "model-files", None),
    "weight-file-added": (lambda d, k, o: shutil.copy(d / "model" / "model.safetensors",
                                                      d / "model" / "extra.safetensors"), "unlisted-files", None),
    "file-removed": (lambda d, k, o: (d / "model" / "tokenizer.json").unlink(), "model-files", None),
    "payload-edited": (lambda d, k, o: _rewrite(d / "attestation.intoto.jsonl", lambda e: _edit_payload(
        e, lambda st: st["predicate"]["runDetails"]["builder"].update(id="https://evil.example/builder"))),
        "signature", None),
    "signature-edited": (lambda d, k, o: _rewrite(d / "attestation.intoto.jsonl", lambda e: e["signatures"][0].update(
        sig=base64.b64encode(bytes(64)).decode())), "signature", None),
    "wrong-key": (lambda d, k, o: None, "signature", "other.pub"),
    "payload-type-changed": (lambda d, k, o: _rewrite(d / "attestation.intoto.jsonl",
                                                      lambda e: e.update(payloadType="application/json")),
                             "payload-type", None),
    "subject-digest-swapped": (lambda d, k, o: _resign(d / "attestation.intoto.jsonl", k, _swap_digest),
                               "model-files", None),
    "replayed-other-build": (lambda d, k, o: shutil.copy(o / "attestation.intoto.jsonl",
                                                         d / "attestation.intoto.jsonl"), "model-files", None),
}


def test_untampered_copy_passes(signed, keys, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(signed["main"], d)
    code, obj = vjson(str(d / "attestation.intoto.jsonl"), "--key", str(keys / "signer.pub"), "--model",
                      str(d / "model"))
    assert code == 0 and obj["ok"], obj


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_tamper_matrix(signed, keys, tmp_path, case):
    tamper, expected, key = TAMPER[case]
    d = tmp_path / "copy"
    shutil.copytree(signed["main"], d)
    tamper(d, keys, signed["other"])
    code, obj = vjson(str(d / "attestation.intoto.jsonl"), "--key", str(keys / (key or "signer.pub")),
                      "--model", str(d / "model"))
    assert code == 1 and obj["ok"] is False, obj
    assert expected in failing(obj), (expected, obj)
    p = run_cli("verify", str(d / "attestation.intoto.jsonl"), "--key", str(keys / (key or "signer.pub")),
                "--model", str(d / "model"))
    assert p.returncode == 1 and f"FAIL  {expected}" in p.stdout and "verdict: FAILED" in p.stdout


def test_one_ulp_is_not_verified_but_is_reproduced_within_tolerance(signed, keys, store, tmp_path):
    """Exact by default: a one-ulp change fails `verified`; `--reproduced --inputs` calls it within
    tolerance; the fingerprint alone does not establish it."""
    d = tmp_path / "copy"
    shutil.copytree(signed["main"], d)
    _flip_byte(d / "model" / "model.safetensors", offset=-4, mask=0x01)  # lowest mantissa bit
    args = [str(d / "attestation.intoto.jsonl"), "--key", str(keys / "signer.pub"), "--model", str(d / "model")]
    code, obj = vjson(*args)
    assert code == 1 and failing(obj) == ["model-files"] and obj["result"] == "FAILED", obj
    code, obj = vjson_here(*args, "--reproduced", "--inputs", "--store", str(store))
    assert code == 0 and obj["verdict"] == "within tolerance" and obj["result"] == "reproduced (within tolerance)", obj
    detail = next(c["detail"] for c in obj["checks"] if c["check"] == "reproduced")
    assert "model.safetensors is not bitwise equal" in detail and "rel_l2~" in detail
    assert "drawn now" in next(c["detail"] for c in obj["checks"] if c["check"] == "recitation")
    p = cli_here("verify", *args, "--reproduced", "--inputs", "--store", str(store))
    assert p.returncode == 0 and p.stdout.strip().endswith("verdict: reproduced (within tolerance)")
    assert "verified" not in p.stdout.splitlines()[-1]
    code, obj = vjson_here(*args, "--reproduced")
    assert code == 1 and obj["result"] == "not established" and "can be steered" in json.dumps(obj), obj


def test_recipe_mismatch_fails(signed, keys, tmp_path):
    other = tmp_path / "other.toml"
    other.write_text(TINY.read_text() + "\n# edited\n")
    code, obj = vjson(str(signed["main"] / "attestation.intoto.jsonl"), "--key", str(keys / "signer.pub"),
                      "--recipe", str(other))
    assert code == 1 and failing(obj) == ["recipe"]


def test_inputs_are_rehashed(signed, keys, store):
    code, obj = vjson(str(signed["main"] / "attestation.intoto.jsonl"), "--key", str(keys / "signer.pub"),
                      "--inputs", "--store", str(store))
    assert code == 0, obj
    assert "manifest root" in next(c["detail"] for c in obj["checks"] if c["check"] == "inputs")


def test_policy_licences(signed, keys, tmp_path):
    att = str(signed["main"] / "attestation.intoto.jsonl")
    ok = tmp_path / "ok.toml"
    ok.write_text('[policy]\nrequired_licenses = ["GPL-2.0-only"]\nallowed_output_licenses = ["MIT"]\n')
    code, obj = vjson(att, "--key", str(keys / "signer.pub"), "--policy", str(ok))
    assert code == 0, obj
    bad = tmp_path / "bad.toml"
    bad.write_text('[policy]\nforbidden_licenses = ["GPL-2.0-only"]\nallowed_builders = ["https://ci.example/b"]\n')
    code, obj = vjson(att, "--key", str(keys / "signer.pub"), "--policy", str(bad))
    assert code == 1 and failing(obj) == ["builder-id"]
    typo = tmp_path / "typo.toml"
    typo.write_text('[policy]\nforbidden_licences = ["GPL-2.0-only"]\n')
    p = run_cli("verify", att, "--key", str(keys / "signer.pub"), "--policy", str(typo))
    assert p.returncode == 2 and "policy.forbidden_licences: unknown field" in p.stderr


def test_could_not_check_exits_2(signed, keys, tmp_path):
    p = run_cli("verify", str(tmp_path / "missing.jsonl"), "--key", str(keys / "signer.pub"))
    assert p.returncode == 2 and "cannot read attestation" in p.stderr
    p = run_cli("verify", str(signed["main"] / "attestation.intoto.jsonl"), "--key", str(tmp_path / "nokey.pub"))
    assert p.returncode == 2 and "cannot read public key" in p.stderr
    p = run_cli("verify", str(signed["main"] / "attestation.intoto.jsonl"))
    assert p.returncode == 2 and "--key" in p.stderr


def test_verify_imports_neither_torch_nor_transformers(signed, keys):
    out = signed["main"]
    code = ("import sys; from provenance._cli import verify_main; "
            f"rc = verify_main([{str(out / 'attestation.intoto.jsonl')!r}, '--key', {str(keys / 'signer.pub')!r}, "
            f"'--model', {str(out / 'model')!r}]); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'pydantic', "
            "'securesystemslib') or m.startswith(('provenance.builder', 'provenance.repro'))); "
            "print('HEAVY', heavy); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "HEAVY []" in p.stdout


def test_keygen_refuses_the_repo_and_overwrites(keys):
    p = run_cli("keygen", str(ROOT / "attestations" / "keys"))
    assert p.returncode == 2 and "inside the source tree" in p.stderr
    p = run_cli("keygen", str(keys), "--name", "signer")
    assert p.returncode == 2 and "already exists" in p.stderr
    assert oct((keys / "signer.key").stat().st_mode & 0o777) == "0o600"


def test_a_public_key_given_to_sign_is_named_as_such_before_any_work(signed, store, keys, tmp_path):
    """--key signs: handed the .pub (an easy slip), the build and the rebuild say so, exit 2,
    before anything is fetched or written, and without first warning that a public key is readable.
    A rebuild refused for its key or its output dir has not written its recipe there either."""
    out = tmp_path / "out"
    p = run_cli("build", str(TINY), "--out", str(out), "--key", str(keys / "p256.pub"), store=store)
    assert p.returncode == 2 and f"{keys / 'p256.pub'}: a public key, where the private key" in p.stderr, p.stderr
    assert "readable by group" not in p.stderr and not out.exists()
    p = run_cli("rebuild", str(tmp_path / "missing.intoto.jsonl"), "--key", str(keys / "p256.pub"))
    assert p.returncode == 2 and "--key is the private key that signs the verification summary" in p.stderr
    att = str(signed["main"] / "attestation.intoto.jsonl")
    p = run_cli("rebuild", att, "--attestation-key", str(keys / "signer.pub"), "--key", str(keys / "p256.pub"),
                "--out", str(out), store=store)
    assert p.returncode == 2 and "a public key, where the private key" in p.stderr and not out.exists(), p.stderr
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    p = run_cli("rebuild", att, "--attestation-key", str(keys / "signer.pub"), "--key", str(keys / "p256.key"),
                "--out", str(mine), store=store)
    assert p.returncode == 2 and "holds files this tool did not write" in p.stderr, p.stderr
    assert sorted(f.name for f in mine.iterdir()) == ["notes.txt"]
