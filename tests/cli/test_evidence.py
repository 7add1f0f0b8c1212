"""The evidence a reviewer reads: the SPDX 3 SBOM (checked by the SPDX project's bindings and its
NTIA conformance checker), `provenance sbom`, and the HTML report rendered in headless Chromium."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ..conftest import ROOT, build_json, run_cli

ARTIFACTS = ROOT / "build" / "test-artifacts"


@pytest.fixture(scope="module")
def built(tiny_build_copy):
    return tiny_build_copy("evidence")[0]


def _pub() -> str:
    return os.environ["PROVENANCE_KEY"].removesuffix(".key") + ".pub"


def _graph(text: str) -> dict[str, dict]:
    return {o.get("spdxId", o.get("@id")): o for o in json.loads(text)["@graph"]}


def _relations(graph: dict, kind: str) -> list[dict]:
    return [o for o in graph.values() if o.get("type") == "Relationship" and o["relationshipType"] == kind]


def test_the_spdx3_sbom_conforms_and_is_bound_to_the_build(built):
    from provenance.builder.sbom import validate

    text = (built / "sbom.spdx3.json").read_text()
    assert validate("spdx3", text) == []
    # The SPDX project's NTIA minimum-elements checker, in its SPDX 3 mode, as a separate program.
    p = subprocess.run([str(Path(sys.executable).parent / "sbomcheck"), "-s", "spdx3", str(built / "sbom.spdx3.json")],
                       capture_output=True, text=True)
    assert p.returncode == 0 and "Conformant: True" in p.stdout, p.stdout + p.stderr

    g = _graph(text)
    b = build_json(built)
    [model] = [o for o in g.values() if o["type"] == "ai_AIPackage"]
    assert model["software_packageVersion"] == f"blake3-tensors-v1:{b['weights']['tensors']['digest']}"
    assert {"algorithm": "sha256", "hashValue": b["weights"]["files"]["model.safetensors"]["sha256"],
            "type": "Hash"} in model["verifiedUsing"]
    assert {h["key"]: h["value"] for h in model["ai_hyperparameter"]}["parameters"] == str(b["model"]["parameters"])
    metrics = {m["key"]: m["value"] for m in model["ai_metric"]}
    assert metrics["extraction_rate"] == str(b["audit"]["extraction_rate"])
    [trained] = _relations(g, "trainedOn")
    assert trained["from"] == model["spdxId"] and g[trained["to"][0]]["type"] == "dataset_DatasetPackage"
    inputs = [o for o in g.values() if o["type"] == "dataset_DatasetPackage" and o["spdxId"].endswith("#input-ethtool")]
    assert len(inputs) == 1 and inputs[0]["software_packageUrl"].startswith("pkg:pypi/")
    declared = {r["from"]: g[r["to"][0]]["simplelicensing_licenseExpression"]
                for r in _relations(g, "hasDeclaredLicense")}
    assert declared[model["spdxId"]] == "MIT" and declared[inputs[0]["spdxId"]] == "GPL-2.0-only"
    concluded = {r["from"]: r for r in _relations(g, "hasConcludedLicense")}
    assert concluded[model["spdxId"]]["to"] == ["expandedlicensing_NoAssertionLicense"]
    assert "incompatible" in concluded[model["spdxId"]]["comment"]
    [build] = [o for o in g.values() if o["type"] == "build_Build"]
    assert build["build_buildId"] == b["invocation_id"]
    recipe_digest = {"algorithm": "sha256", "hashValue": b["recipe"]["sha256"], "type": "Hash"}
    assert recipe_digest in build["build_configSourceDigest"]
    [contains] = _relations(g, "contains")
    assert sorted(g[f]["name"] for f in contains["to"]) == sorted(b["weights"]["files"])

    assert b["sbom"]["spdx3"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    env = json.loads((built / "attestation.intoto.jsonl").read_text())
    st = json.loads(base64.b64decode(env["payload"]))
    signed = {x["name"]: x["digest"] for x in st["predicate"]["runDetails"]["byproducts"]}
    assert signed["sbom.spdx3.json"]["blake3"] == b["sbom"]["spdx3"]["blake3"]


@pytest.mark.parametrize("mutation,expected", [
    ("unknown-property", "Unknown property"),
    ("bad-enum", "is not a valid value"),
    ("other-version", "SPDX 3.0.1"),
    ("two-documents", "exactly one SpdxDocument"),
])
def test_the_spdx3_check_refuses_broken_documents(built, mutation, expected, tmp_path):
    from provenance.builder.sbom import validate

    doc = json.loads((built / "sbom.spdx3.json").read_text())
    model = next(o for o in doc["@graph"] if o.get("type") == "ai_AIPackage")
    if mutation == "unknown-property":
        model["ai_weights"] = "yes"
    elif mutation == "bad-enum":
        model["software_primaryPurpose"] = "weights"
    elif mutation == "other-version":
        doc["@context"] = "https://spdx.org/rdf/3.0.0/spdx-context.jsonld"
    else:
        d = next(o for o in doc["@graph"] if o.get("type") == "SpdxDocument")
        doc["@graph"].append({**d, "spdxId": d["spdxId"] + "-2"})
    problems = validate("spdx3", json.dumps(doc))
    assert problems and expected in problems[0], problems
    if mutation == "two-documents":  # the SPDX project's checker refuses it too
        (tmp_path / "two.spdx3.json").write_text(json.dumps(doc))
        sbomcheck = Path(sys.executable).parent / "sbomcheck"
        p = subprocess.run([str(sbomcheck), "-s", "spdx3", str(tmp_path / "two.spdx3.json")],
                           capture_output=True, text=True)
        assert p.returncode != 0 and "Multiple SpdxDocument" in p.stdout + p.stderr, p.stdout + p.stderr


def test_provenance_sbom_hands_out_the_signed_file_and_refuses_a_changed_one(built, tmp_path):
    for fmt, name in (("spdx3", "sbom.spdx3.json"), ("cyclonedx", "sbom.cdx.json")):
        dest = tmp_path / f"out-{fmt}.json"
        p = run_cli("sbom", str(built), "--format", fmt, "--key", _pub(), "--out", str(dest))
        assert p.returncode == 0, p.stderr
        assert dest.read_bytes() == (built / name).read_bytes() and "signed by the build's attestation" in p.stdout
    p = run_cli("sbom", str(built), "--format", "spdx3")
    assert p.returncode == 0 and p.stdout == (built / "sbom.spdx3.json").read_text()
    assert "unsigned: pass --key" in p.stderr
    p = run_cli("sbom", str(built), "--format", "cyclonedx", "--key", _pub(), "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["signed"] is True

    bad = tmp_path / "bad"
    shutil.copytree(built, bad)
    doc = json.loads((bad / "sbom.spdx3.json").read_text())
    doc["@graph"][0]["comment"] = "rewritten"
    (bad / "sbom.spdx3.json").write_text(json.dumps(doc))
    p = run_cli("sbom", str(bad), "--format", "spdx3", "--key", _pub())
    assert p.returncode == 1 and "not the sbom.spdx3.json the attestation signs" in p.stderr, p.stderr
    p = run_cli("sbom", str(bad), "--format", "spdx3")
    assert p.returncode == 1 and "not the SBOM build.json records: blake3 " in p.stderr and ", recorded " in p.stderr
    (bad / "sbom.spdx3.json").unlink()
    p = run_cli("sbom", str(bad), "--format", "spdx3")
    assert p.returncode == 1 and "sbom.spdx3.json: missing" in p.stderr, p.stderr
    p = run_cli("sbom", str(tmp_path / "nowhere"), "--format", "spdx3")
    assert p.returncode == 2 and "no build.json" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("sbom", str(built), "--format", "spdx2")
    assert p.returncode == 2 and "invalid choice" in p.stderr


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium; installed here when missing (root, as on CI and the developers' machines)."""
    exe = shutil.which("chromium")
    if exe is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, env=env, timeout=900)
        exe = shutil.which("chromium")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("headless Chromium is needed and could not be installed (apt-get install chromium)")
        pytest.skip("Chromium is not installed and this user cannot install it (apt-get install chromium)")
    return exe


