"""Reproducibility verdicts with real builds of the tiny recipe: CPU capability, learning rate,
world size, the fingerprint, transcripts, the matrix, rebuild with a VSA, and the gate."""

from __future__ import annotations

import base64
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from ..conftest import TINY, build_json, cli_here, last_line, run_cli, sign_as_is

NATIVE = torch.backends.cpu.get_cpu_capability().lower()
# A level below the native one gives other bits: the local stand-in for "another GPU".
OTHER = "default" if NATIVE != "default" else None


@pytest.fixture(scope="module")
def builds(store, keys, tmp_path_factory, tiny_build_copy, tiny_at_level):
    """The tiny recipe ("native": the session's plain build, its attestations signed again by this module's
    key, as its builder would have), and built again with another learning rate, the all-reduce
    reduction on two ranks and, where the CPU offers one, at a lower ATen level (the session's build)."""
    base = tmp_path_factory.mktemp("repro")
    lr_recipe = base / "tiny-lr.toml"
    lr_recipe.write_text(TINY.read_text().replace("lr = 1e-2", "lr = 5e-2"))
    all_reduce = base / "tiny-all-reduce.toml"
    all_reduce.write_text(TINY.read_text().replace('reduction = "canonical"', 'reduction = "all-reduce"'))
    plan = {"lr": (lr_recipe, []), "all-reduce-2": (all_reduce, ["--world-size", "2"])}
    outs = {"native": tiny_build_copy("repro-native")}
    if OTHER:
        outs["other-cpu"] = (tiny_at_level(OTHER), None)
    for att in ("attestation.intoto.jsonl", "audit.intoto.jsonl"):
        sign_as_is(outs["native"][0] / att, keys / "k.key")
    for label, (recipe, extra) in plan.items():
        out = base / label
        p = run_cli("build", str(recipe), "--out", str(out), "--key", str(keys / "k.key"), "--no-cache", *extra,
                    store=store)
        assert p.returncode == 0, (label, p.stderr[-3000:])
        outs[label] = (out, p)
    return outs


def compare(a, b):
    p = cli_here("compare", str(a), str(b), "--json")
    return p.returncode, json.loads(p.stdout)


def diverge(a, b):
    p = run_cli("diverge", str(a / "transcript.jsonl"), str(b / "transcript.jsonl"), "--json")
    return p.returncode, json.loads(p.stdout)


@pytest.mark.skipif(OTHER is None, reason="this CPU has no instruction-set level below its native one")
def test_other_cpu_capability_is_within_tolerance(builds):
    (a, _), (b, _) = builds["native"], builds["other-cpu"]
    assert build_json(b)["determinism"]["cpu_capability"] == OTHER.upper()
    code, res = compare(a, b)
    assert code == 0 and res["verdict"] == "within tolerance", res
    assert res["overall"]["bitwise_tensors"] < res["overall"]["tensors"]
    assert 0 < res["overall"]["rel_l2"] < res["bounds"]["max_rel_l2"]
    code, d = diverge(a, b)
    assert code == 1 and d["identical"] is False and isinstance(d["step"], int) and d["field"] in (
        "loss", "grad_norm", "params")


@pytest.mark.skipif(OTHER is None, reason="this CPU has no instruction-set level below its native one")
def test_fingerprint_judges_other_hardware_without_the_reference_weights(builds, keys, store, tmp_path):
    (a, _), (b, _) = builds["native"], builds["other-cpu"]
    lone = tmp_path / "candidate-model"
    shutil.copytree(b / "model", lone)  # only the candidate's files: no reference weights anywhere near
    p = cli_here("verify", str(a / "attestation.intoto.jsonl"), "--key", str(keys / "k.pub"), "--model", str(lone),
                 "--reproduced", "--inputs", "--store", str(store), "--json")
    res = json.loads(p.stdout)
    assert p.returncode == 0 and res["verdict"] == "within tolerance", res
    assert res["result"] == "reproduced (within tolerance)"
    p = run_cli("verify", str(a / "attestation.intoto.jsonl"), "--key", str(keys / "k.pub"), "--model", str(lone))
    assert p.returncode == 1 and "FAIL  model-files" in p.stdout and p.stdout.strip().endswith("verdict: FAILED")


