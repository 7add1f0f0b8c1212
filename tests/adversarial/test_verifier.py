"""The adversarial suite: hostile attestations, model dirs and policies against verify-attestation.

Each case mutates a copy of a real signed build and runs the real command (in process). Every
case must end in exit 1 naming the failing check, or exit 2 where nothing could be checked, print
exactly one JSON object with --json, and never a traceback. "Signed but malicious" cases re-sign
their statement with the legitimate key: the signature holds, and the other checks must catch it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from provenance._cli import verify_main


def run(case, capsys, *extra: str) -> tuple[int, dict, str]:
    code = verify_main([*case.args, *extra, "--json"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, out + err
    obj = json.loads(out)  # exactly one JSON object, whatever happened
    return code, obj, err


def failing(obj: dict) -> list[str]:
    return [c["check"] for c in obj.get("checks", []) if not c["ok"]]


# ---- mutations --------------------------------------------------------------------------------------

def env_field(name, value):
    def f(c):
        e = c.envelope()
        e[name] = value
        c.write_envelope(e)
    return f


def env_drop(name):
    def f(c):
        e = c.envelope()
        del e[name]
        c.write_envelope(e)
    return f


def env_text(fn):
    def f(c):
        c.write_envelope(fn(c.att.read_text().strip()))
    return f


def second_line(key):
    def f(c):
        other = c.sign(base64.b64decode(c.envelope()["payload"]), key)
        c.att.write_text(c.att.read_text() + json.dumps(other) + "\n")
    return f


def sig_field(name, value):
    def f(c):
        e = c.envelope()
        e["signatures"][0][name] = value
        c.write_envelope(e)
    return f


def unsigned_edit(fn):
    def f(c):
        e = c.envelope()
        st = json.loads(base64.b64decode(e["payload"]))
        fn(st)
        e["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
        c.write_envelope(e)
    return f


def resigned(fn):
    return lambda c: c.resign(fn)


def resigned_raw(raw: bytes):
    return lambda c: c.resign(raw=raw)


def subject_name(name):
    def fn(st):
        old = st["subject"][0]["name"]
        st["subject"][0]["name"] = name
        files = st["predicate"]["runDetails"]["provenance_outputs"]["files"]
        files[name] = files.pop(old)
    return resigned(fn)


def recipe_param(**kw):
    def fn(st):
        st["predicate"]["buildDefinition"]["externalParameters"]["recipe"].update(kw)
    return resigned(fn)


def input_annotation(**kw):
    def fn(st):
        dep = next(d for d in st["predicate"]["buildDefinition"]["resolvedDependencies"]
                   if d["name"].startswith("input:"))
        dep["annotations"].update(kw)
    return resigned(fn)


def swap_subject_digests(st):
    a, b = st["subject"][0], st["subject"][1]
    a["digest"], b["digest"] = b["digest"], a["digest"]
    files = st["predicate"]["runDetails"]["provenance_outputs"]["files"]
    files[a["name"]], files[b["name"]] = files[b["name"]], files[a["name"]]


def flip(offset_from_middle=0, mask=0x01):
    def f(c):
        data = bytearray(c.weights.read_bytes())
        data[len(data) // 2 + offset_from_middle] ^= mask
        c.weights.write_bytes(bytes(data))
    return f


def append(n, then_resign=False):
    def f(c):
        with open(c.weights, "ab") as fh:
            fh.write(b"\0" * n)
        if then_resign:
            c.resign_files()
    return f


def rewrite_metadata(c):
    h, data = c.safetensors_parts()
    h["__metadata__"] = {"format": "pt", "injected": "x" * 40}
    c.write_safetensors(h, data)


def header_edit(fn, data_fn=None):
    """Rewrite the safetensors header (and data), then re-sign the new file digests."""
    def f(c):
        h, data = c.safetensors_parts()
        h = fn(h)
        c.write_safetensors(h, data_fn(data) if data_fn else data)
        c.resign_files()
    return f


def first_tensor(h):
    return sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])


def gap(h):
    """Shift every tensor by 4 bytes: a gap before the first, and the data grows by 4."""
    for k in first_tensor(h):
        a, b = h[k]["data_offsets"]
        h[k]["data_offsets"] = [a + 4, b + 4]
    return h


def overlap(h):
    """Point the second tensor at the first one's bytes (and shrink nothing): overlap."""
    names = first_tensor(h)
    a, b = h[names[0]]["data_offsets"]
    n = b - a
    start, end = h[names[1]]["data_offsets"]
    h[names[1]]["data_offsets"] = [a, a + n] if end - start == n else [a, a + end - start]
    return h