def _browse(chromium: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="provenance-chromium-") as profile:
        return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=180)


def test_the_report_renders_in_headless_chromium(built, chromium, tmp_path):
    from PIL import Image

    p = run_cli("report", str(built), "--key", _pub())
    assert p.returncode == 0 and "verification: verified" in p.stdout, p.stdout + p.stderr
    page = built / "report.html"
    text = page.read_text()
    # Self-contained: nothing to load from anywhere (and the page's own policy forbids it).
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!#|data:)""", text)
    assert "Content-Security-Policy" in text and "default-src 'none'" in text

    dom = _browse(chromium, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    b = build_json(built)
    assert 'data-plots-rendered="3"' in dom.stdout  # the loss curve and both memorization plots laid out
    assert "verdict: verified" in dom.stdout
    assert "MIT declared for the weights" in dom.stdout and "incompatible" in dom.stdout
    assert b["weights"]["tensors"]["digest"] in dom.stdout
    assert b["dataset_manifest"]["merkle_root"]["digest"] in dom.stdout
    assert "netlink.c" in dom.stdout  # the control file, beside the training files

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    p = _browse(chromium, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri())
    assert p.returncode == 0 and shot.is_file(), p.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2400)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # text, tables and plots, not a blank page
    assert any(r > 150 and g < 90 and b_ < 90 for _, (r, g, b_) in colours)  # the training bars' red


def test_the_report_shows_a_failed_verification_and_says_when_none_was_asked(built, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(built, bad)
    (bad / "model" / "chat_template.jinja").write_text("{{ messages }}")
    p = run_cli("report", str(bad), "--key", _pub(), "--out", str(tmp_path / "r.html"))
    assert p.returncode == 1 and "verification: FAILED" in p.stdout  # the page is written; the exit says it failed
    text = (tmp_path / "r.html").read_text()
    assert "verdict: FAILED" in text and "chat_template.jinja" in text
    p = run_cli("report", str(built), "--out", str(tmp_path / "plain.html"))
    assert p.returncode == 0 and "not verified: no public key was given" in (tmp_path / "plain.html").read_text()
    p = run_cli("report", str(tmp_path / "nowhere"))
    assert p.returncode == 2 and "build.json" in p.stderr and "Traceback" not in p.stderr