def test_other_learning_rate_diverges(builds, keys):
    (a, _), (b, _) = builds["native"], builds["lr"]
    code, res = compare(a, b)
    assert code == 1 and res["verdict"] == "diverged" and res["reasons"]
    p = cli_here("verify", str(a / "attestation.intoto.jsonl"), "--key", str(keys / "k.pub"), "--model",
                 str(b / "model"), "--reproduced", "--json")
    assert p.returncode == 1 and json.loads(p.stdout)["verdict"] == "diverged"
    assert json.loads(p.stdout)["result"] == "diverged"
    code, d = diverge(a, b)
    assert code == 1 and d["step"] == 0 and d["field"] == "lr"


def test_under_all_reduce_the_world_size_decides_the_bits(builds):
    """reduction = "all-reduce" (DistributedDataParallel): the world size is part of the determinism record and
    the bits are another build's; the canonical reduction's invariance is tests/cli/test_topology.py's."""
    (a, _), (b, pb) = builds["native"], builds["all-reduce-2"]
    assert last_line(pb.stdout).startswith("weights blake3:")
    rec = build_json(b)
    assert rec["distributed"] == {"world_size": 2, "backend": "gloo", "threads_per_rank": 1}
    assert rec["determinism"]["world_size"] == 2 and "reduction" not in rec["determinism"]
    st = json.loads(base64.b64decode(json.loads((b / "attestation.intoto.jsonl").read_text())["payload"]))
    assert st["predicate"]["buildDefinition"]["internalParameters"]["distributed"]["world_size"] == 2
    code, d = diverge(a, b)
    assert code == 1 and d["field"] != "samples", "the global batch must not depend on the world size"