def wrong_shape(h):
    k = first_tensor(h)[0]
    h[k]["shape"] = [h[k]["shape"][0] + 1] + h[k]["shape"][1:]
    return h


def negative_shape(h):
    k = first_tensor(h)[0]
    h[k]["shape"] = [-1] + h[k]["shape"][1:]
    return h


def bad_dtype(h):
    h[first_tensor(h)[0]]["dtype"] = "F31"
    return h


def add_file(rel, content=b"x"):
    def f(c):
        p = c.model / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
    return f


def dir_symlink(c):
    outside = c.dir / "elsewhere"
    outside.mkdir()
    shutil.copy(c.weights, outside / "adapter_model.safetensors")
    os.symlink(outside, c.model / "adapter")


def file_symlink(c):
    outside = c.dir / "config-copy.json"
    shutil.copy(c.model / "config.json", outside)
    (c.model / "config.json").unlink()
    os.symlink(outside, c.model / "config.json")


def fifo(c):
    os.mkfifo(c.model / "pipe")


def policy(text: str | bytes):
    def f(c):
        p = c.dir / "policy.toml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        c.args += ["--policy", str(p)]
    return f


def with_args(*extra):
    def f(c):
        c.args += list(extra)
    return f


def both(*fns):
    def f(c):
        for fn in fns:
            fn(c)
    return f


def other_build(c):
    """The other key's statement over the same files, resigned: verified with the wrong key."""
    c.args[2] = str(c.keys / "other.pub")


def attestation_is(kind):
    def f(c):
        c.att.unlink()
        if kind == "fifo":
            os.mkfifo(c.att)
        elif kind == "dev-zero":
            os.symlink("/dev/zero", c.att)
        elif kind == "dir":
            c.att.mkdir()
        elif kind == "huge":
            with open(c.att, "wb") as fh:
                fh.truncate(65 << 20)
    return f


def tolerance_loosened(c):
    """Sign a fingerprint whose tolerances are huge, then scale the weights: the verifier's bounds hold."""
    def fn(st):
        st["predicate"]["runDetails"]["provenance_outputs"]["fingerprint"]["tolerances"].update(
            max_rel_l2=1e9, min_greedy_agreement=0.0, max_eval_loss_diff=1e9)
    c.resign(fn)
    h, data = c.safetensors_parts()
    import numpy as np
    arr = np.frombuffer(data, dtype="<f4").copy() * np.float32(3.0)
    c.write_safetensors(h, arr.tobytes())
    c.args.append("--reproduced")


