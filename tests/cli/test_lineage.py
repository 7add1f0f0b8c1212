"""Derived models (issue 38): a fine-tune of the session's tiny build on other pinned files, and exports. A
parent is verified as `verify-attestation` would before any work, its digests are in the child's
provenance, its training files' licences are judged with the child's, the fine-tune and its bfloat16
export rebuild to the same bits, and `verify-attestation --chain` walks export -> fine-tune -> tiny."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import TINY, build_json, run_cli
from .test_source import _no_network, _rewrite, _verify


def _pub() -> Path:
    return Path(os.environ["PROVENANCE_KEY"].removesuffix(".key") + ".pub")


def _statement(out: Path) -> dict:
    """The statement a build signed (its DSSE envelope's payload; the verifier checked the signature)."""
    envelope = json.loads((out / "attestation.intoto.jsonl").read_text().splitlines()[0])
    return json.loads(base64.b64decode(envelope["payload"]))


def _recipe(parent: Path, dest: Path, *, key: Path | None = None, weights: str | None = None) -> Path:
    """A fine-tune of the tiny build in `parent` on python-ethtool's netlink sources (absolute paths)."""
    att = parent / "attestation.intoto.jsonl"
    text = TINY.read_text().replace('name = "tiny"\n', 'name = "tiny-finetune"\n', 1)
    text = text.replace('[dataset]\ninclude = ["ethtool-0.15/python-ethtool/etherinfo*.h"]', f'''[[inputs]]
name = "parent"
kind = "model"
path = "{parent / 'model'}"
blake3 = "{weights or build_json(parent)['weights']['tensors']['digest']}"
attestation = "{att}"
attestation_sha256 = "{hashlib.sha256(att.read_bytes()).hexdigest()}"
key = "{key or _pub()}"
license = "MIT"

[dataset]
include = ["ethtool-0.15/python-ethtool/netlink*.c"]''')
    text = text.replace('name = "one"\nlr = 1e-2', 'name = "one"\ninit = "parent"\nlr = 1e-2')
    text = text.replace('control_include = ["ethtool-0.15/python-ethtool/netlink.c"]',
                        'control_include = ["ethtool-0.15/python-ethtool/etherinfo.c"]')
    assert text.count("init = \"parent\"") == 1 and "kind = \"model\"" in text
    dest.write_text(text)
    return dest


@pytest.fixture(scope="module")
def child(tiny_build_copy, store, tmp_path_factory):
    parent, _ = tiny_build_copy("lineage-parent")
    d = tmp_path_factory.mktemp("lineage")
    recipe = _recipe(parent, d / "ft.toml")
    p = run_cli("build", str(recipe), "--out", str(d / "ft"), store=store)
    assert p.returncode == 0, p.stderr[-3000:]
    return parent, d, p


def test_the_fine_tune_starts_from_the_verified_parent(child, store):
    parent, d, p = child
    assert "input parent: the model of 'tiny', verified against its attestation" in p.stderr
    rec = build_json(d / "ft")
    inp = next(i for i in rec["inputs"] if i["name"] == "parent")
    assert inp["kind"] == "model" and inp["blake3"] == build_json(parent)["weights"]["tensors"]["digest"]
    assert inp["parent"]["recipe"]["blake3"] == build_json(parent)["recipe"]["blake3"]
    assert inp["parent"]["attestation"]["sha256"] == \
        hashlib.sha256((parent / "attestation.intoto.jsonl").read_bytes()).hexdigest()
    assert inp["parent"]["input_licenses"] == {"GPL-2.0-only": 3}
    # the first loss is the parent's last, not a random model's: it trained on from the parent's weights
    ours = [json.loads(x) for x in (d / "ft" / "transcript.jsonl").read_text().splitlines()]
    theirs = [json.loads(x) for x in (parent / "transcript.jsonl").read_text().splitlines()]
    first, random_start = float.fromhex(ours[0]["loss"]), float.fromhex(theirs[0]["loss"])
    assert first < random_start - 0.3, (first, random_start)
    assert rec["weights"] != build_json(parent)["weights"]
    # the audit measures the parent's own training files in the child too, and a re-run gives the same
    audit = json.loads((d / "ft" / "audit.json").read_text())
    assert audit["parent_training"]["files"] == 3 and audit["training"]["files"] == 2
    assert audit["summary"]["parent_extraction_rate"] == audit["parent_training"]["extraction_rate"]
    assert "the parent's 3 training files:" in p.stderr
    again = run_cli("audit", str(d / "ft"), "--key", str(_pub()), store=store)
    assert again.returncode == 0 and "the re-run audit equals the signed one" in again.stdout + again.stderr, \
        again.stdout + again.stderr


def test_the_child_provenance_cites_the_parent_and_carries_its_licences(child):
    parent, d, p = child
    v = run_cli("verify", str(d / "ft" / "attestation.intoto.jsonl"), "--key", str(_pub()),
                "--model", str(d / "ft" / "model"))
    assert v.returncode == 0 and "verdict: verified" in v.stdout, v.stdout + v.stderr
    st = _statement(d / "ft")
    dep = next(x for x in st["predicate"]["buildDefinition"]["resolvedDependencies"] if x["name"] == "input:parent")
    assert dep["digest"] == {"blake3": build_json(parent)["weights"]["tensors"]["digest"]}
    signed = {s["name"]: s["digest"]["sha256"] for s in _statement(parent)["subject"]}
    assert dep["annotations"]["parent"]["files"] == signed
    # an MIT fine-tune of a model trained on GPL-2.0 files is flagged as its parent is: 2 own files + 3 carried
    assert "MIT declared for weights trained on GPL-2.0-only (5 files): incompatible" in p.stderr
    assert st["predicate"]["runDetails"]["provenance_outputs"]["input_licenses"] == ["GPL-2.0-only"]
    assert build_json(d / "ft")["source"]["file"] == "source.tar"  # with its parent's inside (below)


def test_rebuilding_the_fine_tune_is_bitwise(child, store):
    _, d, _ = child
    p = run_cli("rebuild", str(d / "ft" / "attestation.intoto.jsonl"), "--attestation-key", str(_pub()),
                "--out", str(d / "re"), store=store)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "verdict: reproduced (bitwise)" in p.stdout


@pytest.mark.parametrize("case", ["weights-changed", "other-key", "pinned-other-weights"])
def test_a_parent_that_does_not_verify_is_refused_before_any_work(child, store, keys, tmp_path, case):
    parent, _, _ = child
    bad = tmp_path / "parent"
    shutil.copytree(parent, bad, symlinks=True)
    recipe = tmp_path / "ft.toml"
    if case == "weights-changed":
        data = bytearray((bad / "model" / "model.safetensors").read_bytes())
        data[-1] ^= 1
        (bad / "model" / "model.safetensors").write_bytes(bytes(data))
        _recipe(bad, recipe, weights=build_json(parent)["weights"]["tensors"]["digest"])
    elif case == "other-key":
        _recipe(bad, recipe, key=keys / "k.pub")
    else:
        _recipe(bad, recipe, weights="0" * 64)
    p = run_cli("build", str(recipe), "--out", str(tmp_path / "out"), store=store)
    want = {"weights-changed": (1, "FAIL  model-files"), "other-key": (1, "FAIL  signature"),
            "pinned-other-weights": (2, "digest mismatch for input 'parent' weights")}[case]
    assert p.returncode == want[0] and want[1] in p.stderr, p.stderr[-3000:]
    if want[0] == 1:
        assert "input 'parent': the parent model in" in p.stderr and "does not verify" in p.stderr
    assert "Traceback" not in p.stderr and "tokenizer:" not in p.stderr  # refused before the data is prepared
    assert not (tmp_path / "out").exists() and not list((Path(store) / "tmp").glob("parent-*"))


def test_a_fine_tune_recipe_is_checked_before_anything_runs(tmp_path):
    text = TINY.read_text().replace('name = "one"\nlr = 1e-2', 'name = "one"\ninit = "parent"\nlr = 1e-2')
    (tmp_path / "r.toml").write_text(text)
    p = run_cli("check-recipe", str(tmp_path / "r.toml"))
    assert p.returncode == 2 and "stages[0].init: 'parent' needs an input of kind = \"model\"" in p.stderr, p.stderr
    text = TINY.read_text().replace('license = "GPL-2.0-only"', 'license = "GPL-2.0-only"\nattestation = "a"')
    (tmp_path / "r.toml").write_text(text)
    p = run_cli("check-recipe", str(tmp_path / "r.toml"))
    assert p.returncode == 2 and "'attestation' does not apply to kind = 'pypi'" in p.stderr, p.stderr


def _export_recipe(parent: Path, dest: Path, transform: str) -> Path:
    """An export of the build in `parent` (its one input the parent model, absolute paths)."""
    att = parent / "attestation.intoto.jsonl"
    dest.write_text(f'''[recipe]
name = "{build_json(parent)['recipe']['name']}-{transform}"

[[inputs]]
name = "parent"
kind = "model"
path = "{parent / 'model'}"
blake3 = "{build_json(parent)['weights']['tensors']['digest']}"
attestation = "{att}"
attestation_sha256 = "{hashlib.sha256(att.read_bytes()).hexdigest()}"
key = "{_pub()}"
license = "MIT"

[export]
transform = "{transform}"

[toolchain]
python = "3.11"
torch = "2.13.0"
transformers = "5.23.0"
tokenizers = "0.23.3"
safetensors = "0.8.0"

[output]
license = "MIT"
''')
    return dest


@pytest.fixture(scope="module")
def exported(child, store):
    """The fine-tune exported to bfloat16: the third link of tiny -> tiny-finetune -> tiny-finetune-bfloat16."""
    _, d, _ = child
    p = run_cli("build", str(_export_recipe(d / "ft", d / "bf16.toml", "bfloat16")), "--out", str(d / "bf16"),
                store=store)
    assert p.returncode == 0, p.stderr[-3000:]
    return d / "bf16", p


def test_an_export_is_the_parent_cast_and_rebuilds_bitwise(child, exported, store, model_signing):
    import numpy as np
    from safetensors.numpy import load_file

    _, d, _ = child
    out, p = exported
    # carried two links down: the fine-tune's 2 files and its parent's 3
    assert "MIT declared for weights trained on GPL-2.0-only (5 files): incompatible" in p.stderr, p.stderr[-2000:]
    theirs = load_file(str(d / "ft" / "model" / "model.safetensors"))
    ours = _bf16_as_float32(out / "model" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name, a in theirs.items():  # bfloat16 is float32 with the low 16 bits rounded off, ties to even
        bits = a.view(np.uint32).astype(np.uint64)
        want = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        assert np.array_equal(ours[name], want), name
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    from provenance.builder.sbom import validate

    for fmt, name in (("cyclonedx", "sbom.cdx.json"), ("spdx3", "sbom.spdx3.json")):
        assert validate(fmt, (out / name).read_text()) == [], name
    cdx = json.loads((out / "sbom.cdx.json").read_text())
    assert {"ref": "model", "dependsOn": ["input:parent"]} in cdx["dependencies"]
    assert cdx["metadata"]["component"]["pedigree"]["ancestors"][0]["name"] == "tiny-finetune"
    signed = {b["name"] for b in _statement(out)["predicate"]["runDetails"]["byproducts"]}
    assert signed == {"build.json", "model.sig", "sbom.cdx.json", "sbom.spdx3.json", "source.tar"}
    assert build_json(out)["export"] == {"transform": "bfloat16",
                                         "from_weights": build_json(d / "ft")["weights"]["tensors"]["digest"]}
    ms = subprocess.run([str(model_signing), "verify", "key", str(out / "model"), "--signature", str(out / "model.sig"),
                         "--public_key", str(_pub())], capture_output=True, text=True)
    assert ms.returncode == 0, ms.stdout + ms.stderr
    r = run_cli("rebuild", str(out / "attestation.intoto.jsonl"), "--attestation-key", str(_pub()),
                "--out", str(d / "bf16-re"), store=store)
    assert r.returncode == 0 and "verdict: reproduced (bitwise)" in r.stdout, r.stdout + r.stderr[-2000:]


def _bf16_as_float32(path: Path) -> dict:
    """The raw 16-bit patterns of a bfloat16 safetensors file, read with the standard library and numpy."""
    import struct

    import numpy as np

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "BF16", (name, t["dtype"])
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(data[8 + n + a:8 + n + b], dtype="<u2").reshape(t["shape"])
    return out


def test_an_int8_export_follows_the_documented_scheme(child, store, tmp_path):
    import numpy as np
    from safetensors.numpy import load_file

    parent, _, _ = child
    p = run_cli("build", str(_export_recipe(parent, tmp_path / "int8.toml", "int8")), "--out", str(tmp_path / "o"),
                store=store)
    assert p.returncode == 0, p.stderr[-2000:]
    theirs = load_file(str(parent / "model" / "model.safetensors"))
    ours = load_file(str(tmp_path / "o" / "model" / "model.safetensors"))
    for name, a in theirs.items():
        if a.ndim != 2:
            assert ours[name].dtype == np.float32 and np.array_equal(ours[name], a)
            continue
        q, scale = ours[name], ours[f"{name}.scale"]
        assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (a.shape[0],)
        assert np.array_equal(scale, np.max(np.abs(a), axis=1) / np.float32(127))
        assert int(np.abs(q.astype(np.int16)).max()) == 127
        # each weight within half a step of its row's scale
        assert np.all(np.abs(q * scale[:, None] - a) <= scale[:, None] / 2 * (1 + 1e-6)), name
    r = run_cli("rebuild", str(tmp_path / "o" / "attestation.intoto.jsonl"), "--attestation-key", str(_pub()),
                "--out", str(tmp_path / "o-re"), store=store)
    assert r.returncode == 0 and "verdict: reproduced (bitwise)" in r.stdout, r.stdout + r.stderr[-2000:]
    p = run_cli("build", str(tmp_path / "int8.toml"), "--out", str(tmp_path / "x"), "--threads", "1", store=store)
    assert p.returncode == 2 and "is an export recipe" in p.stderr and "--threads does not apply" in p.stderr
    p = run_cli("check-recipe", str(tmp_path / "int8.toml"))
    assert p.returncode == 2 and "an export recipe ([export])" in p.stderr and "Traceback" not in p.stderr
    # a fine-tune starts from floating-point weights: an int8 export is refused by name, not a traceback
    p = run_cli("build", str(_recipe(tmp_path / "o", tmp_path / "ft-int8.toml")), "--out", str(tmp_path / "ft"),
                store=store)
    assert p.returncode == 2 and "has dtype I8" in p.stderr, p.stderr[-2000:]
    assert "an int8 export is not one" in p.stderr and "Traceback" not in p.stderr


def test_the_chain_is_walked_to_its_root_and_printed(child, exported):
    parent, d, _ = child
    out, _ = exported
    v = run_cli("verify", str(out / "attestation.intoto.jsonl"), "--key", str(_pub()), "--model", str(out / "model"),
                "--chain", str(parent), "--chain", str(d / "ft"), "--json")
    res = json.loads(v.stdout)
    assert v.returncode == 0 and res["result"] == "verified", v.stdout
    links = [c for c in res["checks"] if c["check"] == "chain"]
    assert len(links) == 2 and all(c["ok"] for c in links)
    assert "link 1 (input 'parent' of 'tiny-finetune-bfloat16')" in links[0]["detail"]
    assert "link 2 (input 'parent' of 'tiny-finetune'): 'tiny'" in links[1]["detail"]
    assert [x["recipe"] for x in res["lineage"]] == ["tiny-finetune-bfloat16", "tiny-finetune", "tiny"]
    assert res["lineage"][2]["weights"] == build_json(parent)["weights"]["tensors"]["digest"]
    assert res["lineage"][1]["attestation_sha256"] == hashlib.sha256(
        (d / "ft" / "attestation.intoto.jsonl").read_bytes()).hexdigest()
    text = run_cli("verify", str(out / "attestation.intoto.jsonl"), "--key", str(_pub()),
                   "--chain", str(d / "ft" / "attestation.intoto.jsonl"), "--chain", str(parent))
    assert text.returncode == 0 and "lineage:\ntiny-finetune-bfloat16: weights blake3:" in text.stdout, text.stdout
    assert "    └─ tiny (its input 'parent'): weights" in text.stdout and "licence MIT" in text.stdout


@pytest.mark.parametrize("case", ["missing", "re-signed", "cites-other-weights", "files-changed"])
def test_a_broken_link_fails_the_chain_naming_it(child, exported, keys, tmp_path, case):
    from provenance.attest.sign import envelope_line, load_signer, sign_envelope

    parent, d, _ = child
    out, _ = exported
    grand = tmp_path / "tiny"
    shutil.copytree(parent, grand, symlinks=True)
    if case == "re-signed":  # the same statement, signed by another key the verifier also trusts
        envelope = json.loads((grand / "attestation.intoto.jsonl").read_text().splitlines()[0])
        payload = base64.b64decode(envelope["payload"])
        (grand / "attestation.intoto.jsonl").write_bytes(envelope_line(sign_envelope(
            payload, envelope["payloadType"], [load_signer(keys / "k.key")])))
    elif case == "cites-other-weights":  # the top model's statement edited to cite other parent weights, re-signed
        top = tmp_path / "top"
        shutil.copytree(out, top, symlinks=True)
        envelope = json.loads((top / "attestation.intoto.jsonl").read_text().splitlines()[0])
        st = json.loads(base64.b64decode(envelope["payload"]))
        dep = next(x for x in st["predicate"]["buildDefinition"]["resolvedDependencies"] if x["name"] == "input:parent")
        dep["digest"]["blake3"] = "0" * 64
        (top / "attestation.intoto.jsonl").write_bytes(envelope_line(sign_envelope(
            json.dumps(st).encode(), envelope["payloadType"], [load_signer(keys / "k.key")])))
        out = top
    elif case == "files-changed":
        (grand / "model" / "config.json").write_text("{}")
    given = [] if case == "missing" else [str(grand)]
    v = run_cli("verify", str(out / "attestation.intoto.jsonl"), "--key", str(_pub()), "--key", str(keys / "k.pub"),
                "--chain", str(d / "ft"), *[x for g in given for x in ("--chain", g)], "--json")
    res = json.loads(v.stdout)
    assert v.returncode == 1 and res["result"] == "FAILED", v.stdout + v.stderr
    failed = [c["detail"] for c in res["checks"] if not c["ok"]]
    link, want = {"missing": (2, "is not among the --chain files"), "re-signed": (2, "is not among the --chain files"),
                  "cites-other-weights": (1, "its weights are blake3:"),
                  "files-changed": (2, "does not verify: model-files")}[case]
    of = "tiny-finetune-bfloat16" if link == 1 else "tiny-finetune"
    assert len(failed) == 1 and failed[0].startswith(f"link {link} (input 'parent' of '{of}')"), failed
    assert want in failed[0], failed


def test_the_sboms_name_the_parent_model(child):
    """CycloneDX: the parent a machine-learning-model component the model depends on, and its pedigree;
    SPDX 3: an ai_AIPackage of which the model is a descendantOf. Both pass the validators the suite uses."""
    import sys

    from provenance.builder.sbom import validate

    parent, d, _ = child
    weights = f"blake3-tensors-v1:{build_json(parent)['weights']['tensors']['digest']}"
    cdx_text = (d / "ft" / "sbom.cdx.json").read_text()
    assert validate("cyclonedx", cdx_text) == []
    cdx = json.loads(cdx_text)
    comp = next(c for c in cdx["components"] if c["bom-ref"] == "input:parent")
    assert comp["type"] == "machine-learning-model" and comp["version"] == weights and comp["name"] == "tiny"
    assert {"ref": "model", "dependsOn": ["dataset", "input:parent"]} in cdx["dependencies"]
    assert cdx["metadata"]["component"]["pedigree"]["ancestors"][0]["version"] == weights
    spdx_text = (d / "ft" / "sbom.spdx3.json").read_text()
    assert validate("spdx3", spdx_text) == []
    graph = json.loads(spdx_text)["@graph"]
    pkg = next(o for o in graph if o.get("spdxId", "").endswith("#parent-parent"))
    assert pkg["type"] == "ai_AIPackage" and pkg["software_packageVersion"] == weights
    assert any(o.get("relationshipType") == "descendantOf" and o["from"].endswith("#model")
               and o["to"] == [pkg["spdxId"]] for o in graph)
    p = subprocess.run([str(Path(sys.executable).parent / "sbomcheck"), "-s", "spdx3",
                        str(d / "ft" / "sbom.spdx3.json")], capture_output=True, text=True)
    assert p.returncode == 0 and "Conformant: True" in p.stdout, p.stdout + p.stderr


def test_the_report_draws_the_lineage(child, tmp_path):
    parent, d, _ = child
    p = run_cli("report", str(d / "ft"), "--key", str(_pub()), "--out", str(tmp_path / "r.html"))
    assert p.returncode == 0, p.stderr
    page = (tmp_path / "r.html").read_text()
    drawn = page[page.index('<h2 id="lineage">'):page.index('<h2 id="training">')]
    assert "<svg" in drawn and "tiny-finetune" in drawn and "fine-tuned from" in drawn
    assert f"weights blake3:{build_json(parent)['weights']['tensors']['digest'][:32]}" in drawn
    assert "its input parent: trained on GPL-2.0-only (3 files)" in drawn
    p = run_cli("report", str(parent), "--out", str(tmp_path / "p.html"))
    assert p.returncode == 0 and 'id="lineage"' not in (tmp_path / "p.html").read_text()


def test_the_lineage_carries_its_recipes_and_a_fine_tune_audits_them_all(child, exported, store):
    """A parent's provenance carries its own parent's recipe and the lineage above it, each held to its signed
    digests: a fine-tune of the fine-tune measures the fine-tune's 2 training files and the tiny recipe's 3, and
    the export (which trains on nothing) carries both recipes on to whatever is built from it."""
    parent, d, _ = child
    above = _parent_note(d / "ft")
    assert above["recipe_content"] == _statement(parent)["predicate"]["buildDefinition"]["externalParameters"][
        "recipe"]["content"] and above["lineage"] == []
    out, _ = exported
    carried = _parent_note(out)
    assert carried["recipe_name"] == "tiny-finetune" and [a["recipe_name"] for a in carried["lineage"]] == ["tiny"]
    assert carried["lineage"][0]["recipe_content"] == above["recipe_content"]
    p = run_cli("build", str(_recipe(d / "ft", d / "ft2.toml")), "--out", str(d / "ft2"), store=store)
    assert p.returncode == 0, p.stderr[-3000:]
    audit = json.loads((d / "ft2" / "audit.json").read_text())["parent_training"]
    assert audit["recipes"] == [{"recipe": "tiny-finetune", "files": 2, "parent": True},
                                {"recipe": "tiny", "files": 3, "parent": False}], audit["recipes"]
    assert audit["files"] == 5 and "not_measured_recipes" not in audit
    assert sorted(f["path"].startswith("tiny/") for f in audit["per_file"]) == [False] * 2 + [True] * 3
    assert "the 5 training files the parent carries (its own and those of tiny):" in p.stderr, p.stderr[-2000:]
    assert [a["recipe_name"] for a in _parent_note(d / "ft2")["lineage"]] == ["tiny"]


def test_a_lineage_recipe_with_other_digests_is_refused():
    """What a parent's provenance says of the recipes above it is used only where each text has the digests
    recorded beside it."""
    from types import SimpleNamespace

    from provenance._internal.hashing import hash_bytes
    from provenance.builder.parent import lineage_above
    from provenance.errors import CheckFailed

    text = TINY.read_text()
    note = {"recipe_name": "tiny", "recipe": hash_bytes(text.encode()), "recipe_content": text, "lineage": []}
    pred = {"buildDefinition": {"resolvedDependencies": [{"name": "input:parent", "annotations": {"parent": note}}]}}
    inp = SimpleNamespace(name="parent")
    assert [a.recipe_name for a in lineage_above(inp, pred)] == ["tiny"]
    note["recipe_content"] = text.replace("seed = 1234", "seed = 1235")
    with pytest.raises(CheckFailed, match="carries the recipe of 'tiny' with other digests"):
        lineage_above(inp, pred)
    note.pop("recipe_content")
    assert lineage_above(inp, pred) == ()  # recorded by a version that kept no recipe text: nothing above


def _parent_note(out: Path) -> dict:
    deps = _statement(out)["predicate"]["buildDefinition"]["resolvedDependencies"]
    return next(dep for dep in deps if dep["name"] == "input:parent")["annotations"]["parent"]


def test_a_fine_tune_of_the_bfloat16_export_starts_from_its_values_and_audits_the_lineage(child, exported, store):
    """The export's bfloat16 weights, widened exactly to float32, are where the fine-tune starts; the export
    trains on nothing, so the audit measures what the recipes above it trained on: the fine-tune's 2 files and
    the tiny recipe's 3."""
    import numpy as np

    from provenance._internal.safetensors import read_float_tensors

    parent, d, _ = child
    out, _ = exported
    bits = _bf16_as_float32(out / "model" / "model.safetensors")
    # a bfloat16 is a float32's upper half: widened, each value is exactly the export's
    for name, a in read_float_tensors(out / "model" / "model.safetensors").items():
        assert a.dtype == np.float32 and np.array_equal(a.view(np.uint32), bits[name].astype(np.uint32) << 16), name
    p = run_cli("build", str(_recipe(out, d / "ft-bf16.toml")), "--out", str(d / "ft-bf16"), store=store)
    assert p.returncode == 0, p.stderr[-3000:]
    first = float.fromhex(json.loads((d / "ft-bf16" / "transcript.jsonl").read_text().splitlines()[0])["loss"])
    random_start = float.fromhex(json.loads((parent / "transcript.jsonl").read_text().splitlines()[0])["loss"])
    assert first < random_start - 0.3, (first, random_start)
    audit = json.loads((d / "ft-bf16" / "audit.json").read_text())["parent_training"]
    assert audit["recipes"] == [{"recipe": "tiny-finetune", "files": 2, "parent": False},
                                {"recipe": "tiny", "files": 3, "parent": False}], audit["recipes"]
    assert "the 5 training files the parent carries (those of tiny-finetune, tiny):" in p.stderr, p.stderr[-2000:]


def _members(archive: Path) -> dict[str, bytes]:
    import tarfile

    with tarfile.open(archive) as tf:
        return {m.name.split("/", 1)[1]: tf.extractfile(m).read() for m in tf.getmembers()}


def test_a_fine_tunes_source_holds_its_parents_and_rebuilds_from_it_alone(child, tmp_path):
    parent, d, _ = child
    files = _members(d / "ft" / "source.tar")
    signed = {s["name"] for s in _statement(parent)["subject"]}
    assert {f"inputs/parent/model/{n}" for n in signed} | {"inputs/parent/attestation.intoto.jsonl",
                                                          "inputs/parent/signing-key.pub",
                                                          "inputs/parent/source.tar"} == \
        {n for n in files if n.startswith("inputs/parent/")}
    assert files["inputs/parent/source.tar"] == (parent / "source.tar").read_bytes()  # the parent's own, whole
    assert files["inputs/parent/attestation.intoto.jsonl"] == (parent / "attestation.intoto.jsonl").read_bytes()
    assert files["inputs/parent/signing-key.pub"] == _pub().read_bytes()
    code, checks = _verify(str(d / "ft" / "attestation.intoto.jsonl"), "--key", str(_pub()), "--source",
                           str(d / "ft" / "source.tar"))
    assert code == 0 and "ethtool, parent" in checks["source-inputs"]["detail"], checks
    rb = _rebuild_from_source(d / "ft", tmp_path / "rebuilt")
    assert rb.returncode == 0 and "verdict: reproduced (bitwise)" in rb.stdout, rb.stdout + rb.stderr[-3000:]
    assert "input parent: the model of 'tiny', verified against its attestation" in rb.stderr
    assert (tmp_path / "rebuilt" / "source.tar").read_bytes() == (d / "ft" / "source.tar").read_bytes()


def _rebuild_from_source(build: Path, out: Path) -> subprocess.CompletedProcess:
    """`provenance rebuild --from-source` of `build`'s own archive, with no network (where a namespace of
    its own can be had) and an empty store."""
    env = {**os.environ, "PROVENANCE_STORE": str(out.parent / "no-store"), "HOME": str(out.parent / "home")}
    return subprocess.run([*_no_network(), sys.executable, "-m", "provenance", "rebuild",
                           str(build / "attestation.intoto.jsonl"), "--attestation-key", str(_pub()),
                           "--from-source", str(build / "source.tar"), "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=out.parent)


def _nested(edit):
    """An edit of the parent's archive inside the child's (its table re-listed, so only the claims catch it)."""
    def apply(files: dict) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as t:
            (Path(t) / "in.tar").write_bytes(files["inputs/parent/source.tar"])
            _rewrite(Path(t) / "in.tar", Path(t) / "out.tar", edit)
            files["inputs/parent/source.tar"] = (Path(t) / "out.tar").read_bytes()
    return apply


def _flip(files: dict, path: str) -> None:
    files[path] = files[path][:-1] + bytes([files[path][-1] ^ 1])


LINEAGE_TAMPER = {
    "parent weights changed": (lambda f: _flip(f, "inputs/parent/model/model.safetensors"), "model/model.safetensors"),
    "parent attestation swapped": (lambda f: _flip(f, "inputs/parent/attestation.intoto.jsonl"), "attestation"),
    "parent file added": (lambda f: f.__setitem__("inputs/parent/model/extra.bin", b"x"), "extra.bin"),
    "parent source removed": (lambda f: f.pop("inputs/parent/source.tar"), "source.tar: absent"),
    "grandparent input changed": (_nested(lambda f: _flip(f, "inputs/ethtool/ethtool-0.15.tar.gz")),
                                  "source.tar: source-inputs: input 'ethtool'"),
    "grandparent code of another version": (_nested(lambda f: _flip(f, "code/provenance/builder/train.py")),
                                            "source.tar: source-code"),
}


@pytest.mark.parametrize("case", sorted(LINEAGE_TAMPER))
def test_a_tampered_parent_in_the_source_fails_naming_it(child, case, tmp_path):
    _, d, _ = child
    edit, words = LINEAGE_TAMPER[case]
    bad = tmp_path / "bad.tar"
    _rewrite(d / "ft" / "source.tar", bad, edit)
    code, checks = _verify(str(d / "ft" / "attestation.intoto.jsonl"), "--key", str(_pub()), "--source", str(bad))
    assert code == 1, checks
    failed = {k: c["detail"] for k, c in checks.items() if not c["ok"]}
    assert "input 'parent'" in failed.get("source-inputs", "") + failed.get("source-complete", ""), failed
    assert any(words in x for x in failed.values()), failed


def test_an_exports_source_nests_the_whole_lineage_and_rebuilds_from_it_alone(child, exported, tmp_path):
    _, d, _ = child
    out, _ = exported
    files = _members(out / "source.tar")
    assert files["inputs/parent/source.tar"] == (d / "ft" / "source.tar").read_bytes()  # which holds tiny's
    assert "inputs/parent/source.tar" in _members(d / "ft" / "source.tar")
    code, checks = _verify(str(out / "attestation.intoto.jsonl"), "--key", str(_pub()), "--source",
                           str(out / "source.tar"))
    assert code == 0, checks
    code, checks = _verify(str(out / "source.intoto.jsonl"), "--key", str(_pub()), "--source", str(out / "source.tar"),
                           "--model", str(out / "model"))
    assert code == 0 and checks["source-subject"]["ok"], checks
    assert "## Corresponding source" in (out / "model" / "README.md").read_text()
    rb = _rebuild_from_source(out, tmp_path / "rebuilt")
    assert rb.returncode == 0 and "verdict: reproduced (bitwise)" in rb.stdout, rb.stdout + rb.stderr[-3000:]
    assert (tmp_path / "rebuilt" / "source.tar").read_bytes() == (out / "source.tar").read_bytes()
    cdx = json.loads((out / "sbom.cdx.json").read_text())["metadata"]["component"]["externalReferences"]
    assert [(x["type"], x["url"]) for x in cdx] == [("source-distribution", "source.tar")]
    assert hashlib.sha256((out / "source.tar").read_bytes()).hexdigest() in [h["content"] for h in cdx[0]["hashes"]]


def test_the_chain_verifies_from_the_published_folder_alone(exported, tmp_path):
    """A published export carries its lineage in its corresponding source: each parent's folder (model
    files and attestation) is a `--chain` directory once unpacked, and the walk reaches the root."""
    import tarfile

    out, _ = exported
    p = run_cli("publish", str(out), "--out", str(tmp_path / "pub"), "--key", str(_pub()))
    assert p.returncode == 0, p.stderr
    archive, links = tmp_path / "pub" / ".provenance" / "source.tar", []
    for depth in range(2):  # the fine-tune's folder, then, inside its own archive, tiny's
        with tarfile.open(archive) as tf:
            tf.extractall(tmp_path / f"x{depth}", filter="data")
        folder = next((tmp_path / f"x{depth}").iterdir()) / "inputs" / "parent"
        links.append(folder)
        archive = folder / "source.tar"
    v = run_cli("verify", str(tmp_path / "pub" / ".provenance" / "attestation.intoto.jsonl"), "--key", str(_pub()),
                "--model", str(tmp_path / "pub"), "--published", *[f"--chain={x}" for x in links], "--json")
    res = json.loads(v.stdout)
    assert v.returncode == 0 and res["result"] == "verified", v.stdout
    assert [x["recipe"] for x in res["lineage"]] == ["tiny-finetune-bfloat16", "tiny-finetune", "tiny"]
    assert sum(c["check"] == "chain" and c["ok"] for c in res["checks"]) == 2


def test_source_on_demand_gives_the_builds_archive_for_a_fine_tune_and_an_export(child, exported, store, tmp_path):
    _, d, _ = child
    out, _ = exported
    for build in (d / "ft", out):
        p = run_cli("source", str(build), "--out", str(tmp_path / f"{build.name}.tar"), store=store)
        assert p.returncode == 0, p.stderr[-2000:]
        assert (tmp_path / f"{build.name}.tar").read_bytes() == (build / "source.tar").read_bytes(), build
    p = run_cli("source", "--recipe", str(d / "ft.toml"), "--out", str(tmp_path / "recipe.tar"), store=store)
    assert p.returncode == 0, p.stderr[-2000:]  # a recipe and its verified parent are enough, no build
    assert (tmp_path / "recipe.tar").read_bytes() == (d / "ft" / "source.tar").read_bytes()


def test_a_published_folder_is_a_parent_and_its_source_is_nested(child, store, tmp_path):
    """The parent named by its published folder (`provenance publish`): verified with the folder's receipts
    passed over, trained on to the same weights as from its build folder, and its .provenance/source.tar
    nested in the child's archive."""
    parent, d, _ = child
    p = run_cli("publish", str(parent), "--out", str(tmp_path / "pub"), "--key", str(_pub()))
    assert p.returncode == 0, p.stderr
    text = _recipe(parent, tmp_path / "ft.toml").read_text()
    text = text.replace(f'path = "{parent / "model"}"', f'path = "{tmp_path / "pub"}"')
    text = text.replace(f'attestation = "{parent / "attestation.intoto.jsonl"}"',
                        f'attestation = "{tmp_path / "pub" / ".provenance" / "attestation.intoto.jsonl"}"')
    assert str(tmp_path / "pub") in text and str(parent) not in text
    (tmp_path / "ft.toml").write_text(text)
    b = run_cli("build", str(tmp_path / "ft.toml"), "--out", str(tmp_path / "ft"), store=store)
    assert b.returncode == 0, b.stderr[-3000:]
    assert build_json(tmp_path / "ft")["weights"]["tensors"] == build_json(d / "ft")["weights"]["tensors"]
    nested = _members(tmp_path / "ft" / "source.tar")["inputs/parent/source.tar"]
    assert nested == (tmp_path / "pub" / ".provenance" / "source.tar").read_bytes()


def test_a_fine_tune_reuses_its_stage_cache_replays_and_resumes_bitwise(child, store, tmp_path):
    """What the builder guarantees holds for a fine-tune too: the stage cache (the child fixture's build
    filled it), replay of kept checkpoints, and a resume after SIGKILL, each ending on the same weights."""
    import signal
    import time

    _, d, _ = child
    want = build_json(d / "ft")["weights"]["tensors"]
    again = run_cli("build", str(d / "ft.toml"), "--out", str(tmp_path / "again"), store=store)
    assert again.returncode == 0 and "stage cache: reusing the output of stages up to 'two'" in again.stderr, \
        again.stderr[-2000:]
    assert build_json(tmp_path / "again")["weights"]["tensors"] == want

    kept = run_cli("build", str(d / "ft.toml"), "--out", str(tmp_path / "kept"), "--checkpoint-every", "2",
                   "--keep-checkpoints", "--no-cache", store=store)
    assert kept.returncode == 0, kept.stderr[-2000:]
    assert build_json(tmp_path / "kept")["weights"]["tensors"] == want
    r = run_cli("replay", str(tmp_path / "kept"), "--key", str(_pub()), "--json", "--segments", "2", store=store)
    rep = json.loads(r.stdout)
    assert r.returncode == 0 and rep["ok"] and [s["verdict"] for s in rep["segments"]] == ["bitwise"] * 2, r.stderr

    out = tmp_path / "killed"
    env = {**os.environ, "PROVENANCE_STORE": str(store)}
    proc = subprocess.Popen([sys.executable, "-m", "provenance", "build", str(d / "ft.toml"), "--out", str(out),
                             "--checkpoint-every", "1", "--no-cache"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not list(out.glob("checkpoint/step-*6.safetensors")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL) if proc.poll() is None else None
    proc.wait(timeout=60)
    assert not (out / "build.json").exists(), "the build finished before it could be killed at step 6"
    resumed = run_cli("build", str(d / "ft.toml"), "--out", str(out), "--checkpoint-every", "1", "--no-cache",
                      store=store)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-2000:]
    assert build_json(out)["training"]["resumed_after_step"] >= 6
    assert build_json(out)["weights"]["tensors"] == want


def test_a_chain_deeper_than_its_bound_is_refused_naming_the_link(child, keys, tmp_path):
    """Sixteen parent links are walked; a seventeenth is refused. The links above tiny are the fine-tune's
    statement, each edited to cite the one below it and signed with a key the verifier trusts (a lineage
    that long is built the same way by honest builds; a cycle cannot be: each link names its parent by the
    sha256 of a file that names its own parent the same way)."""
    from provenance.attest.sign import envelope_line, load_signer, sign_envelope
    from provenance.verify.chain import MAX_LINKS

    parent, d, _ = child
    template = _statement(d / "ft")
    below = parent / "attestation.intoto.jsonl"
    below_st = _statement(parent)
    signer = load_signer(keys / "k.key")
    links = []
    for i in range(1, MAX_LINKS + 2):
        st = json.loads(json.dumps(template))
        dep = next(x for x in st["predicate"]["buildDefinition"]["resolvedDependencies"] if x["name"] == "input:parent")
        dep["digest"] = {"blake3": below_st["predicate"]["runDetails"]["provenance_outputs"]["tensors"]["digest"]}
        note = dep["annotations"]["parent"]
        note["attestation"] = {"sha256": hashlib.sha256(below.read_bytes()).hexdigest()}
        note["files"] = {s["name"]: s["digest"]["sha256"] for s in below_st["subject"]}
        note["recipe"] = below_st["predicate"]["buildDefinition"]["externalParameters"]["recipe"]["digest"]
        link = tmp_path / f"link-{i}.intoto.jsonl"
        envelope = sign_envelope(json.dumps(st).encode(), "application/vnd.in-toto+json", [signer])
        link.write_bytes(envelope_line(envelope))
        links.append(link)
        below, below_st = link, st
    chain = [x for p in [parent / "attestation.intoto.jsonl", *links] for x in ("--chain", str(p))]
    ok = run_cli("verify", str(links[MAX_LINKS - 1]), "--key", str(_pub()), "--key", str(keys / "k.pub"), *chain,
                 "--json")
    res = json.loads(ok.stdout)
    assert ok.returncode == 0 and len(res["lineage"]) == MAX_LINKS + 1, ok.stdout[-2000:]
    deep = run_cli("verify", str(links[MAX_LINKS]), "--key", str(_pub()), "--key", str(keys / "k.pub"), *chain,
                   "--json")
    res = json.loads(deep.stdout)
    failed = [c["detail"] for c in res["checks"] if not c["ok"]]
    assert deep.returncode == 1 and len(failed) == 1, deep.stdout[-2000:]
    assert failed[0].startswith(f"link {MAX_LINKS + 1} (input 'parent' of 'tiny-finetune')"), failed
    assert f"deeper than {MAX_LINKS} links" in failed[0], failed


PTRACE = '''[[inputs]]
name = "ptrace"
kind = "pypi"
package = "python-ptrace"
version = "0.9.9"
sha256 = "56bbfef44eaf3a77be48138cca5767cdf471e8278fe1499f9b72f151907f25cf"
blake3 = "e6043e1b9f19606bc25608f74c7e256b09988b7624cb4879028369725107b31a"
license = "GPL-2.0-only"

'''


def test_a_rebuild_from_source_measures_the_lineage_from_the_archive(child, store, tmp_path):
    """A fine-tune of tiny on python-ptrace files (not its parent's ethtool): rebuilt from its archive alone,
    no network and an empty store, it is bitwise, and its audit still measures tiny's training files,
    taken out of tiny's archive nested in the fine-tune's (the store holds each to its pins)."""
    parent, _, _ = child
    text = _recipe(parent, tmp_path / "ft.toml").read_text()
    own = text[text.index('[[inputs]]\nname = "ethtool"'):text.index('[[inputs]]\nname = "parent"')]
    text = text.replace(own, PTRACE).replace('include = ["ethtool-0.15/python-ethtool/netlink*.c"]',
                                             'include = ["python-ptrace-0.9.9/ptrace/debugger/process_e*.py"]')
    text = text.replace('control_include = ["ethtool-0.15/python-ethtool/etherinfo.c"]',
                        'control_include = ["python-ptrace-0.9.9/ptrace/debugger/breakpoint.py"]')
    (tmp_path / "ft.toml").write_text(text)
    b = run_cli("build", str(tmp_path / "ft.toml"), "--out", str(tmp_path / "ft"), store=store)
    assert b.returncode == 0, b.stderr[-3000:]
    audit = json.loads((tmp_path / "ft" / "audit.json").read_text())
    assert audit["training"]["files"] == 2 and audit["parent_training"]["files"] == 3, audit["parent_training"]
    rb = _rebuild_from_source(tmp_path / "ft", tmp_path / "re")
    assert rb.returncode == 0 and "verdict: reproduced (bitwise)" in rb.stdout, rb.stdout + rb.stderr[-3000:]
    again = json.loads((tmp_path / "re" / "audit.json").read_text())
    assert again["parent_training"] == audit["parent_training"]
    assert again["parent_training"]["recipes"] == [{"recipe": "tiny", "files": 3, "parent": True}]