def test_tampered_fingerprint_is_caught_by_the_signature(builds, keys, tmp_path):
    out, _ = builds["native"]
    att = tmp_path / "att.jsonl"
    env = json.loads((out / "attestation.intoto.jsonl").read_text())
    st = json.loads(base64.b64decode(env["payload"]))
    st["predicate"]["runDetails"]["provenance_outputs"]["fingerprint"]["tolerances"]["max_rel_l2"] = 10.0
    env["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
    att.write_text(json.dumps(env) + "\n")
    p = run_cli("verify", str(att), "--key", str(keys / "k.pub"), "--model", str(out / "model"), "--json")
    res = json.loads(p.stdout)
    assert p.returncode == 1 and [c["check"] for c in res["checks"] if not c["ok"]] == ["signature"]


def test_diverge_on_unreadable_or_broken_transcripts(builds, tmp_path):
    out, _ = builds["native"]
    broken = tmp_path / "t.jsonl"
    lines = (out / "transcript.jsonl").read_text().splitlines()
    lines[3] = lines[3].replace('"loss":"', '"loss":"0x1')
    broken.write_text("\n".join(lines) + "\n")
    p = run_cli("diverge", str(out / "transcript.jsonl"), str(broken))
    assert p.returncode == 2 and "hash chain broken" in p.stderr
    p = run_cli("diverge", str(out / "transcript.jsonl"), str(tmp_path / "missing.jsonl"))
    assert p.returncode == 2
    p = run_cli("diverge", str(out), str(out / "transcript.jsonl"), "--json")  # a build dir stands for its transcript
    assert p.returncode == 0 and json.loads(p.stdout)["identical"] is True, p.stdout + p.stderr
    p = run_cli("diverge", str(out), str(tmp_path))
    assert p.returncode == 2 and f"{tmp_path}: a directory without transcript.jsonl" in p.stderr, p.stderr


def test_matrix_groups_cells_and_skips_missing_levels(store, tmp_path):
    levels = ["default", "avx512"]
    p = run_cli("matrix", str(TINY), "--vary", "threads=1,2", "--vary", f"cpu={','.join(levels)}",
                "--out", str(tmp_path / "m"), "--json", store=store)
    res = json.loads(p.stdout)
    assert p.returncode == 0, res
    cells = res["cells"]
    assert len(cells) == 4 and cells[0]["settings"] == {"threads": "1", "cpu": "default"}
    t1, t2 = cells[0], cells[2]  # threads 1 and 2 at the default level: bitwise
    assert t1["status"] == t2["status"] == "built" and t1["weights"] == t2["weights"] and t2["verdict"] == "bitwise"
    for c in (cells[1], cells[3]):
        if NATIVE != "avx512":
            assert c["status"] == "skipped" and "offers only" in c["reason"]
        else:
            assert c["status"] == "built" and c["verdict"] == "within tolerance"
    assert (tmp_path / "m" / "matrix-loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = run_cli("matrix", str(TINY), "--vary", "cores=1,2")
    assert p.returncode == 2 and "unknown axis 'cores'" in p.stderr


def test_rebuild_writes_a_signed_vsa(builds, keys, store, tmp_path):
    out, _ = builds["native"]
    reb = tmp_path / "rebuild"
    # (On two ranks, where the reference was built on one: tests/cli/test_topology.py.)
    p = run_cli("rebuild", str(out / "attestation.intoto.jsonl"), "--attestation-key", str(keys / "k.pub"),
                "--out", str(reb), "--key", str(keys / "k.key"), "--offline", "--json", store=store)
    res = json.loads(p.stdout)
    assert p.returncode == 0 and res["verdict"] == "bitwise" and res["verificationResult"] == "PASSED", res
    assert "bitwise required" in res["stack"] or "same CPU" in res["stack"], res["stack"]
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    env = Envelope.from_dict(json.loads((reb / "vsa.intoto.jsonl").read_text()))
    key = SSlibKey.from_crypto(load_pem_public_key((keys / "k.pub").read_bytes()))
    env.verify([key], 1)
    vsa = json.loads(env.payload)
    assert vsa["predicateType"] == "https://slsa.dev/verification_summary/v1"
    pred = vsa["predicate"]
    assert pred["verificationResult"] == "PASSED" and pred["slsaVersion"] == "1.2"
    assert pred["provenance_verdict"]["verdict"] == "bitwise" and pred["verifier"]["id"]
    assert pred["verifier"]["version"]["provenance"] and pred["timeVerified"].endswith("Z")
    import hashlib

    assert pred["inputAttestations"][0]["digest"]["sha256"] == \
        hashlib.sha256((out / "attestation.intoto.jsonl").read_bytes()).hexdigest()
    assert pred["verifiedLevels"] == ["SLSA_BUILD_LEVEL_1", "SLSA_BUILD_REPRODUCED"]
    # verify-attestation reads VSAs: signature, the summary's fields, PASSED, and the files exactly.
    p = run_cli("verify", str(reb / "vsa.intoto.jsonl"), "--key", str(keys / "k.pub"), "--model", str(reb / "model"),
                "--json")
    checks = {c["check"]: c for c in json.loads(p.stdout)["checks"]}
    assert p.returncode == 0 and checks["vsa"]["ok"] and "SLSA_BUILD_REPRODUCED" in checks["vsa-result"]["detail"]
    assert checks["model-files"]["ok"] and checks["unlisted-files"]["ok"]
    # A policy cannot be applied to a VSA (no builder, licences or audit to judge): refused, not passed over.
    pol = tmp_path / "p.toml"
    pol.write_text("[policy]\nallowed_builders = []\n")
    p = run_cli("verify", str(reb / "vsa.intoto.jsonl"), "--key", str(keys / "k.pub"), "--model", str(reb / "model"),
                "--policy", str(pol), "--json")
    assert p.returncode == 2 and "--policy cannot be applied" in json.loads(p.stdout)["error"], p.stdout
    (reb / "model" / "extra.py").write_text("import os")
    p = run_cli("verify", str(reb / "vsa.intoto.jsonl"), "--key", str(keys / "k.pub"), "--model", str(reb / "model"))
    assert p.returncode == 1 and "extra.py" in p.stdout


@pytest.mark.skipif(OTHER is None, reason="no second ATen level on this CPU")
def test_a_rebuild_within_tolerance_is_not_reproduced_in_its_vsa(builds, keys, store, tmp_path):
    out, _ = builds["native"]
    reb = tmp_path / "rebuild-other"
    p = run_cli("rebuild", str(out / "attestation.intoto.jsonl"), "--attestation-key", str(keys / "k.pub"),
                "--out", str(reb), "--key", str(keys / "k.key"), "--offline", "--cpu-capability", OTHER, "--json",
                store=store)
    res = json.loads(p.stdout)
    assert p.returncode == 0 and res["verdict"] == "within tolerance", res
    vsa = json.loads(base64.b64decode(json.loads((reb / "vsa.intoto.jsonl").read_text())["payload"]))
    assert vsa["predicate"]["verificationResult"] == "PASSED"
    assert vsa["predicate"]["verifiedLevels"] == ["SLSA_BUILD_LEVEL_1"]
    p = run_cli("verify", str(reb / "vsa.intoto.jsonl"), "--key", str(keys / "k.pub"), "--json")
    assert p.returncode == 0, p.stdout


def test_gate_passes_bitwise_and_writes_junit(builds, keys, store, tmp_path):
    out, _ = builds["native"]
    junit = tmp_path / "junit.xml"
    # The job's builder identity (docs/ci.md) must not change whom the gate trusts for the reference.
    ci_id = "https://github.com/example/repo/.github/workflows/reproducibility.yml"
    p = run_cli("gate", "--recipe", str(TINY), "--reference", str(out / "attestation.intoto.jsonl"),
                "--attestation-key", str(keys / "k.pub"), "--out", str(tmp_path / "g"), "--junit", str(junit),
                "--key", str(keys / "k.key"), "--reprotest", store=store, env={"PROVENANCE_BUILDER_ID": ci_id})
    assert p.returncode == 0, p.stdout + p.stderr
    envelope = json.loads((tmp_path / "g" / "attestation.intoto.jsonl").read_text())
    rebuilt = json.loads(base64.b64decode(envelope["payload"]))
    assert rebuilt["predicate"]["runDetails"]["builder"]["id"] == ci_id
    assert "bitwise required" in p.stdout and p.stdout.strip().endswith("gate: PASSED: reproduced (bitwise)")
    assert "PASS  reprotest: every variation at once:" in p.stdout and "weights equal, transcript equal" in p.stdout
    varied = [b.parent for b in (tmp_path / "g-reprotest").rglob("build.json")]
    assert len(varied) == 1 and " " in str(varied[0].relative_to(tmp_path)), varied  # the build path varied
    if shutil.which("faketime"):
        assert build_json(varied[0])["started"].startswith("2031-07-1")  # so did the clock
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("failures") == "0" and int(suite.get("tests")) >= 5


def test_gate_fails_on_a_changed_recipe(builds, keys, store, tmp_path):
    out, _ = builds["native"]
    junit = tmp_path / "junit.xml"
    p = run_cli("gate", "--recipe", str(builds["lr"][0].parent / "tiny-lr.toml"), "--reference",
                str(out / "attestation.intoto.jsonl"), "--attestation-key", str(keys / "k.pub"),
                "--out", str(tmp_path / "g"), "--junit", str(junit), "--key", str(keys / "k.key"), store=store)
    assert p.returncode == 1 and "FAIL  recipe matches the reference" in p.stdout
    assert "FAIL  rebuild: not started" in p.stdout and p.stdout.strip().endswith("gate: FAILED: FAILED"), p.stdout
    assert not (tmp_path / "g").exists()  # checked before the build, not after minutes of it
    assert ET.parse(junit).getroot().find("testsuite").get("failures") != "0"


def test_matrix_varies_the_environment_like_reprotest(store, tmp_path):
    """Shuffled listings alone and a fake clock alone: the same weights and transcript as the plain build.
    (Every variation at once, reprotest's default, is the gate's `--reprotest` build: its test above.)"""
    p = run_cli("matrix", str(TINY), "--vary", "env=baseline,file-order,clock", "--out", str(tmp_path / "m"),
                "--json", store=store)
    res = json.loads(p.stdout)
    assert p.returncode == 0, res
    cells = res["cells"]
    built = [c for c in cells if c["status"] == "built"]
    expected = 3 if shutil.which("faketime") else 2
    assert len(built) == expected and all(c["verdict"] == "bitwise" for c in built), cells
    assert len({c["weights"] for c in built}) == 1 and len({c["transcript"] for c in built}) == 1
    if shutil.which("faketime"):
        assert json.loads((Path(cells[2]["out"]) / "build.json").read_text())["started"].startswith("2031-07-1")
    p = run_cli("matrix", str(TINY), "--vary", "env=moon-phase")
    assert p.returncode == 2 and "env variation 'moon-phase'" in p.stderr


def test_shuffled_listings_really_shuffle(tmp_path, monkeypatch):
    from provenance._internal.listing import SHUFFLE_ENV, tree

    for i in range(30):
        (tmp_path / f"f{i:02d}").write_text("x")
    plain = [p.name for p in tree(tmp_path)]
    monkeypatch.setenv(SHUFFLE_ENV, "a")
    first, again = [p.name for p in tree(tmp_path)], [p.name for p in tree(tmp_path)]
    monkeypatch.setenv(SHUFFLE_ENV, "b")
    other = [p.name for p in tree(tmp_path)]
    assert sorted(first) == sorted(plain) and first == again and first != other and first != sorted(first)


@pytest.mark.skipif(OTHER is None, reason="no second ATen level on this CPU")
def test_diverge_layers_names_the_first_module_and_operation(builds, store):
    a, _ = builds["native"]
    b, _ = builds["other-cpu"]
    p = run_cli("diverge", "--layers", str(a), str(b), "--offline", "--json", store=store)
    res = json.loads(p.stdout)
    assert p.returncode == 1 and not res["identical"], p.stdout + p.stderr
    first = res["first"]
    assert first is not None and first["a"]["module"].startswith("model") and first["a"]["op"], res
    assert first["a"] == first["b"] and 0 < first["max_abs_diff"] < 1e-3 and first["elements_differing"] > 0
    p = run_cli("diverge", "--layers", str(a), str(a), "--offline", store=store)
    assert p.returncode == 0 and "identical" in p.stdout
    p = run_cli("diverge", "--layers", str(a / "transcript.jsonl"), str(b), "--offline", store=store)
    assert p.returncode == 2 and "build.json" in p.stderr and "Traceback" not in p.stderr


def test_a_varied_build_path_with_a_relative_out_dir(store, tmp_path):
    """The build-path variation runs the build in another working directory: a relative --out (as
    `make gate` passes) must still name the same place (CI caught this once)."""
    p = run_cli("matrix", str(TINY), "--vary", "env=build-path", "--out", "rel", "--json", store=store, cwd=tmp_path)
    res = json.loads(p.stdout)
    assert p.returncode == 0 and res["cells"][0]["status"] == "built", res
    assert Path(res["cells"][0]["out"]).is_absolute() and (Path(res["cells"][0]["out"]) / "build.json").is_file()