def one_tensor_changed(c):
    """Only the final norm is changed (set to ones * 5): the total moves little, one tensor a lot."""
    import numpy as np
    h, data = c.safetensors_parts()
    a, b = h["model.norm.weight"]["data_offsets"]
    arr = bytearray(data)
    arr[a:b] = (np.ones((b - a) // 4, dtype="<f4") * np.float32(5.0)).tobytes()
    c.write_safetensors(h, bytes(arr))
    c.args.append("--reproduced")


HUGE_INT = "1" + "0" * 5000

CASES = {
    # envelope and file: nothing signed can be read (exit 1, envelope) or nothing could be checked (exit 2)
    "env-second-line-unknown-key": (second_line("other"), 1, "envelope"),
    "env-second-line-same-key": (second_line("signer"), 1, "envelope"),
    "env-empty-file": (env_text(lambda t: ""), 1, "envelope"),
    "env-not-json": (env_text(lambda t: t[:-5]), 1, "envelope"),
    "env-json-array": (env_text(lambda t: "[" + t + "]"), 1, "envelope"),
    "env-missing-payload": (env_drop("payload"), 1, "envelope"),
    "env-missing-signatures": (env_drop("signatures"), 1, "envelope"),
    "env-empty-signatures": (env_field("signatures", []), 1, "envelope"),
    "env-unsigned-mediaType-beside": (env_field("mediaType", "application/vnd.dev.sigstore.bundle.v0.3+json"),
                                      1, "envelope"),
    "env-payload-not-base64": (env_field("payload", "!!not base64!!"), 1, "envelope"),
    "env-payload-mixed-alphabets": (env_field("payload", "ab+_cd=="), 1, "envelope"),
    "env-sig-not-base64": (sig_field("sig", "***"), 1, "envelope"),
    "env-signature-extra-field": (sig_field("cert", "x"), 1, "envelope"),
    "env-keyid-is-a-list": (sig_field("keyid", ["a", "b"]), 1, "envelope"),
    "env-duplicate-json-key": (env_text(lambda t: t[:-1] + ', "payloadType": "application/json"}'), 1, "envelope"),
    "env-nan": (env_text(lambda t: t[:-1] + ', "x": NaN}'), 1, "envelope"),
    "env-infinity": (env_text(lambda t: t[:-1] + ', "x": -Infinity}'), 1, "envelope"),
    "env-huge-integer": (env_text(lambda t: t[:-1] + f', "x": {HUGE_INT}}}'), 1, "envelope"),
    "env-deep-nesting": (env_text(lambda t: t[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}"), 1, "envelope"),
    "env-payload-type-changed": (env_field("payloadType", "application/json"), 1, "payload-type"),
    "env-payload-type-case": (env_field("payloadType", "application/vnd.in-toto+JSON"), 1, "payload-type"),
    "env-payload-type-resigned": (lambda c: c.write_envelope(c.sign(base64.b64decode(c.envelope()["payload"]),
                                                                     payload_type="application/json")),
                                  1, "payload-type"),
    "sig-zeroed": (sig_field("sig", base64.b64encode(bytes(72)).decode()), 1, "signature"),
    "sig-unsigned-payload-edit": (unsigned_edit(lambda st: st["predicate"]["runDetails"]["builder"].update(
        id="https://evil.example/b")), 1, "signature"),
    "sig-wrong-key": (other_build, 1, "signature"),
    "sig-other-key-signed": (lambda c: c.resign(key="other"), 1, "signature"),
    "sig-threshold-2-one-key-twice": (with_args("--key", "KEY", "--threshold", "2"), 2, None),
    "att-fifo": (attestation_is("fifo"), 2, None),
    "att-dev-zero": (attestation_is("dev-zero"), 2, None),
    "att-directory": (attestation_is("dir"), 2, None),
    "att-over-size-limit": (attestation_is("huge"), 2, None),
    # signed but malicious statements
    "st-null": (resigned_raw(b"null"), 1, "statement"),
    "st-array": (resigned_raw(b"[]"), 1, "statement"),
    "st-string": (resigned_raw(b'"hello"'), 1, "statement"),
    "st-not-json": (resigned_raw(b"{"), 1, "statement"),
    "st-nan": (resigned_raw(b'{"_type": NaN}'), 1, "statement"),
    "st-duplicate-keys": (lambda c: c.resign(raw=json.dumps(c.statement())[:-1].encode()
                                             + b', "_type": "https://in-toto.io/Statement/v0.1"}'), 1, "statement"),
    "st-huge-integer": (lambda c: c.resign(raw=json.dumps(c.statement())[:-1].encode()
                                           + f', "x": {HUGE_INT}}}'.encode()), 1, "statement"),
    "st-wrong-type": (resigned(lambda st: st.update(_type="https://in-toto.io/Statement/v0.1")), 1, "statement-type"),
    "st-wrong-predicate-type": (resigned(lambda st: st.update(predicateType="https://slsa.dev/provenance/v0.2")),
                                1, "predicate-type"),
    "st-no-subject": (resigned(lambda st: st.pop("subject")), 1, "slsa-fields"),
    "st-empty-subject": (resigned(lambda st: st.update(subject=[])), 1, "slsa-fields"),
    "st-duplicate-subject": (resigned(lambda st: st["subject"].append(dict(st["subject"][0]))), 1, "slsa-fields"),
    "st-subject-dotdot": (subject_name("../config.json"), 1, "slsa-fields"),
    "st-subject-absolute": (subject_name("/etc/passwd"), 1, "slsa-fields"),
    "st-subject-backslash": (subject_name("sub\\config.json"), 1, "slsa-fields"),
    "st-subject-nul": (subject_name("config.json\x00.txt"), 1, "slsa-fields"),
    "st-subject-not-nfc": (subject_name("cafe\u0301.json"), 1, "slsa-fields"),
    "st-subject-dot-component": (subject_name("./config.json"), 1, "slsa-fields"),
    "st-subject-empty-component": (subject_name("sub//config.json"), 1, "slsa-fields"),
    "st-subject-no-sha256": (resigned(lambda st: st["subject"][0].update(digest={"sha512": "ab" * 64})),
                             1, "slsa-fields"),
    "st-subject-uppercase-hex": (resigned(lambda st: st["subject"][0]["digest"].update(
        sha256=st["subject"][0]["digest"]["sha256"].upper())), 1, "slsa-fields"),
    "st-files-and-subjects-differ": (resigned(lambda st: st["predicate"]["runDetails"]["provenance_outputs"]["files"]
                                              .pop("config.json")), 1, "slsa-fields"),
    "st-unknown-external-parameter": (resigned(lambda st: st["predicate"]["buildDefinition"]["externalParameters"]
                                               .update(extra_flag="--trust-remote-code")), 1, "slsa-fields"),
    "st-missing-run-details": (resigned(lambda st: st["predicate"].pop("runDetails")), 1, "slsa-fields"),
    "st-bad-timestamp": (resigned(lambda st: st["predicate"]["runDetails"]["metadata"].update(startedOn="yesterday")),
                         1, "slsa-fields"),
    "st-recipe-digest-only-unknown-algorithms": (recipe_param(digest={"md5": "ab" * 16}), 1, "slsa-fields"),
    "st-recipe-content-edited": (recipe_param(content="[recipe]\nname = 'evil'\n"), 1, "recipe-embedded"),
    "st-recipe-blake3-only-mismatch": (recipe_param(digest={"blake3": "0" * 64}), 1, "recipe-embedded"),
    "st-builder-not-allowed": (resigned(lambda st: st["predicate"]["runDetails"]["builder"].update(
        id="https://evil.example/builder")), 1, "builder-id"),
    "st-build-type-unknown": (resigned(lambda st: st["predicate"]["buildDefinition"].update(
        buildType="https://evil.example/bt")), 1, "build-type"),
    "st-subject-digests-swapped": (resigned(swap_subject_digests), 1, "model-files"),
    # model dirs
    "md-one-bit-in-the-middle": (flip(), 1, "model-files"),
    "md-metadata-rewritten": (rewrite_metadata, 1, "model-files"),
    "md-210-bytes-appended": (append(210), 1, "model-files"),
    "md-appended-and-resigned": (append(210, then_resign=True), 1, "safetensors"),
    "md-tensor-gap-resigned": (header_edit(gap, lambda d: b"\0" * 4 + d), 1, "safetensors"),
    "md-tensor-overlap-resigned": (header_edit(overlap), 1, "safetensors"),
    "md-shape-size-mismatch-resigned": (header_edit(wrong_shape), 1, "safetensors"),
    "md-negative-shape-resigned": (header_edit(negative_shape), 1, "safetensors"),
    "md-unknown-dtype-resigned": (header_edit(bad_dtype), 1, "safetensors"),
    "md-header-past-eof-resigned": (lambda c: (c.weights.write_bytes((10 ** 6).to_bytes(8, "little") + b"{}"),
                                               c.resign_files()), 1, "safetensors"),
    "md-header-duplicate-keys-resigned": (lambda c: (c.write_safetensors(
        c.weights.read_bytes()[8:8 + int.from_bytes(c.weights.read_bytes()[:8], "little")][:-1]
        + b', "__metadata__": {"a": "b"}}', c.safetensors_parts()[1]), c.resign_files()), 1, "safetensors"),
    "md-chat-template-added": (add_file("chat_template.jinja", b"{{ evil }}"), 1, "unlisted-files"),
    "md-modeling-py-added": (add_file("modeling_llama.py", b"import os\n"), 1, "unlisted-files"),
    "md-hidden-file-added": (add_file(".hidden"), 1, "unlisted-files"),
    "md-nested-file-added": (add_file("sub/dir/extra.json", b"{}"), 1, "unlisted-files"),
    "md-pickle-weights-added": (add_file("pytorch_model.bin"), 1, "unlisted-files"),
    "md-keras-weights-added": (add_file("model.keras"), 1, "unlisted-files"),
    "md-dir-symlink-with-adapter": (dir_symlink, 1, "unlisted-files"),
    "md-config-replaced-by-symlink": (file_symlink, 1, "unlisted-files"),
    "md-fifo-added": (fifo, 1, "unlisted-files"),
    "md-file-removed": (lambda c: (c.model / "tokenizer.json").unlink(), 1, "model-files"),
    "md-config-edited": (lambda c: (c.model / "config.json").write_text(
        (c.model / "config.json").read_text().replace("silu", "gelu")), 1, "model-files"),
    # policies
    "pol-forbidden-inside-an-or": (both(input_annotation(license="GPL-2.0-only OR MIT", file_licenses=[]),
                                        policy('[policy]\nforbidden_licenses = ["GPL-2.0-only"]\n')), 1, "policy"),
    "pol-forbidden-other-case": (policy('[policy]\nforbidden_licenses = ["gpl-2.0-only"]\n'), 1, "policy"),
    "pol-forbidden-with-exception": (both(input_annotation(license="GPL-2.0-only WITH Linux-syscall-note",
                                                           file_licenses=[]),
                                          policy('[policy]\nforbidden_licenses = ["GPL-2.0-only"]\n')), 1, "policy"),
    "pol-input-licence-not-spdx": (both(input_annotation(license="GPL-2.0-only OR (", file_licenses=[]),
                                        policy("[policy]\n")), 1, "policy"),
    "pol-output-not-allowed": (policy('[policy]\nallowed_output_licenses = ["Apache-2.0"]\n'), 1, "policy"),
    "pol-required-absent": (policy('[policy]\nrequired_licenses = ["MIT"]\n'), 1, "policy"),
    "pol-builder-not-allowed": (policy('[policy]\nallowed_builders = ["https://ci.example/b"]\n'), 1, "builder-id"),
    "pol-unknown-field": (policy('[policy]\nforbidden_licences = ["GPL-2.0-only"]\n'), 2, None),
    "pol-not-utf8": (policy(b"[policy]\nrequired_licenses = [\"\xff\"]\n"), 2, None),
    "pol-bound-not-finite": (policy("[reproduced]\nmax_rel_l2 = inf\n"), 2, None),
    # the reproduced question
    "rep-attested-tolerances-cannot-loosen": (tolerance_loosened, 1, "reproduced"),
    "rep-one-tensor-far": (one_tensor_changed, 1, "reproduced"),
    "rep-config-edited": (both(lambda c: (c.model / "config.json").write_text(
        (c.model / "config.json").read_text().replace("silu", "gelu")), with_args("--reproduced")), 1, "model-files"),
    "rep-extra-file": (both(add_file("modeling_llama.py"), with_args("--reproduced")), 1, "unlisted-files"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input(name, case, capsys):
    mutate, want_code, want_check = CASES[name]
    if name == "sig-threshold-2-one-key-twice":
        case.args[2:2] = []
        mutate = with_args("--key", case.args[2], "--threshold", "2")
    mutate(case)
    code, obj, err = run(case, capsys)
    assert code == want_code, (name, obj, err)
    assert obj["ok"] is False
    if want_code == 1:
        assert want_check in failing(obj), (name, obj)
        assert obj["result"] in ("FAILED", "diverged")
        assert "verified" not in obj["result"]
    else:
        assert obj["error"] and err.startswith("error: "), err


def test_there_are_at_least_sixty_cases():
    assert len(CASES) >= 60


# ---- what must keep passing ---------------------------------------------------------------------------

def test_untouched_copy_is_verified(case, capsys):
    code, obj, _ = run(case, capsys)
    assert code == 0 and obj["result"] == "verified", obj
    assert {"model-files", "unlisted-files", "safetensors", "recipe-embedded"} <= {c["check"] for c in obj["checks"]}


def test_bogus_signature_with_the_same_keyid_does_not_drop_the_valid_one(case, capsys):
    e = case.envelope()
    e["signatures"].append({"keyid": e["signatures"][0].get("keyid", ""), "sig": base64.b64encode(bytes(64)).decode()})
    case.write_envelope(e)
    code, obj, _ = run(case, capsys)
    assert code == 0, obj


def test_signature_without_keyid_is_tried_against_every_key(case, capsys):
    e = case.envelope()
    for s in e["signatures"]:
        s.pop("keyid", None)
    case.write_envelope(e)
    code, obj, _ = run(case, capsys)
    assert code == 0, obj
    case.args += ["--key", str(case.keys / "other.pub")]  # the right key second
    case.args[2] = str(case.keys / "other.pub")
    case.args[-1] = str(case.keys / "signer.pub")
    code, obj, _ = run(case, capsys)
    assert code == 0, obj


def test_url_safe_base64_is_accepted(case, capsys):
    e = case.envelope()
    e["payload"] = base64.urlsafe_b64encode(base64.b64decode(e["payload"])).decode().rstrip("=")
    case.write_envelope(e)
    code, obj, _ = run(case, capsys)
    assert code == 0, obj


def test_the_same_key_counts_once_towards_the_threshold(case, capsys):
    """Two signatures by one key, two --key options naming keys of which one signed: threshold 2 fails."""
    st_payload = base64.b64decode(case.envelope()["payload"])
    e = case.sign(st_payload)
    e["signatures"] = e["signatures"] + case.sign(st_payload)["signatures"]
    case.write_envelope(e)
    case.args += ["--key", str(case.keys / "other.pub"), "--threshold", "2"]
    code, obj, _ = run(case, capsys)
    assert code == 1 and failing(obj) == ["signature"], obj


def test_forbidden_or_expression_is_named(case, capsys):
    CASES["pol-forbidden-inside-an-or"][0](case)
    code, obj, _ = run(case, capsys)
    detail = next(c["detail"] for c in obj["checks"] if c["check"] == "policy")
    assert "forbidden licence GPL-2.0-only appears in the input licence expression 'GPL-2.0-only OR MIT'" in detail


# ---- findings of the second hostile-input round that need the store ----------------------------------

def test_licence_policy_uses_the_licences_rederived_from_the_inputs(case, capsys, store):
    """A statement re-signed to say the inputs are MIT passes a GPL ban on its own word; with --inputs
    the licences come from the re-hashed files, and the ban holds."""
    input_annotation(license="MIT", file_licenses=["MIT"])(case)
    policy('[policy]\nforbidden_licenses = ["GPL-2.0-only"]\n')(case)
    code, obj, _ = run(case, capsys)
    assert code == 0, obj
    code, obj, _ = run(case, capsys, "--inputs", "--store", str(store))
    assert code == 1 and failing(obj) == ["policy"], obj
    detail = next(c["detail"] for c in obj["checks"] if c["check"] == "policy")
    assert "re-derived from the inputs" not in detail and "GPL-2.0-only" in detail


def test_inputs_missing_from_the_store_name_the_right_remedy(case, capsys, tmp_path):
    code, obj, _ = run(case, capsys, "--inputs", "--store", str(tmp_path / "empty"))
    detail = next(c["detail"] for c in obj["checks"] if c["check"] == "inputs")
    assert code == 2 and "provenance fetch" in detail  # could not check: exit 2 (round three, 14)
    assert "--offline" not in detail and "--input " not in detail, detail


def test_rebuild_refuses_an_attestation_whose_recipe_does_not_match_its_digest(case, capsys, tmp_path):
    from provenance._cli import main

    recipe_param(digest={"blake3": "0" * 64})(case)
    code = main(["rebuild", str(case.att), "--attestation-key", str(case.keys / "signer.pub"),
                 "--out", str(tmp_path / "rb")])
    err = capsys.readouterr().err
    assert code == 1 and "recipe-embedded" in err and "Traceback" not in err
    assert not (tmp_path / "rb" / "model").exists()


@pytest.mark.parametrize("name", ["model.pt2", "model.keras", "saved_model.pb", "weights.npy"])
def test_unlisted_weight_formats_are_named_as_weights(case, capsys, name):
    add_file(name)(case)
    code, obj, _ = run(case, capsys)
    detail = next(c["detail"] for c in obj["checks"] if c["check"] == "unlisted-files")
    assert code == 1 and f"{name}: weights, not among the signed subjects" in detail, detail


# ---- the console script starts hashing before it parses its arguments -----------------------------------

def _console(case, *args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "verify-attestation"
    return subprocess.run([str(script), str(case.att), "--key", str(case.keys / "signer.pub"), *args, "--json"],
                          capture_output=True, text=True)


@pytest.mark.parametrize("form", ["--model DIR", "--model=DIR"])
def test_console_script_verifies_with_either_model_form(case, form):
    args = ["--model", str(case.model)] if form == "--model DIR" else [f"--model={case.model}"]
    p = _console(case, *args)
    assert p.returncode == 0 and json.loads(p.stdout)["result"] == "verified", p.stdout + p.stderr


def test_console_script_uses_the_model_argparse_chose_not_the_one_hashed_early(case, tmp_path):
    # argparse accepts the abbreviation --mode and keeps the last option; the early scan sees only --model
    good = tmp_path / "good"
    shutil.copytree(case.model, good)
    with open(case.weights, "r+b") as f:
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 1]))
    p = _console(case, "--model", str(case.model), "--mode", str(good))
    assert p.returncode == 0 and json.loads(p.stdout)["result"] == "verified", p.stdout + p.stderr
    p = _console(case, "--model", str(good), "--mode", str(case.model))
    assert p.returncode == 1 and "model-files" in failing(json.loads(p.stdout)), p.stdout


def test_console_script_starts_hashing_before_the_heavy_imports(case):
    """What keeps verify-attestation near b3sum's speed (docs/benchmarks.md), held as facts about
    the modules it loads rather than as a timing: hashing starts before pathlib, and the exact
    path never loads hashlib's second OpenSSL, shutil or traceback of its own accord. (cryptography is used
    through its public API only, whatever that loads, dataclasses among it: docs/benchmarks.md.)"""
    script = Path(sys.executable).parent / "verify-attestation"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPROFILEIMPORTTIME"}
    p = subprocess.run([sys.executable, "-X", "importtime", str(script), str(case.att), "--key",
                        str(case.keys / "signer.pub"), "--model", str(case.model)],
                       capture_output=True, text=True, env=env, check=False)
    assert p.returncode == 0 and p.stdout.strip().endswith("verdict: verified"), p.stdout + p.stderr
    order = [line.rsplit("|", 1)[1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")]
    assert order.index("provenance._internal.prefetch") < order.index("pathlib"), order
    loaded = set(order)
    avoided = {"hashlib", "shutil", "traceback"}
    assert loaded.isdisjoint(avoided), sorted(loaded & avoided)


@pytest.mark.parametrize("columns", ["60", None])
def test_console_script_help_wraps_to_the_terminal_width(columns):
    script = Path(sys.executable).parent / "verify-attestation"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns:
        env["COLUMNS"] = columns
    p = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=env, check=False)
    widest = max(len(line) for line in p.stdout.splitlines())
    assert p.returncode == 0 and "--reproduced" in p.stdout
    assert widest <= (int(columns) if columns else 80) - 2 and widest > (40 if columns else 60), widest


def test_prefetch_take_matches_dir_and_digest_set(tmp_path):
    from provenance._internal import prefetch

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.bin").write_bytes(b"abc")
    prefetch.start_from_argv(["att.jsonl", "--model", str(tmp_path / "m")])
    early = prefetch._early
    assert early is not None
    assert prefetch.take(tmp_path / "m", sha256=True) is not early  # blake3 only was hashed early
    prefetch.start_from_argv(["att.jsonl", f"--model={tmp_path / 'm'}"])
    early = prefetch._early
    assert prefetch.take(tmp_path / "m", sha256=False) is early
    prefetch.start_from_argv(["att.jsonl", "--", "--model", str(tmp_path / "m")])
    assert prefetch._early is None
